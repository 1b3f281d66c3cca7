"""Sequence encoders under the decomposer's heads (DESIGN §2, §6), one module per backbone.

Each turns (B, T) right-padded events into (B, T, H) outputs for training, and keeps a
fixed-size serving state that `advance` moves forward by new events: a recurrent backbone by
one step per event, the transformer by keeping its last `max_len` events and recomputing over
them (a bounded cost per event). `output(state)` is the output after the last event.
"""

from __future__ import annotations

from models.nn.backbones.events import EventBackbone
from models.nn.backbones.gru import GRUBackbone
from models.nn.backbones.lstm import LSTMBackbone
from models.nn.backbones.transformer import TransformerBackbone
from models.nn.items import ItemTower

BACKBONES = ("lstm", "gru", "transformer")


def build_backbone(
    name: str, items: ItemTower, item_dim: int, units: int, dropout: float, max_len: int, blocks: int, heads: int
) -> EventBackbone:
    if name == "lstm":
        return LSTMBackbone(items, item_dim, units, dropout)
    if name == "gru":
        return GRUBackbone(items, item_dim, units, dropout)
    if name == "transformer":
        return TransformerBackbone(items, item_dim, units, dropout, max_len, blocks, heads)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")


__all__ = ["BACKBONES", "EventBackbone", "GRUBackbone", "LSTMBackbone", "TransformerBackbone", "build_backbone"]
