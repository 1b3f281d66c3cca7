"""Next-item losses over the catalogue: full softmax (default) and sampled softmax with log-Q correction."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def seen_pairs(items: torch.Tensor, sup: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs: for the r-th supervised position, each item consumed up to it except its target.

    items (B, T) the window's events, sup (B, T) supervised positions (row order = `sup` order),
    targets (B, T) the next item at each position. About B·T²/2 pairs, never a (P, N) mask.
    """
    B, T = items.shape
    row_of = torch.cumsum(sup.flatten(), 0).view(B, T) - 1  # (B, T) row of each supervised position
    upto = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()  # (t, s): s <= t
    keep = sup[:, :, None] & upto[None] & (items[:, None, :] > 0)  # (B, t, s)
    keep &= items[:, None, :] != targets[:, :, None]  # the target keeps its logit
    b, t, s_ = keep.nonzero(as_tuple=True)
    return row_of[b, t], items[b, s_]


def full_softmax_ce(
    u: torch.Tensor,
    item_vecs: torch.Tensor,
    targets: torch.Tensor,
    seen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """u (P, D) user vectors at supervised positions, item_vecs (N+1, D), targets (P,) in 1..N.

    With `seen` (see `seen_pairs`) the items a user already consumed leave the softmax, as they
    leave the history-masked ranking: the model spends no capacity pushing them down.
    """
    logits = u @ item_vecs.T  # (P, N+1)
    logits[:, 0] = -torch.inf  # never predict padding
    if seen is not None:
        logits = logits.index_put(seen, torch.tensor(-torch.inf, dtype=logits.dtype, device=logits.device))
    return F.cross_entropy(logits, targets)


def sampled_softmax_ce(
    u: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor, n_negatives: int
) -> torch.Tensor:
    """In-batch targets plus uniform negatives as candidates, logits corrected by log Q(i).

    log_q (N+1,) is the log sampling probability of each item (its training frequency), which
    removes the popularity bias that in-batch negatives bring.
    """
    n_items = item_vecs.shape[0] - 1
    uniform = torch.randint(1, n_items + 1, (n_negatives,), device=u.device)
    cand, inverse = torch.unique(torch.cat([targets, uniform]), return_inverse=True)  # (C,)
    logits = u @ item_vecs[cand].T - log_q[cand]  # (P, C)
    return F.cross_entropy(logits, inverse[: len(targets)])


def next_item_loss(
    u: torch.Tensor,
    item_vecs: torch.Tensor,
    targets: torch.Tensor,
    mode: str,
    log_q: torch.Tensor | None = None,
    n_negatives: int = 1024,
    seen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    if mode == "full":
        return full_softmax_ce(u, item_vecs, targets, seen)
    if mode == "sampled":
        return sampled_softmax_ce(u, item_vecs, targets, log_q, n_negatives)
    raise ValueError(f"loss must be 'full' or 'sampled', got {mode!r}")
