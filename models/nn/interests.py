"""The decomposition and the composition's gates (DESIGN §2).

I_{t,k} = f_k(z_t) ∈ R^d (K linear heads over the interest state); C_t = tanh(A·φ(moment) + B·z(words));
g_m = v_m · tanh(A_m x_m + B_m C_t) for each member m of the ranking (a dimension, whose input
x_m is I_{t,m}; the base readout, whose input is zero; the words, whose input says how they fit);
α_{t,m} = softmax_m(log w_m + g_m) over the members present. Named dimensions are anchored by
auxiliary predictions of the next event from I_{t,k} alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.data.features import CONTEXT_FEATURES, N_HOUR_BUCKETS, N_RATING_BUCKETS


class Interests(nn.Module):
    def __init__(
        self,
        state_dim: int,
        n_dims: int,
        dim_size: int,
        context_dim: int,
        n_members: int,
        named: tuple[str, ...],
        n_genres: int,
        text_dim: int,
        dropout: float,
    ):
        super().__init__()
        K, d, c, M = n_dims, dim_size, context_dim, n_members
        self.K, self.d = K, d
        self.drop = nn.Dropout(dropout)
        self.heads = nn.Linear(state_dim, K * d) if K else None  # K independent linear heads f_k
        # Context C_t: moment features plus, when given, the projected intent text.
        self.ctx = nn.Linear(CONTEXT_FEATURES, c)
        self.intent = nn.Linear(text_dim, c, bias=False)
        # Gate g(x_m, C) = v_m · tanh(A_m x_m + B_m C); one small MLP per member.
        self.gate_a = nn.Parameter(torch.randn(M, d, c) * d**-0.5)
        self.gate_b = nn.Parameter(torch.randn(M, c, c) * c**-0.5)
        self.gate_v = nn.Parameter(torch.zeros(M, c))
        self.log_prior = nn.Parameter(torch.zeros(M))  # log w_m (softmax-normalised)
        self.named = named
        self.aux = nn.ModuleDict()
        if "topic" in named:
            self.aux["topic"] = nn.Linear(d, n_genres)
        if "sentiment" in named:
            self.aux["sentiment"] = nn.Linear(d, N_RATING_BUCKETS)
        if "time" in named:
            self.aux["time"] = nn.Linear(d, 1 + N_HOUR_BUCKETS)

    def dimensions(self, z: torch.Tensor) -> torch.Tensor:
        """(…, S) interest states -> (…, K, d) interest dimensions I_{t,k}."""
        if self.heads is None:  # no dimension: the base member ranks alone
            return z.new_zeros(*z.shape[:-1], 0, self.d)
        return self.heads(self.drop(z)).unflatten(-1, (self.K, self.d))

    def context(self, ctx_feats: torch.Tensor, intent: torch.Tensor | None = None) -> torch.Tensor:
        """(…, 5) moment features and optional (…, 384) intent embeddings -> (…, c)."""
        z = self.ctx(ctx_feats)
        if intent is not None:
            z = z + self.intent(intent)
        return torch.tanh(z)

    def log_gates(
        self, x: torch.Tensor, C: torch.Tensor, present: torch.Tensor | None = None, learned: bool = True
    ) -> torch.Tensor:
        """Member inputs x (…, M, d), context C (…, c), present (…, M) bool -> log α (…, M).

        A member that is absent (the words of a request without any) gets α = 0.
        """
        g = self.log_prior.expand(x.shape[:-1])
        if learned:
            hid = torch.einsum("...md,mdc->...mc", x, self.gate_a) + torch.einsum("...c,mcj->...mj", C, self.gate_b)
            g = g + (torch.tanh(hid) * self.gate_v).sum(-1)  # (…, M)
        if present is not None:
            g = g.masked_fill(~present, -torch.inf)
        return torch.log_softmax(g, dim=-1)

    def aux_losses(self, I, item_genres, next_rating, next_log_gap, next_hour) -> dict[str, torch.Tensor]:
        """I (P, K, d) -> one loss per named dimension, each predicted from that dimension alone."""
        out = {}
        for k, name in enumerate(self.named):
            pred = self.aux[name](I[:, k])
            if name == "topic":
                out[name] = F.binary_cross_entropy_with_logits(pred, item_genres)
            elif name == "sentiment":
                out[name] = F.cross_entropy(pred, next_rating)
            else:
                out[name] = F.mse_loss(pred[:, 0], next_log_gap) + F.cross_entropy(pred[:, 1:], next_hour)
        return out


def separation_penalty(U: torch.Tensor) -> torch.Tensor:
    """U (P, M, D) -> mean squared cosine between the M user vectors of a position (0: orthogonal)."""
    M = U.shape[1]
    if M < 2:
        return U.new_zeros(())
    Un = F.normalize(U, dim=-1)
    cos = Un @ Un.transpose(1, 2)  # (P, M, M)
    off = ~torch.eye(M, dtype=torch.bool, device=U.device)
    return cos[:, off].pow(2).mean()
