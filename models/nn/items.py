"""The item tower shared by the decomposer and the text-aware baselines (DESIGN §2).

q_i = P·z(i) + e_i: the item's frozen language-model text z(i) projected, plus a vector learned
from its id. An item no training event holds (a cold one) has no id vector: its text alone places
it. The levers that let text place an item well (each off by default, chosen on validation cold
targets by benchmarks/cold_items.py):
- `residual_radius`: the id part is a residual bounded to this norm, so an item's own taste is a
  correction of where its text puts it, not a vector of its own;
- `item_bias`: popularity in a channel of its own, a bias b_i added to every score of item i
  (one learned bias for the cold items), so that the text projection need not learn it;
- `cold_share`: in training, a fixed share of the known items, drawn anew each epoch, is treated as
  cold on the input and the output side alike (no id part, the cold items' bias);
- `freeze_text`: P fixed to the text's principal directions instead of learned;
- `cosine_tau`: normalised vectors with a temperature, a score cos(u, q_i)/τ instead of u·q_i, so
  that no item is ranked up by the length of its vector (popular items' id parts grow long);
- `new_item_bias`: an item no training event held before the moment scored is new then, and is
  scored as serving scores an item nobody has taken yet: by its text vector alone (no id part, no
  bias of its own) plus a learned new-item bias b(t) = w_0 + w_1·log(n_new(t) / N), n_new(t) the
  number of items new at t. Training sees every item new up to its first event, so the text and
  the bias learn to place items at the moment they are cold, where otherwise an item's id vector,
  learned from its later events, would stand in. A released film or a fresh article is what many
  people take next. It reads only the times of training events before t. Serving scores after
  every training event, so there the new items are the cold ones and the added ones (text alone
  already) and the bias is a fixed column (`output`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


NEVER = torch.iinfo(torch.int64).max  # the first-seen time of an item no training event holds


def first_seen_times(items: np.ndarray, times: np.ndarray, n_items: int) -> np.ndarray:
    """(E,) training events' items and times -> (N+1,) int64 time of each item's first one (NEVER:
    none; row 0, the padding, -NEVER)."""
    first = np.full(n_items + 1, int(NEVER), dtype=np.int64)
    np.minimum.at(first, np.asarray(items, dtype=np.int64), np.asarray(times, dtype=np.int64))
    first[0] = -int(NEVER)
    return first


def known_items(counts: np.ndarray) -> torch.Tensor:
    """(N+1,) training events per item -> 1.0 where some event holds the item, 0.0 for a cold one."""
    return torch.as_tensor(np.asarray(counts) > 0, dtype=torch.float32)


class ItemTower(nn.Module):
    """Item vectors e_i + P·z(i); used as the backbone's input and, tied, as output embeddings q_i."""

    def __init__(
        self,
        n_items: int,
        dim: int,
        text_dim: int,
        use_text: bool,
        id_dropout: float = 0.0,
        residual_radius: float = 0.0,
        item_bias: bool = False,
        cold_share: float = 0.0,
        freeze_text: bool = False,
        cosine_tau: float = 0.0,
        new_item_bias: bool = False,
    ):
        super().__init__()
        self.id_dropout = id_dropout if use_text else 0.0  # in training, the share of items placed by text alone
        self.cold_share = cold_share if use_text else 0.0
        self.cosine_tau = cosine_tau  # 0: dot products; > 0: cosines over this temperature
        self.radius = residual_radius if use_text else 0.0
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=0.02)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        self.use_text = use_text
        # Frozen language-model embeddings travel with the checkpoint, so serving needs no dataset.
        self.register_buffer("text", torch.zeros(n_items + 1, text_dim))
        self.proj = nn.Linear(text_dim, dim, bias=False) if use_text else None
        self.freeze_text = freeze_text and use_text
        if self.freeze_text:
            self.proj.weight.requires_grad_(False)
        # 1 for an item some training event holds, 0 for one none does (a cold item): with text,
        # a cold item's id vector, which training only ever pushed away as a negative, is left out
        # and its text alone places it. Travels with the checkpoint; all ones until `set_known`.
        self.register_buffer("known", torch.ones(n_items + 1))
        # The known items treated as cold in this training epoch (cold_share); none outside training.
        self.register_buffer("simulated", torch.zeros(n_items + 1), persistent=False)
        self.bias = nn.Parameter(torch.zeros(n_items + 1)) if item_bias else None
        self.cold_bias = nn.Parameter(torch.zeros(())) if item_bias else None  # the bias of every cold item
        # new_item_bias: (w_0, w_1) and the time of each item's first training event (NEVER: none;
        # the padding row is never new). Travels with the checkpoint; all NEVER until `set_first_seen`.
        self.new_w = nn.Parameter(torch.zeros(2)) if new_item_bias else None
        if new_item_bias:
            first = torch.full((n_items + 1,), NEVER, dtype=torch.int64)
            first[0] = -NEVER
            self.register_buffer("first_seen", first)

    def set_text(self, text_emb: np.ndarray) -> None:
        self.text.copy_(torch.as_tensor(text_emb, dtype=torch.float32))
        if self.freeze_text:  # P: the text's first principal directions, giving vectors of about unit norm
            x = self.text[1:] - self.text[1:].mean(0)
            _, s, vh = torch.linalg.svd(x, full_matrices=False)
            D = self.proj.weight.shape[0]
            k = min(D, int((s > 1e-6 * s[0]).sum()))  # a small catalogue has fewer directions than D
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.weight[:k] = vh[:k] * (len(x) ** 0.5 / s[:k, None]) / D**0.5

    @torch.no_grad()
    def append(self, text_emb: np.ndarray) -> range:
        """Items added after training, placed by their text alone (cold: no id part, the cold items'
        bias) -> their new indices. Serving grows the catalogue with this; training does not."""
        n0, k = self.text.shape[0], len(text_emb)
        dev = self.text.device
        self.text = torch.cat([self.text, torch.as_tensor(np.asarray(text_emb), dtype=torch.float32, device=dev)])
        self.known = torch.cat([self.known, torch.zeros(k, device=dev)])
        self.simulated = torch.cat([self.simulated, torch.zeros(k, device=dev)])
        weight = torch.cat([self.emb.weight, self.emb.weight.new_zeros(k, self.emb.weight.shape[1])])
        self.emb = nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=0)
        if self.bias is not None:
            self.bias = nn.Parameter(torch.cat([self.bias, self.bias.new_zeros(k)]))
        if self.new_w is not None:
            self.first_seen = torch.cat([self.first_seen, self.first_seen.new_full((k,), NEVER)])
        return range(n0, n0 + k)

    def set_known(self, counts: np.ndarray) -> None:
        """(N+1,) training events per item -> which items keep their id vector (all, without text)."""
        if self.proj is not None:
            self.known.copy_(known_items(counts))

    def set_first_seen(self, first: np.ndarray) -> None:
        """(N+1,) time of each item's first training event (`first_seen_times`); kept with new_item_bias."""
        if self.new_w is not None:
            self.first_seen.copy_(torch.as_tensor(np.asarray(first), dtype=torch.int64))

    def train(self, mode: bool = True):
        """Entering training draws the epoch's simulated cold items (cold_share of the known ones)."""
        super().train(mode)
        if self.cold_share > 0:
            drawn = torch.rand(self.known.shape, device=self.known.device) < self.cold_share
            self.simulated.copy_((drawn & (self.known > 0) & mode).float())
        return self

    def _keep(self) -> torch.Tensor:
        """(N+1,) 1 where an item's id part counts: the known items, less the simulated cold ones and
        (id_dropout) a random share drawn at each call, so that the text learns to place an item alone."""
        keep = self.known * (1.0 - self.simulated) if self.training else self.known
        if self.training and self.id_dropout > 0:
            keep = keep * (torch.rand_like(self.known) >= self.id_dropout)
        return keep

    def _ids(self) -> torch.Tensor:
        """(N+1, D) the id parts, each bounded to `radius` when one is set."""
        e = self.emb.weight
        if self.radius > 0:
            e = e * (self.radius / e.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return e

    def all(self) -> torch.Tensor:
        """(N+1, D) vectors of every item; row 0 is padding."""
        if self.proj is None:
            return self.emb.weight
        return self._ids() * self._keep()[:, None] + self.proj(self.text)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            return self.emb(items)  # (B, T, D)
        if self.radius > 0:
            ids = self._ids()[items]
        else:
            ids = self.emb(items)
        return ids * self._keep()[items].unsqueeze(-1) + self.proj(self.text[items])

    # ---- the output side: item vectors with their bias, user vectors with a 1 to meet it ---------
    @property
    def has_bias(self) -> bool:
        """Whether item vectors carry a bias column (and user vectors a 1 to meet it)."""
        return self.bias is not None or self.new_w is not None

    def biases(self, new_items: bool = True) -> torch.Tensor | None:
        """(N+1,) each item's bias: its own for a known item, the cold items' one otherwise; with
        `new_items`, plus the new-item bias of the items no training event holds (serving's moment,
        after every training event). None without a bias column."""
        if not self.has_bias:
            return None
        b = self.known.new_zeros(self.known.shape)
        if self.bias is not None:
            keep = self.known * (1.0 - self.simulated) if self.training else self.known
            b = self.bias * keep + self.cold_bias * (1.0 - keep)
        if new_items and self.new_w is not None:  # a new item's bias is the new-item bias alone, as at a moment
            new = self.first_seen == NEVER
            b = torch.where(new, self.new_item_offsets(new.sum()[None])[0], b)
        return b

    def new_item_offsets(self, n_new: torch.Tensor) -> torch.Tensor:
        """(P,) number of items new at each moment -> (P,) their bias w_0 + w_1·log(n_new / N)."""
        N = self.first_seen.shape[0] - 1
        return self.new_w[0] + self.new_w[1] * torch.log(n_new.float().clamp_min(1.0) / N)

    def new_items(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) moments (seconds) -> ((P,) the new-item bias at each, (P,) how many items are new).

        An item is new at t when no training event before t holds it (`first_seen` ≥ t)."""
        ordered = torch.sort(self.first_seen).values
        n_new = len(ordered) - torch.searchsorted(ordered, times.contiguous(), side="left")  # (P,)
        return self.new_item_offsets(n_new), n_new

    def text_output(self) -> torch.Tensor:
        """(N+1, D[+1]) `output` of every item as if it were new: its text vector alone (of unit length
        with `cosine_tau`), a bias column of 0 (the new-item bias comes with each moment)."""
        q = self.proj(self.text)
        if self.cosine_tau > 0:
            q = nn.functional.normalize(q, dim=-1)
        return torch.cat([q, q.new_zeros(len(q), 1)], dim=1) if self.has_bias else q

    def at_moments(self, full: torch.Tensor, text: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Scores (P, N+1) against `output(new_items=False)` and against `text_output`, (P,) moments ->
        each item's score at each moment: a new item's by its text plus the new-item bias."""
        offsets, _ = self.new_items(times)
        new = self.first_seen[None, :] >= times[:, None]  # (P, N+1)
        return torch.where(new, text + offsets[:, None], full)

    def output(self, new_items: bool = True) -> torch.Tensor:
        """(N+1, D[+1]) what a user vector is scored against: [q_i, b_i] with a bias, else q_i
        (q_i of unit length with `cosine_tau`). `new_items=False` leaves the new-item bias out of
        b_i, for a caller that adds it at each moment (`at_moments`)."""
        q = self.all()
        if self.cosine_tau > 0:
            q = nn.functional.normalize(q, dim=-1)
        b = self.biases(new_items)
        return q if b is None else torch.cat([q, b[:, None]], dim=1)

    def user_side(self, u: torch.Tensor) -> torch.Tensor:
        """(…, D) user vectors -> (…, D[+1]): a 1 appended when items have a bias (u·q_i + b_i);
        with `cosine_tau`, u of length 1/τ."""
        if self.cosine_tau > 0:
            u = nn.functional.normalize(u, dim=-1) / self.cosine_tau
        if not self.has_bias:
            return u
        return torch.cat([u, u.new_ones(*u.shape[:-1], 1)], dim=-1)


def last_position(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> (B, ...) at index lengths - 1 of each row."""
    return x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]
