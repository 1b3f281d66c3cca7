"""The GRU backbone: h_t = GRU(e_t, h_{t−1}); one step per new event, a state of h alone."""

from __future__ import annotations

import torch
from torch import nn

from models.nn.backbones.events import EventBackbone, State
from models.nn.items import ItemTower


class GRUBackbone(EventBackbone):
    def __init__(self, items: ItemTower, item_dim: int, units: int, dropout: float):
        super().__init__(items, item_dim, dropout)
        self.units = units
        self.gru = nn.GRU(self.in_dim, units, batch_first=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h, _ = self.gru(self.embed(batch["items"], batch["ratings"], batch["event_feats"]))
        return h  # (B, T, U)

    def state_sizes(self) -> tuple[int, ...]:
        return (self.units,)

    def advance(self, state: State | None, items, ratings, event_feats) -> State:
        _, h = self.gru(self.embed(items, ratings, event_feats), state[0] if state is not None else None)
        return (h,)  # (1, B, U)

    def output(self, state: State) -> torch.Tensor:
        return state[0][0]  # (B, U)
