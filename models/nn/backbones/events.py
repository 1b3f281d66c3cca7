"""What every backbone reads at each event: e_t = [q(i_t) ; E_rating(r_t) ; φ(τ_t, τ_t − τ_{t−1})]."""

from __future__ import annotations

import torch
from torch import nn

from models.data.features import EVENT_FEATURES, N_RATING_BUCKETS
from models.nn.items import ItemTower

State = tuple[torch.Tensor, ...]  # the parts of a serving state, each (1, B, size)


class EventBackbone(nn.Module):
    """The event embedding shared by the backbones, and the interface they implement."""

    def __init__(self, items: ItemTower, item_dim: int, dropout: float, rating_dim: int = 16, time_dim: int = 16):
        super().__init__()
        self.items = items
        self.rating = nn.Embedding(N_RATING_BUCKETS, rating_dim, padding_idx=0)
        self.time = nn.Linear(EVENT_FEATURES, time_dim)
        self.drop = nn.Dropout(dropout)
        self.in_dim = item_dim + rating_dim + time_dim

    def embed(self, items: torch.Tensor, ratings: torch.Tensor, event_feats: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.items(items), self.rating(ratings), self.time(event_feats)], dim=-1)
        return self.drop(e)  # (B, T, D + 32)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) right-padded events -> (B, T, H) outputs (padding positions are garbage)."""
        raise NotImplementedError

    def state_sizes(self) -> tuple[int, ...]:
        """Sizes of the parts of a serving state."""
        raise NotImplementedError

    def advance(self, state: State | None, items, ratings, event_feats) -> State:
        """Unpadded (B, T) events from `state` (None: no events yet) -> the new state."""
        raise NotImplementedError

    def output(self, state: State) -> torch.Tensor:
        """A state -> (B, H), the output after its last event."""
        raise NotImplementedError
