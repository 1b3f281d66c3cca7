"""Baselines trained and evaluated by the same loop as the decomposer (DESIGN §4).

- `MostPopular`: training-set item counts.
- `SeenThenPopular`: the items of the user's window first (by popularity), then the rest by
  popularity. A trivial rule, not a model: where histories repeat items (the synthetic data) and
  the evaluation masks the other seen items, it measures how much the mask alone gives away.
- `TextRetrieval`, `PhrasePopular`: intent-aware rules for requests that carry the user's words:
  the items by the similarity of their text to the words, and the items that carry the phrase
  first, by popularity. What the decomposer with intent text has to beat; without words both
  are most-popular.
- `LSTMRec`: the decomposer's item tower and event LSTM, u_t = W h_t (no dimensions, no gates).
- `SASRec`: 2 causal self-attention blocks over item embeddings, full-softmax cross-entropy.
  With `use_text` its item vectors are the decomposer's item tower (id embedding plus the
  projected MiniLM text), and with `use_events` each input position also adds the event's
  rating and time features: the same information the decomposer sees, so that a difference
  between the two is the architecture's, not the inputs'.
- `GRU4Rec`: a GRU over item-id embeddings alone (no text, ratings or time), full-softmax
  cross-entropy with tied input/output embeddings, the form recent re-evaluations train it in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from models.data.features import EVENT_FEATURES, N_RATING_BUCKETS
from models.nn.losses import next_item_loss, seen_pairs
from models.nn.backbones import LSTMBackbone
from models.nn.items import ItemTower, last_position


class _ItemDataMixin:
    def set_item_data(
        self, text_emb: np.ndarray, genres: np.ndarray, counts: np.ndarray | None = None, first_seen=None
    ) -> None:
        if hasattr(self, "items") and isinstance(self.items, ItemTower):
            self.items.set_text(text_emb)
            if counts is not None:
                self.items.set_known(counts)
            if first_seen is not None:
                self.items.set_first_seen(first_seen)
        if counts is not None:
            p = (np.asarray(counts, dtype=np.float64) + 1.0) / (np.sum(counts) + len(counts))
            self.log_q.copy_(torch.as_tensor(np.log(p), dtype=torch.float32))


class _RecurrentReadout:
    """Next-item loss and scores of a recurrent model read out as u_t = W h_t (the LSTM and GRU4Rec).

    The model provides `hidden(batch)` (B, T, H), `item_vectors()` (N+1, D), `out` and `drop`.
    """

    def forward(self, batch):
        h = self.hidden(batch)  # (B, T, H)
        sup = batch["targets"] > 0
        u = self.out(self.drop(h[sup]))  # (P, D)
        seen = seen_pairs(batch["items"], sup, batch["targets"]) if self.cfg.mask_seen else None
        loss = next_item_loss(
            u, self.item_vectors(), batch["targets"][sup], self.cfg.loss, self.log_q, self.cfg.n_negatives, seen
        )
        return loss, {"next_item": loss.item()}

    @torch.no_grad()
    def score(self, batch):
        h = last_position(self.hidden(batch), batch["lengths"])  # (B, H)
        return self.out(h) @ self.item_vectors().T  # (B, N+1)


@dataclass
class PopularityConfig:
    n_items: int = 0  # catalogue size

    def to_dict(self) -> dict:
        return asdict(self)


class MostPopular(_ItemDataMixin, nn.Module):
    def __init__(self, cfg: PopularityConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("log_q", torch.zeros(cfg.n_items + 1))

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.log_q.expand(len(batch["lengths"]), -1)  # (B, N+1)

    def ahead(self, scores: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Popularity scores (B, N+1) with the `first` items (bool) ranked above all others, their own
        order kept. The lift is the spread of log popularity plus one: a large constant would round
        away the small popularity differences in float32."""
        lift = float(self.log_q.max() - self.log_q.min()) + 1.0
        return scores + lift * first


class SeenThenPopular(MostPopular):
    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = self.log_q.expand(len(batch["lengths"]), -1).clone()  # (B, N+1)
        seen = torch.zeros_like(scores, dtype=torch.bool)
        seen.scatter_(1, batch["items"], True)  # (B, T) item ids, 0 = padding
        seen[:, 0] = False
        return self.ahead(scores, seen)


class _IntentRule(MostPopular):
    """Untrained rules over the intent of the last position (B rows; no intent: most-popular)."""

    def set_intents(self, table) -> None:
        """The phrases of each item and their embeddings (`models.data.batching.IntentTable`)."""
        emb = torch.as_tensor(np.asarray(table.emb, dtype=np.float32))  # (P, 384)
        member = torch.zeros(self.cfg.n_items + 1, len(emb), dtype=torch.bool)  # (N+1, P)
        counts = np.diff(table.offsets)[: self.cfg.n_items + 1]
        rows = np.repeat(np.arange(len(counts)), counts)
        member[torch.as_tensor(rows), torch.as_tensor(table.ids[: len(rows)].astype(np.int64))] = True
        self.phrase_emb, self.member = emb, member

    def set_item_data(self, text_emb, genres, counts=None, first_seen=None) -> None:
        super().set_item_data(text_emb, genres, counts, first_seen)
        t = torch.as_tensor(np.asarray(text_emb, dtype=np.float32))
        self.text = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (N+1, 384)

    def last_intent(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, 384) the intent vector at each row's last position, (B,) whether it has one."""
        B = len(batch["lengths"])
        if "intent" not in batch:
            return torch.zeros(B, self.text.shape[1]), torch.zeros(B, dtype=torch.bool)
        last = batch["lengths"] - 1
        rows = torch.arange(B)
        return batch["intent"][rows, last].float(), batch["intent_mask"][rows, last]


