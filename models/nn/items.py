"""The item tower shared by the decomposer and the text-aware baselines (DESIGN §2): q_i = E_item(i) + P·z(i)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def known_items(counts: np.ndarray) -> torch.Tensor:
    """(N+1,) training events per item -> 1.0 where some event holds the item, 0.0 for a cold one."""
    return torch.as_tensor(np.asarray(counts) > 0, dtype=torch.float32)


class ItemTower(nn.Module):
    """Item vectors E_item(i) + P·z(i); used as LSTM input and, tied, as output embeddings q_i."""

    def __init__(self, n_items: int, dim: int, text_dim: int, use_text: bool, id_dropout: float = 0.0):
        super().__init__()
        self.id_dropout = id_dropout if use_text else 0.0  # in training, the share of items placed by text alone
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=0.02)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        self.use_text = use_text
        # Frozen language-model embeddings travel with the checkpoint, so serving needs no dataset.
        self.register_buffer("text", torch.zeros(n_items + 1, text_dim))
        self.proj = nn.Linear(text_dim, dim, bias=False) if use_text else None
        # 1 for an item some training event holds, 0 for one none does (a cold item): with text,
        # a cold item's id vector, which training only ever pushed away as a negative, is left out
        # and its text alone places it. Travels with the checkpoint; all ones until `set_known`.
        self.register_buffer("known", torch.ones(n_items + 1))

    def set_text(self, text_emb: np.ndarray) -> None:
        self.text.copy_(torch.as_tensor(text_emb, dtype=torch.float32))

    def set_known(self, counts: np.ndarray) -> None:
        """(N+1,) training events per item -> which items keep their id vector (all, without text)."""
        if self.proj is not None:
            self.known.copy_(known_items(counts))

    def _keep(self) -> torch.Tensor:
        """(N+1,) 1 where an item's id vector counts: the known items, less a random `id_dropout`
        share of them in training, so that the text part learns to place an item on its own."""
        if not (self.training and self.id_dropout > 0):
            return self.known
        return self.known * (torch.rand_like(self.known) >= self.id_dropout)

    def all(self) -> torch.Tensor:
        """(N+1, D) vectors of every item; row 0 is padding."""
        if self.proj is None:
            return self.emb.weight
        return self.emb.weight * self._keep()[:, None] + self.proj(self.text)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        out = self.emb(items)  # (B, T, D)
        if self.proj is not None:
            out = out * self._keep()[items].unsqueeze(-1) + self.proj(self.text[items])
        return out


def last_position(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> (B, ...) at index lengths - 1 of each row."""
    return x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]
