"""The dynamic interest decomposition and composition model (DESIGN §2), composed of its parts:

    events ─► backbone (lstm | gru | transformer) ─► h_t ─┐
    items consumed ─► decayed means m_t^(λ) ──────────────┴► z_t = [h_t; m_t^(λ)…]
    z_t ─► heads I_{t,k} (models/nn/interests.py) ─► gates α_{t,m}(I, context, words)

How the dimensions rank (`combine`):
- "max" — per-dimension scoring: each member m of the ranking has its own user vector u_m (a
  dimension: u_k = W_k I_k; the base: u_0 = W z_t, the backbone's own readout; the words, when
  given: u_w = W_w z(words)), and s(i) = τ · log Σ_m exp((u_m·q_i + log α_m)/τ), a soft maximum
  over the interests, trained with one softmax over s. An item ranks high when any active
  interest wants it. With no dimension (K = 0) the model is the backbone alone.
- "concat" / "sum" — the seed's literal form: u_t = W z_t + W_o[α_1 I_1; …; α_K I_K] (or
  W_o Σ α_k I_k), one user vector whose gates can only rescale its parts; s(i) = u_t · q_i.
- "mixture" — p(i) = Σ_k α_k softmax_i(u_k · q_i): α is the share of the next event each
  dimension explains (what the synthetic data plants).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.nn.backbones import BACKBONES, build_backbone
from models.nn.interests import Interests, separation_penalty
from models.nn.items import ItemTower, last_position
from models.nn.losses import next_item_loss, pooled_softmax_ce, seen_pairs

NAMED_DIMENSIONS = ("topic", "sentiment", "time")
COMBINES = ("max", "concat", "sum", "mixture")


@dataclass
class DecomposerConfig:
    n_items: int = 0  # catalogue size; item ids 1..n_items, 0 = padding
    n_genres: int = 1  # genre vocabulary (topic auxiliary target)
    text_dim: int = 384  # language-model embedding size (all-MiniLM-L6-v2)
    item_dim: int = 64  # D: item and user vector size
    backbone: str = "lstm"  # the sequence encoder: "lstm" | "gru" | "transformer"
    lstm_units: int = 128  # U: the backbone's width (LSTM/GRU units, the transformer's model size)
    blocks: int = 2  # transformer: self-attention blocks
    heads: int = 1  # transformer: attention heads (a divisor of lstm_units)
    dims: tuple[str, ...] = NAMED_DIMENSIONS  # named dimensions, a subset of NAMED_DIMENSIONS
    n_latent: int = 1  # unanchored dimensions added after the named ones
    dim_size: int = 32  # d: size of each I_{t,k}
    context_dim: int = 32  # size of the encoded context C_t
    combine: str = "concat"  # "max" (per-dimension scores, soft maximum) | "concat" | "sum" | "mixture"
    tau: float = 1.0  # "max": temperature of the soft maximum (→ 0: the hard maximum)
    separation: float = 0.0  # weight of the mean squared cosine between the members' user vectors
    intent_member: bool = False  # "max": the request's words are a member of their own, gated by how they fit
    aux_weight: float = 0.1  # λ (0 = purely latent dimensions)
    dropout: float = 0.5
    max_len: int = 200
    loss: str = "full"  # "full" softmax | "sampled" softmax
    n_negatives: int = 1024  # uniform negatives for the sampled softmax
    mask_seen: bool = True  # full softmax without the items already in the window (as ranking masks them)
    use_gates: bool = True  # False = context-free prior w_k only (ablation)
    scale_gates: bool = False  # concat/sum: combine K·α_k I_k, so uniform gates weigh each dimension 1, not 1/K
    residual: bool = True  # the base readout W z_t: added to the combined vector, or the pool's base member
    # z_t = [h_t; m_t^(λ) for each λ]: decayed means of the item vectors consumed (1.0 = plain mean), () = h_t alone
    profile_decays: tuple[float, ...] = (1.0, 0.98, 0.9)
    # The decayed means also added to the base readout as they are (one learned weight per λ): a path
    # from the items consumed to the score that no learned map stands in, as a transformer's residual
    # stream gives SASRec, so that a new item scores by its likeness to what the user consumed.
    profile_skip: bool = False
    use_text: bool = True  # add P·z(i) to item vectors
    id_dropout: float = 0.0  # in training, the share of items whose id vector is left out (text alone)
    # How text places an item (models/nn/items.py): the id part a residual of at most this norm (0: unbounded),
    residual_radius: float = 0.0
    item_bias: bool = False  # popularity in a bias of its own per item (one shared by the cold items)
    cold_share: float = 0.0  # in training, this share of known items is cold for an epoch (no id part, cold bias)
    freeze_text: bool = False  # the text projection fixed to the text's principal directions
    cosine_tau: float = 0.0  # > 0: scores are cosines of user and item vectors over this temperature
    new_item_bias: bool = False  # a learned bias for the items no event held before the moment scored
    dim_names: tuple[str, ...] = field(init=False)  # the dimensions, named
    member_names: tuple[str, ...] = field(init=False)  # what the gates weigh: the dimensions [, base, intent]

    def __post_init__(self):
        self.dims = tuple(self.dims)
        self.profile_decays = tuple(float(x) for x in self.profile_decays)
        if any(not 0.0 < x <= 1.0 for x in self.profile_decays):
            raise ValueError(f"profile_decays: each decay must be in (0, 1], got {list(self.profile_decays)}")
        unknown = set(self.dims) - set(NAMED_DIMENSIONS)
        if unknown:
            raise ValueError(f"dims: unknown dimension(s) {sorted(unknown)}; choose from {NAMED_DIMENSIONS}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        if self.profile_skip and not (self.profile_decays and self.residual and self.combine != "mixture"):
            raise ValueError(
                "profile_skip needs profile_decays and the base readout (residual, combine other than mixture)"
            )
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.backbone == "transformer" and self.lstm_units % self.heads:
            raise ValueError(
                f"lstm_units {self.lstm_units} (the transformer's width) is not a multiple of heads {self.heads}"
            )
        base_alone = self.combine == "max" and self.residual
        if len(self.dims) + self.n_latent < (0 if base_alone else 1):
            raise ValueError("dims/n_latent: the model needs at least one dimension (or combine=max with the base)")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.intent_member and self.combine != "max":
            raise ValueError("intent_member needs combine=max (the words are one of the pooled members)")
        if self.combine == "mixture" and self.loss != "full":
            raise ValueError("combine=mixture needs loss=full")
        if self.new_item_bias and not self.use_text:
            raise ValueError("new_item_bias needs use_text (a new item is scored by its text)")
        if self.new_item_bias and self.combine == "mixture":
            raise ValueError("new_item_bias needs one score per item: combine concat, sum or max, not mixture")
        self.dim_names = self.dims + tuple(f"latent_{j + 1}" for j in range(self.n_latent))
        extra = ("base",) * base_alone + ("intent",) * self.intent_member
        self.member_names = self.dim_names + extra

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("dim_names")
        d.pop("member_names")
        d["dims"] = list(self.dims)
        d["profile_decays"] = list(self.profile_decays)
        return d


def soft_max_(logits: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """logits (B, M, N), log α (B, M) -> log Σ_m exp(logits + log α) (B, N), overwriting logits."""
    logits.add_(log_alpha[..., None])
    top = logits.amax(-2)  # (B, N)
    return logits.sub_(top[:, None]).exp_().sum(-2).log_().add_(top)


class InterestDecomposer(nn.Module):
    def __init__(self, cfg: DecomposerConfig):
        super().__init__()
        self.cfg = cfg
        K, d, D = len(cfg.dim_names), cfg.dim_size, cfg.item_dim
        self.K = K
        self.pooled = cfg.combine in ("max", "mixture")  # per-dimension scores, not one vector
        self.items = ItemTower(
            cfg.n_items,
            D,
            cfg.text_dim,
            cfg.use_text,
            cfg.id_dropout,
            cfg.residual_radius,
            cfg.item_bias,
            cfg.cold_share,
            cfg.freeze_text,
            cfg.cosine_tau,
            cfg.new_item_bias,
        )
        self.encoder = build_backbone(
            cfg.backbone, self.items, D, cfg.lstm_units, cfg.dropout, cfg.max_len, cfg.blocks, cfg.heads
        )
        self.state_dim = cfg.lstm_units + len(cfg.profile_decays) * D  # size of the interest state z_t
        self.drop = nn.Dropout(cfg.dropout)
        self.interests = Interests(
            self.state_dim,
            K,
            d,
            cfg.context_dim,
            len(cfg.member_names),
            cfg.dims,
            cfg.n_genres,
            cfg.text_dim,
            cfg.dropout,
        )
        if self.pooled:  # u_k = W_k I_k + b_k, one projection per dimension
            self.out_w = nn.Parameter(torch.randn(K, d, D) * d**-0.5)
            self.out_b = nn.Parameter(torch.zeros(K, D))
        else:
            self.out = nn.Linear(d if cfg.combine == "sum" else K * d, D)  # W_o = [W_1 … W_K]
        # W, the base readout (the backbone's own u_0 = W z_t); the mixture scores from the dimensions alone
        self.direct = nn.Linear(self.state_dim, D) if cfg.residual and cfg.combine != "mixture" else None
        R = len(cfg.profile_decays)
        self.skip = nn.Parameter(torch.full((R,), 1.0 / R)) if cfg.profile_skip else None  # β_λ
        if cfg.intent_member:
            self.words_out = nn.Linear(cfg.text_dim, D)  # u_w: the words as a user vector
            # How the words fit: their cosine with the base vector and with each decayed profile.
            self.words_fit = nn.Linear(1 + len(cfg.profile_decays), d)
        self.register_buffer("item_genres", torch.zeros(cfg.n_items + 1, cfg.n_genres))
        self.register_buffer("log_q", torch.full((cfg.n_items + 1,), -float(np.log(max(cfg.n_items, 1)))))

    # ---- data the model carries -------------------------------------------------------------
    def set_item_data(
        self, text_emb: np.ndarray, genres: np.ndarray, counts: np.ndarray | None = None, first_seen=None
    ) -> None:
        """`first_seen` (N+1,): each item's first training event time (`items.first_seen_times`)."""
        self.items.set_text(text_emb)
        if counts is not None:
            self.items.set_known(counts)
        if first_seen is not None:
            self.items.set_first_seen(first_seen)
        self.item_genres.copy_(torch.as_tensor(genres, dtype=torch.float32))
        if counts is not None:
            p = (np.asarray(counts, dtype=np.float64) + 1.0) / (np.sum(counts) + len(counts))
            self.log_q.copy_(torch.as_tensor(np.log(p), dtype=torch.float32))

    @torch.no_grad()
    def add_items(self, text_emb: np.ndarray, genres: np.ndarray) -> range:
        """Items added while serving: (k, 384) text embeddings and (k, G) genre rows -> their indices.

        They are placed by their text alone, as any item no training event holds; the config's
        n_items grows with them (a checkpoint of this model would not be the trained one)."""
        new = self.items.append(text_emb)
        dev = self.item_genres.device
        self.item_genres = torch.cat([self.item_genres, torch.as_tensor(genres, dtype=torch.float32, device=dev)])
        self.log_q = torch.cat([self.log_q, self.log_q.new_full((len(new),), float(self.log_q.min()))])
        self.cfg.n_items += len(new)
        return new

    # ---- the interest state z_t -------------------------------------------------------------
    def states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) right-padded events -> interest states z_t (B, T, U + R·D), R = len(profile_decays).

        The profile m_t^(λ) = Σ_{s≤t} λ^{t−s} q_s / Σ_{s≤t} λ^{t−s} is a decayed mean of the item
        vectors consumed so far: λ = 1 is the whole window's mean (long-term taste), smaller λ
        weighs the recent events. A backbone state forgets; this memory does not, and costs O(1) per event.
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
        nb = len(self.encoder.state_sizes())
        h = self.encoder.output(state[:nb])  # (B, U)
        if not self.cfg.profile_decays:
            return h
        s, w = state[nb][0], state[nb + 1][0]  # (B, R·D), (B, R)
        return torch.cat([h, s / w.clamp_min(1e-12).repeat_interleave(self.cfg.item_dim, dim=-1)], dim=-1)

    def state_sizes(self) -> tuple[int, ...]:
        """Sizes of the parts of a stored state: the backbone's and, with a profile, the decayed sums and weights."""
        R = len(self.cfg.profile_decays)
        return self.encoder.state_sizes() + ((R * self.cfg.item_dim, R) if R else ())

    # ---- the members of the ranking and their gates -------------------------------------------
    def dimensions(self, z: torch.Tensor) -> torch.Tensor:
        """(…, S) -> (…, K, d) interest dimensions I_{t,k}."""
        return self.interests.dimensions(z)

    def context(self, ctx_feats: torch.Tensor, intent: torch.Tensor | None = None) -> torch.Tensor:
        return self.interests.context(ctx_feats, intent)

    def dimension_vectors(self, I: torch.Tensor) -> torch.Tensor:
        """I (…, K, d) -> u_k (…, K, D): the user vector of each dimension alone."""
        if self.pooled:
            return torch.einsum("...kd,kde->...ke", I, self.out_w) + self.out_b
        if self.cfg.combine == "sum":
            return self.out(I)  # (…, K, D)
        W = self.out.weight.unflatten(1, (self.K, self.cfg.dim_size))  # (D, K, d)
        return torch.einsum("...kd,ekd->...ke", I, W) + self.out.bias  # (…, K, D)

    def members(self, z: torch.Tensor, ctx_feats: torch.Tensor, intent: torch.Tensor | None = None):
        """Interest states z (…, S) in their context -> (U (…, M, D), log α (…, M), I (…, K, d)).

        U holds the user vector of each member of `cfg.member_names`; single-vector modes use
        only α and I (their one vector is `combined`).
        """
        I = self.dimensions(z)  # (…, K, d)
        C = self.context(ctx_feats, intent)
        U, x, present = [self.dimension_vectors(I)], [I], None
        if "base" in self.cfg.member_names:
            U.append(self.base(z).unsqueeze(-2))
            x.append(I.new_zeros(*I.shape[:-2], 1, I.shape[-1]))  # the base's gate reads the context alone
        if self.cfg.intent_member:
            words = intent if intent is not None else z.new_zeros(*z.shape[:-1], self.cfg.text_dim)
            u_w = self.words_out(words)  # (…, D)
            x.append(self.words_fit(self._fit(u_w, U[-1][..., 0, :], z)).unsqueeze(-2))
            U.append(u_w.unsqueeze(-2))
            has = words.abs().amax(-1) > 0  # (…,) a request with words
            present = torch.ones(*has.shape, len(self.cfg.member_names), dtype=torch.bool, device=z.device)
            present[..., -1] = has
        U, x = torch.cat(U, dim=-2), torch.cat(x, dim=-2)  # (…, M, D), (…, M, d)
        return U, self.interests.log_gates(x, C, present, self.cfg.use_gates), I

    def _fit(self, u_w: torch.Tensor, u_0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """How the words fit the user: cos(u_w, u_0) and cos(u_w, m^(λ)) for each profile -> (…, 1 + R)."""
        R, D = len(self.cfg.profile_decays), self.cfg.item_dim
        refs = [u_0.unsqueeze(-2)]
        if R:
            refs.append(z[..., self.cfg.lstm_units :].unflatten(-1, (R, D)))
        return F.cosine_similarity(u_w.unsqueeze(-2), torch.cat(refs, dim=-2), dim=-1)

    def combined(self, z: torch.Tensor, I: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
        """concat/sum: the one user vector u_t = W z_t + W_o[α_1 I_1; …] (…, D)."""
        alpha = log_alpha.exp()
        if self.cfg.scale_gates:
            alpha = alpha * self.K
        weighted = alpha.unsqueeze(-1) * I  # (…, K, d)
        u = self.out(weighted.sum(-2) if self.cfg.combine == "sum" else weighted.flatten(-2))
        return u + self.base(z) if self.direct is not None else u

    def base(self, z: torch.Tensor) -> torch.Tensor:
        """(…, S) -> the base readout u_0 = W z_t (…, D) [+ Σ_λ β_λ m_t^(λ) with profile_skip]."""
        u = self.direct(self.drop(z))
        if self.skip is None:
            return u
        m = z[..., self.cfg.lstm_units :].unflatten(-1, (len(self.cfg.profile_decays), self.cfg.item_dim))
        return u + torch.einsum("r,...rd->...d", self.skip, m)

    def gates(self, z: torch.Tensor, ctx_feats: torch.Tensor, intent: torch.Tensor | None = None) -> torch.Tensor:
        """(…, S) interest states in their context -> α (…, M), one weight per member."""
        return self.members(z, ctx_feats, intent)[1].exp()

    def user_vectors(self, z: torch.Tensor, ctx_feats: torch.Tensor, intent: torch.Tensor | None = None):
        """Single-vector modes: -> (u (…, D), I (…, K, d), α (…, K)), what an inner-product index searches with."""
        if self.pooled:
            raise ValueError(f"combine={self.cfg.combine} ranks with one vector per member, not one user vector")
        _, log_alpha, I = self.members(z, ctx_feats, intent)
        return self.combined(z, I, log_alpha), I, log_alpha.exp()

    def pool_scores(self, U: torch.Tensor, log_alpha: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """U (B, M, D), log α (B, M), V (N+1, D[+1]) the items' output vectors -> pooled scores
        (B, N+1) ("max": s; "mixture": log p)."""
        if self.cfg.combine == "max":
            tau = self.cfg.tau
            if not torch.is_grad_enabled():  # ranking: the same figures, without the temporaries
                return soft_max_(self.items.user_side(U) / tau @ V.T, log_alpha / tau).mul_(tau)
            logits = self.items.user_side(U) @ V.T  # (B, M, N+1)
            return tau * torch.logsumexp((logits + log_alpha[..., None]) / tau, dim=-2)
        logits = self.items.user_side(U) @ V.T  # (B, M, N+1)
        logits[..., 0] = -torch.inf  # the padding leaves every dimension's softmax
        return torch.logsumexp(torch.log_softmax(logits, -1) + log_alpha[..., None], dim=-2)

    # ---- training ---------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-item loss at every supervised position, plus λ · auxiliary losses and the separation penalty."""
        z = self.states(batch)  # (B, T, S)
        sup = batch["targets"] > 0  # (B, T)
        intent = batch.get("intent")
        U, log_alpha, I = self.members(z[sup], batch["ctx_feats"][sup], intent[sup] if intent is not None else None)
        targets = batch["targets"][sup]  # (P,)
        seen = seen_pairs(batch["items"], sup, batch["targets"]) if self.cfg.mask_seen else None
        new = self._new_items(batch["next_time"][sup]) if self.items.new_w is not None else None
        V = self.items.output(new_items=False)  # (N+1, D[+1]); the new-item bias comes with each moment
        if not self.pooled:
            u = self.items.user_side(self.combined(z[sup], I, log_alpha))
            loss = next_item_loss(u, V, targets, self.cfg.loss, self.log_q, self.cfg.n_negatives, seen, new)
        elif self.cfg.loss == "sampled":
            loss = self._sampled_pool_loss(U, log_alpha, V, targets, new)
        else:
            U1 = self.items.user_side(U)
            loss = pooled_softmax_ce(U1, V, targets, log_alpha, seen, self.cfg.combine, self.cfg.tau, new)
        parts = {"next_item": loss.item()}
        if self.cfg.separation > 0 and self.pooled:
            n = U.shape[1] - self.cfg.intent_member  # the words are kept out: they come from the request
            sep = separation_penalty(U[:, :n])
            parts["separation"] = sep.item()
            loss = loss + self.cfg.separation * sep
        if self.cfg.aux_weight > 0 and len(self.interests.aux):
            aux = self.interests.aux_losses(
                I,
                self.item_genres[targets],
                batch["next_rating"][sup],
                batch["next_log_gap"][sup],
                batch["next_hour"][sup],
            )
            parts.update({k: v.item() for k, v in aux.items()})
            loss = loss + self.cfg.aux_weight * sum(aux.values())
        return loss, parts

    def _new_items(self, times: torch.Tensor):
        """(P,) moments -> the new items of a loss (`models.nn.losses.NewItems`)."""
        return self.items.first_seen, times, self.items.new_items(times)[0], self.items.text_output()

    def _sampled_pool_loss(self, U, log_alpha, V, targets, new=None) -> torch.Tensor:
        """ "max" over in-batch targets plus uniform negatives, each pooled score corrected by log Q(i)."""
        uniform = torch.randint(1, self.cfg.n_items + 1, (self.cfg.n_negatives,), device=U.device)
        cand, inverse = torch.unique(torch.cat([targets, uniform]), return_inverse=True)  # (C,)
        s = self.pool_scores(U, log_alpha, V[cand]) - self.log_q[cand]  # (P, C)
        if new is not None:
            first, times, offsets, V_text = new
            text = self.pool_scores(U, log_alpha, V_text[cand]) - self.log_q[cand] + offsets[:, None]
            s = torch.where(first[cand][None, :] >= times[:, None], text, s)
        return F.cross_entropy(s, inverse[: len(targets)])

    # ---- serving ----------------------------------------------------------------------------
    def last_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return last_position(self.states(batch), batch["lengths"])  # (B, S)

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores (B, N+1) for the next item after each right-padded history, in its context."""
        h = self.last_hidden(batch)
        intent = batch.get("intent")
        lengths = batch["lengths"]
        ctx = last_position(batch["ctx_feats"], lengths)
        intent = last_position(intent, lengths) if intent is not None else None
        if self.items.new_w is None or "next_time" not in batch:
            return self.score_state(h, ctx, intent)
        # Each row scored at its own moment: the items new then by their text and the new-item bias.
        times = last_position(batch["next_time"], lengths)  # (B,)
        full = self.score_state(h, ctx, intent, item_vecs=self.items.output(new_items=False))
        text = self.score_state(h, ctx, intent, item_vecs=self.items.text_output())
        return self.items.at_moments(full, text, times)

    @torch.no_grad()
    def score_state(self, h, ctx_feats, intent=None, item_vecs=None) -> torch.Tensor:
        """From interest states h (B, S) and context (B, 5) [+ intent (B, 384)] -> scores (B, N+1).

        item_vecs (N+1, D[+1]): `items.output()` computed once by a caller that scores many times (serving).
        """
        return self.score_and_gates(h, ctx_feats, intent, item_vecs)[0]

    def score_and_gates(self, h, ctx_feats, intent=None, item_vecs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`score_state` and the gates α (B, M) it weighed the members with, from one pass."""
        V = self.items.output() if item_vecs is None else item_vecs
        U, log_alpha, I = self.members(h, ctx_feats, intent)
        if self.pooled:
            return self.pool_scores(U, log_alpha, V), log_alpha.exp()
        return self.items.user_side(self.combined(h, I, log_alpha)) @ V.T, log_alpha.exp()

    @torch.no_grad()
    def explain(self, h, ctx_feats, intent=None, top_k: int = 5, exclude=None, item_vecs=None) -> dict:
        """Gate weights α (B, M) and, per member, the items it alone ranks first.

        exclude (B, N+1) bool removes items (e.g. the ones a user has seen) from every member's list.
        """
        U, log_alpha, I = self.members(h, ctx_feats, intent)
        V = self.items.output() if item_vecs is None else item_vecs
        if not self.pooled:  # the dimensions' own vectors (the base readout is not gated)
            U = self.dimension_vectors(I)
        per_member = self.items.user_side(U) @ V.T  # (B, M, N+1)
        per_member[..., 0] = -torch.inf
        if exclude is not None:
            per_member = per_member.masked_fill(exclude[:, None, :], -torch.inf)
        top = per_member.topk(top_k, dim=-1)
        return {
            "dims": list(self.cfg.member_names),
            "alpha": log_alpha.exp(),
            "top_items": top.indices,
            "top_scores": top.values,
        }

    # ---- incremental state ------------------------------------------------------------------
    @torch.no_grad()
    def advance(self, state, items: torch.Tensor, ratings: torch.Tensor, event_feats: torch.Tensor):
        """Advance a state by unpadded events (B, T) -> new state; None is a new user.

        A state is the backbone's parts, each (1, B, size), and with a profile also the decayed
        sums (1, B, R·D) and weights (1, B, R): s ← λ^T s + Σ_t λ^{T−1−t} q_t, w ← λ^T w + Σ_t λ^{T−1−t}.
        """
        nb = len(self.encoder.state_sizes())
        parts = self.encoder.advance(state[:nb] if state is not None else None, items, ratings, event_feats)
        if not self.cfg.profile_decays:
            return parts
        q = self.items(items)  # (B, T, D)
        B, T, D = q.shape
        R = len(self.cfg.profile_decays)
        s = state[nb][0].view(B, R, D) if state is not None else q.new_zeros(B, R, D)
        w = state[nb + 1][0] if state is not None else q.new_zeros(B, R)
        lam = q.new_tensor(self.cfg.profile_decays)  # (R,)
        k = lam[:, None] ** torch.arange(T - 1, -1, -1, device=q.device, dtype=q.dtype)  # (R, T): λ^(T−1−t)
        s = lam[:, None] ** T * s + torch.einsum("rt,btd->brd", k, q)  # (B, R, D)
        w = lam**T * w + k.sum(1)  # (B, R)
        return (*parts, s.flatten(1)[None], w[None])