class TextRetrieval(_IntentRule):
    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pop = self.log_q.expand(len(batch["lengths"]), -1)  # (B, N+1)
        z, has = self.last_intent(batch)
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = z @ self.text.T  # (B, N+1)
        return torch.where(has[:, None], sim + 1e-6 * pop, pop)  # popularity only breaks ties


class HistoryText(_IntentRule):
    """Content-based rule: the items by the similarity of their text to the mean text of the
    window's last `HISTORY` items (no words needed; popularity breaks ties). It ranks items nobody
    has interacted with as readily as any other, which makes it the cold-start reference."""

    HISTORY = 10

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        items, lengths = batch["items"], batch["lengths"]  # (B, T), (B,)
        T = items.shape[1]
        pos = torch.arange(T)[None, :]
        recent = (pos < lengths[:, None]) & (pos >= lengths[:, None] - self.HISTORY)  # (B, T)
        profile = (self.text[items] * recent[..., None]).sum(1)  # (B, 384)
        profile = profile / profile.norm(dim=1, keepdim=True).clamp_min(1e-12)
        pop = self.log_q.expand(len(lengths), -1)
        return profile @ self.text.T + 1e-6 * pop  # (B, N+1)


class PhrasePopular(_IntentRule):
    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pop = self.log_q.expand(len(batch["lengths"]), -1).clone()  # (B, N+1)
        z, has = self.last_intent(batch)
        if not len(self.phrase_emb):
            return pop
        phrase = (z @ self.phrase_emb.T).argmax(1)  # the phrase z is (free text: the nearest)
        match = self.member[:, phrase].T & has[:, None]  # (B, N+1)
        return self.ahead(pop, match)


class FusedWithText(nn.Module):
    """A trained model's scores fused with text retrieval's for requests with words.

    s = z(model) + w · z(similarity of the words to the item text), each standardised over the
    catalogue per row; rows without words keep the model's scores. `w` is chosen on validation
    (`quality.py`), so the model gets the same words as the decomposer with intent, used the
    simplest way a team would. Not a checkpointed model: it wraps two that are.
    """

    def __init__(self, model: nn.Module, text: TextRetrieval, weight: float):
        super().__init__()
        self.model, self.text, self.weight = model, text, float(weight)
        self.cfg = model.cfg

    @staticmethod
    def _z(s: torch.Tensor) -> torch.Tensor:
        s = s[:, 1:].float()  # column 0 is padding
        z = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-12)
        return torch.nn.functional.pad(z, (1, 0))

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        base = self._z(self.model.score(batch))  # (B, N+1)
        _, has = self.text.last_intent(batch)
        sim = self._z(self.text.score(batch).to(base.device))
        return torch.where(has[:, None].to(base.device), base + self.weight * sim, base)


