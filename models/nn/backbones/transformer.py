"""The transformer backbone: causal self-attention over the last `max_len` events.

Its serving state is that window itself (item, rating bucket and event features of each event,
right-aligned, with their count) plus the output after the last one; a new event shifts the
window and the blocks run again over it: a bounded recompute per event, as an evaluation
sample (the last `max_len` events before a target) is computed.
"""

from __future__ import annotations

import torch
from torch import nn

from models.data.features import EVENT_FEATURES
from models.nn.backbones.events import EventBackbone, State
from models.nn.items import ItemTower


class TransformerBackbone(EventBackbone):
    def __init__(
        self, items: ItemTower, item_dim: int, units: int, dropout: float, max_len: int, blocks: int, heads: int
    ):
        super().__init__(items, item_dim, dropout)
        if units % heads:
            raise ValueError(f"the transformer's width {units} is not a multiple of its {heads} heads")
        self.units, self.max_len = units, max_len
        self.inp = nn.Linear(self.in_dim, units)
        self.pos = nn.Embedding(max_len, units)
        nn.init.normal_(self.pos.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            units, heads, dim_feedforward=units, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(units)

    def encode(self, items: torch.Tensor, ratings: torch.Tensor, event_feats: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded events, T ≤ max_len -> (B, T, H); causal: padding never reaches a real position."""
        T = items.shape[1]
        if T > self.max_len:
            raise ValueError(f"a window of {T} events is longer than the transformer's max_len {self.max_len}")
        x = self.inp(self.embed(items, ratings, event_feats)) + self.pos(torch.arange(T, device=items.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=items.device)
        return self.norm(self.blocks(x, mask=causal, is_causal=True))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(batch["items"], batch["ratings"], batch["event_feats"])  # (B, T, H)

    def state_sizes(self) -> tuple[int, ...]:
        L = self.max_len
        return (L, L, L * EVENT_FEATURES, 1, self.units)  # items, ratings, features, count, output

    def advance(self, state: State | None, items, ratings, event_feats) -> State:
        B, T = items.shape
        L, F = self.max_len, EVENT_FEATURES
        if state is None:
            wi, wr = items.new_zeros(B, L), ratings.new_zeros(B, L)
            wf, n = event_feats.new_zeros(B, L, F), items.new_zeros(B)
        else:
            wi, wr = state[0][0].long(), state[1][0].long()  # (B, L) right-aligned
            wf, n = state[2][0].view(B, L, F), state[3][0][:, 0].long()
        wi = torch.cat([wi, items], 1)[:, -L:]  # (B, L): the last L events, right-aligned
        wr = torch.cat([wr, ratings], 1)[:, -L:]
        wf = torch.cat([wf, event_feats.to(wf.dtype)], 1)[:, -L:]
        n = (n + T).clamp(max=L)  # (B,)
        # Left-aligned for the blocks: row b's events sit in its last n_b columns.
        width = int(n.max())
        col = torch.arange(width, device=items.device)[None, :]  # (1, W)
        real = col < n[:, None]  # (B, W)
        idx = (col + (L - n)[:, None]).clamp(max=L - 1)  # (B, W)
        h = self.encode(
            wi.gather(1, idx) * real,
            wr.gather(1, idx) * real,
            wf.gather(1, idx[..., None].expand(-1, -1, F)) * real[..., None],
        )  # (B, W, H)
        out = h[torch.arange(B, device=h.device), n - 1]  # (B, H)
        parts = (wi.float(), wr.float(), wf.flatten(1), n[:, None].float(), out)
        return tuple(p[None] for p in parts)

    def output(self, state: State) -> torch.Tensor:
        return state[4][0]  # (B, H)
