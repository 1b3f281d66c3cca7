"""Next-item losses over the catalogue: full softmax (default) and sampled softmax with log-Q correction."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax_ce(u: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """u (P, D) user vectors at supervised positions, item_vecs (N+1, D), targets (P,) in 1..N."""
    logits = u @ item_vecs.T                                            # (P, N+1)
    logits[:, 0] = -torch.inf                                          # never predict padding
    return F.cross_entropy(logits, targets)


def sampled_softmax_ce(u: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor,
                       log_q: torch.Tensor, n_negatives: int) -> torch.Tensor:
    """In-batch targets plus uniform negatives as candidates, logits corrected by log Q(i).

    log_q (N+1,) is the log sampling probability of each item (its training frequency), which
    removes the popularity bias that in-batch negatives bring.
    """
    n_items = item_vecs.shape[0] - 1
    uniform = torch.randint(1, n_items + 1, (n_negatives,), device=u.device)
    cand, inverse = torch.unique(torch.cat([targets, uniform]), return_inverse=True)  # (C,)
    logits = u @ item_vecs[cand].T - log_q[cand]                       # (P, C)
    return F.cross_entropy(logits, inverse[: len(targets)])


def next_item_loss(u: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor, mode: str,
                   log_q: torch.Tensor | None = None, n_negatives: int = 1024) -> torch.Tensor:
    if mode == "full":
        return full_softmax_ce(u, item_vecs, targets)
    if mode == "sampled":
        return sampled_softmax_ce(u, item_vecs, targets, log_q, n_negatives)
    raise ValueError(f"loss must be 'full' or 'sampled', got {mode!r}")