@dataclass
class LSTMConfig:
    n_items: int = 0  # catalogue size
    text_dim: int = 384  # language-model embedding size
    item_dim: int = 64  # item / user vector size
    lstm_units: int = 128  # LSTM units
    dropout: float = 0.2
    max_len: int = 200
    loss: str = "full"  # "full" | "sampled"
    n_negatives: int = 1024
    mask_seen: bool = False  # full softmax without the items already in the window
    use_text: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class LSTMRec(_RecurrentReadout, _ItemDataMixin, nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.items = ItemTower(cfg.n_items, cfg.item_dim, cfg.text_dim, cfg.use_text)
        self.encoder = LSTMBackbone(self.items, cfg.item_dim, cfg.lstm_units, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.lstm_units, cfg.item_dim)
        self.register_buffer("log_q", torch.zeros(cfg.n_items + 1))

    def hidden(self, batch) -> torch.Tensor:
        return self.encoder(batch)  # (B, T, U)

    def item_vectors(self) -> torch.Tensor:
        return self.items.all()  # (N+1, D)


@dataclass
class SASRecConfig:
    n_items: int = 0  # catalogue size
    hidden: int = 64  # embedding and model width
    blocks: int = 2  # self-attention blocks
    heads: int = 1
    dropout: float = 0.1
    max_len: int = 200
    loss: str = "full"  # "full" | "sampled"
    n_negatives: int = 1024
    mask_seen: bool = False  # full softmax without the items already in the window
    use_text: bool = False  # item vectors E(i) + P·z(i), as the decomposer's item tower
    use_events: bool = False  # inputs also carry the event's rating bucket and time features
    text_dim: int = 384  # language-model embedding size (with use_text)
    # With use_text, how text places an item: the decomposer's item tower and its levers (models/nn/items.py).
    residual_radius: float = 0.0
    item_bias: bool = False
    cold_share: float = 0.0
    freeze_text: bool = False
    cosine_tau: float = 0.0
    new_item_bias: bool = False

    def __post_init__(self):
        if self.new_item_bias and not self.use_text:
            raise ValueError("new_item_bias needs use_text (the item tower that carries it)")

    def to_dict(self) -> dict:
        return asdict(self)


class SASRec(_ItemDataMixin, nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.use_text:  # the decomposer's item tower, the frozen text travelling with the checkpoint
            self.items = ItemTower(
                cfg.n_items,
                cfg.hidden,
                cfg.text_dim,
                True,
                residual_radius=cfg.residual_radius,
                item_bias=cfg.item_bias,
                cold_share=cfg.cold_share,
                freeze_text=cfg.freeze_text,
                cosine_tau=cfg.cosine_tau,
                new_item_bias=cfg.new_item_bias,
            )
        else:
            self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=0)
        if cfg.use_events:
            self.rating_emb = nn.Embedding(N_RATING_BUCKETS, cfg.hidden, padding_idx=0)
            self.event_proj = nn.Linear(EVENT_FEATURES, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden,
            cfg.heads,
            dim_feedforward=cfg.hidden,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.register_buffer("log_q", torch.zeros(cfg.n_items + 1))
        if not cfg.use_text:
            nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def item_vectors(self) -> torch.Tensor:
        """(N+1, H) input and output vectors of every item (tied); row 0 is padding."""
        return self.items.all() if self.cfg.use_text else self.item_emb.weight

    def output_vectors(self, new_items: bool = True) -> torch.Tensor:
        """(N+1, H[+1]) what a position's vector is scored against (the items' bias, when they have one;
        `new_items=False`: without the new-item bias, which the caller adds at each moment)."""
        return self.items.output(new_items) if self.cfg.use_text else self.item_emb.weight

    def _moments(self) -> bool:
        """Whether scores take the new-item bias at each position's moment."""
        return self.cfg.use_text and self.items.new_w is not None

    def user_side(self, h: torch.Tensor) -> torch.Tensor:
        return self.items.user_side(h) if self.cfg.use_text else h

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) right-padded events -> (B, T, H); causal attention keeps padding out of real positions."""
        items = batch["items"]
        T = items.shape[1]
        pos = torch.arange(T, device=items.device)
        x = self.item_vectors()[items] * self.cfg.hidden**0.5 + self.pos_emb(pos)[None]  # (B, T, H)
        if self.cfg.use_events:
            x = x + self.rating_emb(batch["ratings"]) + self.event_proj(batch["event_feats"])
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=items.device)
        return self.norm(self.blocks(self.drop(x), mask=causal, is_causal=True))

    def forward(self, batch):
        h = self.encode(batch)
        sup = batch["targets"] > 0
        seen = seen_pairs(batch["items"], sup, batch["targets"]) if self.cfg.mask_seen else None
        new = None
        if self._moments():
            times = batch["next_time"][sup]
            new = (self.items.first_seen, times, self.items.new_items(times)[0], self.items.text_output())
        loss = next_item_loss(
            self.user_side(h[sup]),
            self.output_vectors(new_items=False),
            batch["targets"][sup],
            self.cfg.loss,
            self.log_q,
            self.cfg.n_negatives,
            seen,
            new,
        )
        return loss, {"next_item": loss.item()}

    @torch.no_grad()
    def score(self, batch):
        h = last_position(self.encode(batch), batch["lengths"])  # (B, H)
        if not (self._moments() and "next_time" in batch):
            return self.user_side(h) @ self.output_vectors().T  # (B, N+1)
        times = last_position(batch["next_time"], batch["lengths"])  # (B,) each row at its own moment
        u = self.user_side(h)
        return self.items.at_moments(u @ self.output_vectors(new_items=False).T, u @ self.items.text_output().T, times)


@dataclass
class GRU4RecConfig:
    n_items: int = 0  # catalogue size
    hidden: int = 128  # GRU units
    item_dim: int = 64  # item embedding size (tied input/output)
    dropout: float = 0.2  # on embeddings and on GRU outputs
    max_len: int = 200
    loss: str = "full"  # "full" | "sampled"
    n_negatives: int = 1024
    mask_seen: bool = False  # full softmax without the items already in the window

    def to_dict(self) -> dict:
        return asdict(self)


class GRU4Rec(_RecurrentReadout, _ItemDataMixin, nn.Module):
    def __init__(self, cfg: GRU4RecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.item_dim, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.item_dim, cfg.hidden, batch_first=True)
        self.out = nn.Linear(cfg.hidden, cfg.item_dim)
        self.register_buffer("log_q", torch.zeros(cfg.n_items + 1))

    def hidden(self, batch) -> torch.Tensor:
        """(B, T) right-padded items -> (B, T, H); padding comes after every real position."""
        h, _ = self.gru(self.drop(self.item_emb(batch["items"])))
        return h

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight  # (N+1, D), tied with the input
