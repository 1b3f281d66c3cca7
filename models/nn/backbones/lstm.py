"""The LSTM backbone (the seed's): (h_t, c_t) = LSTM(e_t, h_{t−1}, c_{t−1}); one step per new event."""

from __future__ import annotations

import torch
from torch import nn

from models.nn.backbones.events import EventBackbone, State
from models.nn.items import ItemTower


class LSTMBackbone(EventBackbone):
    def __init__(self, items: ItemTower, item_dim: int, units: int, dropout: float):
        super().__init__(items, item_dim, dropout)
        self.units = units
        self.lstm = nn.LSTM(self.in_dim, units, batch_first=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h, _ = self.lstm(self.embed(batch["items"], batch["ratings"], batch["event_feats"]))
        return h  # (B, T, U)

    def state_sizes(self) -> tuple[int, ...]:
        return (self.units, self.units)  # h, c

    def advance(self, state: State | None, items, ratings, event_feats) -> State:
        _, hc = self.lstm(self.embed(items, ratings, event_feats), state)
        return hc  # (h, c), each (1, B, U)

    def output(self, state: State) -> torch.Tensor:
        return state[0][0]  # (B, U)
