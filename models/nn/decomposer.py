"""The dynamic interest decomposition and composition model (DESIGN §2).

h_t = LSTM(e_≤t);  z_t = [h_t; m_t^(λ) for each λ] (decayed means of the item vectors consumed);
I_{t,k} = f_k(z_t) ∈ R^d;  α_{t,k} = softmax_k(log w_k + g(I_{t,k}, C_t));
Î_t = [α_1 I_1; …; α_K I_K] (concat) or Σ_k α_k I_k (sum);  u_t = W z_t + W_o Î_t (W: the residual
readout, on by default);  s(i) = u_t · q_i.
Named dimensions are anchored by auxiliary predictions of the next event from I_{t,k} alone.

A third combine mode, "mixture", makes α a probability over dimensions:
p(i) = Σ_k α_k softmax_i(u_{t,k} · q_i) with u_{t,k} = W_k I_{t,k}. In concat mode a dimension
can carry a negative preference, so a gate weight going *down* can mean its items going up;
in mixture mode α_k is the share of the next event explained by dimension k, which is what
the synthetic data plants. It costs K softmaxes over the catalogue per position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.data.features import CONTEXT_FEATURES, N_HOUR_BUCKETS, N_RATING_BUCKETS
from models.nn.losses import next_item_loss, seen_pairs
from models.nn.sequence import EventLSTM, ItemTower, last_position

NAMED_DIMENSIONS = ("topic", "sentiment", "time")


@dataclass
class DecomposerConfig:
    n_items: int = 0  # catalogue size; item ids 1..n_items, 0 = padding
    n_genres: int = 1  # genre vocabulary (topic auxiliary target)
    text_dim: int = 384  # language-model embedding size (all-MiniLM-L6-v2)
    item_dim: int = 64  # D: item and user vector size
    lstm_units: int = 128  # U
    dims: tuple[str, ...] = NAMED_DIMENSIONS  # named dimensions, a subset of NAMED_DIMENSIONS
    n_latent: int = 1  # unanchored dimensions added after the named ones
    dim_size: int = 32  # d: size of each I_{t,k}
    context_dim: int = 32  # size of the encoded context C_t
    combine: str = "concat"  # "concat" | "sum" | "mixture"
    aux_weight: float = 0.1  # λ (0 = purely latent dimensions)
    dropout: float = 0.5
    max_len: int = 200
    loss: str = "full"  # "full" softmax | "sampled" softmax
    n_negatives: int = 1024  # uniform negatives for the sampled softmax
    mask_seen: bool = True  # full softmax without the items already in the window (as ranking masks them)
    use_gates: bool = True  # False = context-free prior w_k only (ablation)
    scale_gates: bool = False  # combine K·α_k I_k: uniform gates weigh each dimension 1, not 1/K
    residual: bool = True  # u_t = W z_t + W_o[α_1 I_1; …]: the dimensions add to a direct readout
    # z_t = [h_t; m_t^(λ) for each λ]: decayed means of the item vectors consumed (1.0 = plain mean), () = h_t alone
    profile_decays: tuple[float, ...] = (1.0, 0.98, 0.9)
    use_text: bool = True  # add P·z(i) to item vectors
    id_dropout: float = 0.0  # in training, the share of items whose id vector is left out (text alone)
    dim_names: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        self.dims = tuple(self.dims)
        self.profile_decays = tuple(float(x) for x in self.profile_decays)
        if any(not 0.0 < x <= 1.0 for x in self.profile_decays):
            raise ValueError(f"profile_decays: each decay must be in (0, 1], got {list(self.profile_decays)}")
        unknown = set(self.dims) - set(NAMED_DIMENSIONS)
        if unknown:
            raise ValueError(f"dims: unknown dimension(s) {sorted(unknown)}; choose from {NAMED_DIMENSIONS}")
        if len(self.dims) + self.n_latent < 1:
            raise ValueError("dims/n_latent: the model needs at least one dimension")
        if self.combine not in ("concat", "sum", "mixture"):
            raise ValueError(f"combine must be 'concat', 'sum' or 'mixture', got {self.combine!r}")
        self.dim_names = self.dims + tuple(f"latent_{j + 1}" for j in range(self.n_latent))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("dim_names")
        d["dims"] = list(self.dims)
        d["profile_decays"] = list(self.profile_decays)
        return d


class InterestDecomposer(nn.Module):
    def __init__(self, cfg: DecomposerConfig):
        super().__init__()
        self.cfg = cfg
        K, d, c = len(cfg.dim_names), cfg.dim_size, cfg.context_dim
        self.K = K
        self.items = ItemTower(cfg.n_items, cfg.item_dim, cfg.text_dim, cfg.use_text, cfg.id_dropout)
        self.encoder = EventLSTM(self.items, cfg.item_dim, cfg.lstm_units, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        state = cfg.lstm_units + len(cfg.profile_decays) * cfg.item_dim  # size of the interest state z_t
        self.heads = nn.Linear(state, K * d)  # K independent linear heads f_k
        # Context C_t: moment features plus, when given, the projected intent text.
        self.ctx = nn.Linear(CONTEXT_FEATURES, c)
        self.intent = nn.Linear(cfg.text_dim, c, bias=False)
        # Gate g(I_k, C) = v_k · tanh(A_k I_k + B_k C); one small MLP per dimension.
        self.gate_a = nn.Parameter(torch.randn(K, d, c) * d**-0.5)
        self.gate_b = nn.Parameter(torch.randn(K, c, c) * c**-0.5)
        self.gate_v = nn.Parameter(torch.zeros(K, c))
        self.log_prior = nn.Parameter(torch.zeros(K))  # log w_k (softmax-normalised)
        self.out = nn.Linear(d if cfg.combine == "sum" else K * d, cfg.item_dim)  # W_o = [W_1 … W_K]
        # W, the residual readout (concat and sum modes; the mixture scores from the dimensions alone)
        self.direct = nn.Linear(state, cfg.item_dim) if cfg.residual and cfg.combine != "mixture" else None
        # Auxiliary heads anchoring the named dimensions.
        self.aux = nn.ModuleDict()
        if "topic" in cfg.dims:
            self.aux["topic"] = nn.Linear(d, cfg.n_genres)
        if "sentiment" in cfg.dims:
            self.aux["sentiment"] = nn.Linear(d, N_RATING_BUCKETS)
        if "time" in cfg.dims:
            self.aux["time"] = nn.Linear(d, 1 + N_HOUR_BUCKETS)
        self.register_buffer("item_genres", torch.zeros(cfg.n_items + 1, cfg.n_genres))
        self.register_buffer("log_q", torch.full((cfg.n_items + 1,), -float(np.log(max(cfg.n_items, 1)))))

    # ---- data the model carries -------------------------------------------------------------
    def set_item_data(self, text_emb: np.ndarray, genres: np.ndarray, counts: np.ndarray | None = None) -> None:
        self.items.set_text(text_emb)
        if counts is not None:
            self.items.set_known(counts)
        self.item_genres.copy_(torch.as_tensor(genres, dtype=torch.float32))
        if counts is not None:
            p = (np.asarray(counts, dtype=np.float64) + 1.0) / (np.sum(counts) + len(counts))
            self.log_q.copy_(torch.as_tensor(np.log(p), dtype=torch.float32))

    # ---- the pieces of the forward pass -----------------------------------------------------
    def states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) right-padded events -> interest states z_t (B, T, U + R·D), R = len(profile_decays).

        The profile m_t^(λ) = Σ_{s≤t} λ^{t−s} q_s / Σ_{s≤t} λ^{t−s} is a decayed mean of the item
        vectors consumed so far: λ = 1 is the whole window's mean (long-term taste), smaller λ
        weighs the recent events. An LSTM state forgets; this memory does not, and costs O(1) per event.
        """
        h = self.encoder(batch)  # (B, T, U)
        if not self.cfg.profile_decays:
            return h
        q = self.items(batch["items"])  # (B, T, D)
        t = torch.arange(q.shape[1], device=q.device)
        lag = (t[:, None] - t[None, :]).to(q.dtype)  # (T, T): t − s
        lam = q.new_tensor(self.cfg.profile_decays)[:, None, None]  # (R, 1, 1)
        W = torch.where(lag >= 0, lam ** lag.clamp_min(0), 0.0)  # (R, T, T): λ^(t−s) for s ≤ t
        m = torch.einsum("rts,bsd->btrd", W, q) / W.sum(-1).T[None, :, :, None]  # (B, T, R, D)
        return torch.cat([h, m.flatten(-2)], dim=-1)

    def interest_state(self, state) -> torch.Tensor:
        """A state from `advance` -> z (B, U + R·D), what `states` gives at the last event."""
        h = state[0][0]  # (B, U)
        if not self.cfg.profile_decays:
            return h
        s, w = state[2][0], state[3][0]  # (B, R·D), (B, R)
        D = self.cfg.item_dim
        return torch.cat([h, s / w.clamp_min(1e-12).repeat_interleave(D, dim=-1)], dim=-1)

    def state_sizes(self) -> tuple[int, ...]:
        """Sizes of the parts of a stored state: (h, c) and, with a profile, the decayed sums and weights."""
        U, R = self.cfg.lstm_units, len(self.cfg.profile_decays)
        return (U, U) if not R else (U, U, R * self.cfg.item_dim, R)

    def dimensions(self, h: torch.Tensor) -> torch.Tensor:
        """(…, U) -> (…, K, d) interest dimensions I_{t,k}."""
        return self.heads(self.drop(h)).unflatten(-1, (self.K, self.cfg.dim_size))

    def context(self, ctx_feats: torch.Tensor, intent: torch.Tensor | None = None) -> torch.Tensor:
        """(…, 5) moment features and optional (…, 384) intent embeddings -> (…, c)."""
        z = self.ctx(ctx_feats)
        if intent is not None:
            z = z + self.intent(intent)
        return torch.tanh(z)

    def gates(self, I: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """I (…, K, d), C (…, c) -> α (…, K)."""
        prior = torch.log_softmax(self.log_prior, 0)  # (K,)
        if not self.cfg.use_gates:
            return torch.softmax(prior, 0).expand(I.shape[:-1])
        hid = torch.einsum("...kd,kdc->...kc", I, self.gate_a) + torch.einsum("...c,kcj->...kj", C, self.gate_b)
        g = (torch.tanh(hid) * self.gate_v).sum(-1)  # (…, K)
        return torch.softmax(prior + g, dim=-1)

    def combine(self, I: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """I (…, K, d), α (…, K) -> u (…, D) (concat and sum modes)."""
        if self.cfg.scale_gates:
            alpha = alpha * self.K
        weighted = alpha.unsqueeze(-1) * I  # (…, K, d)
        if self.cfg.combine == "sum":
            return self.out(weighted.sum(-2))  # (…, d) -> (…, D)
        return self.out(weighted.flatten(-2))  # (…, K·d) -> (…, D)

    def dimension_vectors(self, I: torch.Tensor) -> torch.Tensor:
        """I (…, K, d) -> u_k (…, K, D): the user vector of each dimension alone."""
        if self.cfg.combine == "sum":
            return self.out(I)  # (…, K, D)
        W = self.out.weight.unflatten(1, (self.K, self.cfg.dim_size))  # (D, K, d)
        return torch.einsum("...kd,ekd->...ke", I, W) + self.out.bias  # (…, K, D)

    def mixture_log_probs(
        self,
        I: torch.Tensor,
        alpha: torch.Tensor,
        item_vecs: torch.Tensor,
        seen: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """log Σ_k α_k softmax(u_k · q) -> (P, N+1) log-probabilities over the catalogue.

        `seen` (row, item) pairs (see `seen_pairs`) leave every dimension's softmax, as in concat mode.
        """
        logits = self.dimension_vectors(I) @ item_vecs.T  # (P, K, N+1)
        logits[..., 0] = -1e9  # padding; finite keeps logsumexp grads finite
        if seen is not None:
            logits[seen[0], :, seen[1]] = -1e9
        return torch.logsumexp(torch.log_softmax(logits, -1) + torch.log(alpha.clamp_min(1e-12)).unsqueeze(-1), dim=1)

    def user_vectors(self, h: torch.Tensor, ctx_feats: torch.Tensor, intent: torch.Tensor | None = None):
        I = self.dimensions(h)
        alpha = self.gates(I, self.context(ctx_feats, intent))
        u = self.combine(I, alpha)  # (…, D)
        if self.direct is not None:
            u = u + self.direct(self.drop(h))
        return u, I, alpha

    # ---- training ---------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-item loss at every supervised position plus λ · auxiliary losses."""
        h = self.states(batch)  # (B, T, U[+R·D])
        sup = batch["targets"] > 0  # (B, T)
        intent = batch.get("intent")
        u, I, alpha = self.user_vectors(h[sup], batch["ctx_feats"][sup], intent[sup] if intent is not None else None)
        targets = batch["targets"][sup]  # (P,)
        seen = seen_pairs(batch["items"], sup, batch["targets"]) if self.cfg.mask_seen else None
        if self.cfg.combine == "mixture":
            log_p = self.mixture_log_probs(I, alpha, self.items.all(), seen)  # (P, N+1)
            loss = F.nll_loss(log_p, targets)
        else:
            loss = next_item_loss(u, self.items.all(), targets, self.cfg.loss, self.log_q, self.cfg.n_negatives, seen)
        parts = {"next_item": loss.item()}
        if self.cfg.aux_weight > 0 and len(self.aux):
            aux = self.aux_losses(
                I, targets, batch["next_rating"][sup], batch["next_log_gap"][sup], batch["next_hour"][sup]
            )
            parts.update({k: v.item() for k, v in aux.items()})
            loss = loss + self.cfg.aux_weight * sum(aux.values())
        return loss, parts

    def aux_losses(self, I, targets, next_rating, next_log_gap, next_hour) -> dict[str, torch.Tensor]:
        """I (P, K, d) -> one loss per named dimension, each predicted from that dimension alone."""
        out = {}
        for k, name in enumerate(self.cfg.dims):
            pred = self.aux[name](I[:, k])
            if name == "topic":
                out[name] = F.binary_cross_entropy_with_logits(pred, self.item_genres[targets])
            elif name == "sentiment":
                out[name] = F.cross_entropy(pred, next_rating)
            else:
                out[name] = F.mse_loss(pred[:, 0], next_log_gap) + F.cross_entropy(pred[:, 1:], next_hour)
        return out

    # ---- serving ----------------------------------------------------------------------------
    def last_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return last_position(self.states(batch), batch["lengths"])  # (B, U[+R·D])

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores (B, N+1) for the next item after each right-padded history, in its context."""
        h = self.last_hidden(batch)
        intent = batch.get("intent")
        lengths = batch["lengths"]
        ctx = last_position(batch["ctx_feats"], lengths)
        intent = last_position(intent, lengths) if intent is not None else None
        return self.score_state(h, ctx, intent)

    @torch.no_grad()
    def score_state(
        self,
        h: torch.Tensor,
        ctx_feats: torch.Tensor,
        intent: torch.Tensor | None = None,
        item_vecs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """From LSTM states h (B, U) and context (B, 5) [+ intent (B, 384)] -> scores (B, N+1).

        item_vecs (N+1, D): `items.all()` computed once by a caller that scores many times (serving).
        """
        return self.score_and_gates(h, ctx_feats, intent, item_vecs)[0]

    def score_and_gates(
        self,
        h: torch.Tensor,
        ctx_feats: torch.Tensor,
        intent: torch.Tensor | None = None,
        item_vecs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`score_state` and the gates α (B, K) it weighted the dimensions with, from one pass."""
        V = self.items.all() if item_vecs is None else item_vecs
        u, I, alpha = self.user_vectors(h, ctx_feats, intent)
        if self.cfg.combine == "mixture":
            return self.mixture_log_probs(I, alpha, V), alpha
        return u @ V.T, alpha

    @torch.no_grad()
    def explain(
        self,
        h: torch.Tensor,
        ctx_feats: torch.Tensor,
        intent: torch.Tensor | None = None,
        top_k: int = 5,
        exclude: torch.Tensor | None = None,
        item_vecs: torch.Tensor | None = None,
    ) -> dict:
        """Gate weights α (B, K) and, per dimension, the items that dimension alone ranks first.

        exclude (B, N+1) bool removes items (e.g. the ones a user has seen) from every dimension's list.
        """
        I = self.dimensions(h)  # (B, K, d)
        alpha = self.gates(I, self.context(ctx_feats, intent))  # (B, K)
        V = self.items.all() if item_vecs is None else item_vecs
        per_dim = self.dimension_vectors(I) @ V.T  # (B, K, N+1)
        per_dim[..., 0] = -torch.inf
        if exclude is not None:
            per_dim = per_dim.masked_fill(exclude[:, None, :], -torch.inf)
        top = per_dim.topk(top_k, dim=-1)
        return {"dims": list(self.cfg.dim_names), "alpha": alpha, "top_items": top.indices, "top_scores": top.values}

    # ---- incremental state ------------------------------------------------------------------
    @torch.no_grad()
    def advance(self, state, items: torch.Tensor, ratings: torch.Tensor, event_feats: torch.Tensor):
        """Advance a state by unpadded events (B, T) -> new state; None is a new user.

        A state is (h, c), each (1, B, U), and with a profile also the decayed sums (1, B, R·D) and
        weights (1, B, R): s ← λ^T s + Σ_t λ^{T−1−t} q_t, w ← λ^T w + Σ_t λ^{T−1−t}.
        """
        _, hc = self.encoder.run(items, ratings, event_feats, state[:2] if state is not None else None)
        if not self.cfg.profile_decays:
            return hc
        q = self.items(items)  # (B, T, D)
        B, T, D = q.shape
        R = len(self.cfg.profile_decays)
        s = state[2][0].view(B, R, D) if state is not None else q.new_zeros(B, R, D)
        w = state[3][0] if state is not None else q.new_zeros(B, R)
        lam = q.new_tensor(self.cfg.profile_decays)  # (R,)
        k = lam[:, None] ** torch.arange(T - 1, -1, -1, device=q.device, dtype=q.dtype)  # (R, T): λ^(T−1−t)
        s = lam[:, None] ** T * s + torch.einsum("rt,btd->brd", k, q)  # (B, R, D)
        w = lam**T * w + k.sum(1)  # (B, R)
        return (*hc, s.flatten(1)[None], w[None])
