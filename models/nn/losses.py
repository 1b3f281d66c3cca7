"""Next-item losses over the catalogue: full softmax (default) and sampled softmax with log-Q correction.

The full softmax is computed in chunks of positions by `pooled_softmax_ce`, which also pools
several user vectors per position (the per-dimension scoring of DESIGN §2): the (positions ×
catalogue) logits are never held whole, and the gradients are formed in the same pass, so a
step costs the matmuls and a few passes over one chunk that stays in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLS = ("max", "mixture")
# The new items of a loss: (N+1,) each item's first training event time, (P,) each position's
# moment, (P,) the new-item bias at that moment, (N+1, D) the items' text-only vectors. An item no
# training event held before a position's moment is scored there by its text vector plus the
# bias, as serving scores an item nobody has taken yet (models/nn/items.py `new_items`).
NewItems = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# Rows of a chunk are chosen so that one chunk's (rows, K, N+1) logits hold about this many floats.
CHUNK_ELEMENTS = 1 << 20


def seen_pairs(items: torch.Tensor, sup: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs: for the r-th supervised position, each item consumed up to it except its target.

    items (B, T) the window's events, sup (B, T) supervised positions (row order = `sup` order),
    targets (B, T) the next item at each position. About B·T²/2 pairs, never a (P, N) mask; the
    pairs come sorted by row.
    """
    B, T = items.shape
    row_of = torch.cumsum(sup.flatten(), 0).view(B, T) - 1  # (B, T) row of each supervised position
    upto = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()  # (t, s): s <= t
    keep = sup[:, :, None] & upto[None] & (items[:, None, :] > 0)  # (B, t, s)
    keep &= items[:, None, :] != targets[:, :, None]  # the target keeps its logit
    b, t, s_ = keep.nonzero(as_tuple=True)
    return row_of[b, t], items[b, s_]


def _seen_in(seen, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (row − lo, item) pairs of `seen` (sorted by row) whose row is in lo..hi−1."""
    if seen is None:
        return None
    rows, items = seen
    a, b = torch.searchsorted(rows, torch.tensor([lo, hi], device=rows.device)).tolist()
    return rows[a:b] - lo, items[a:b]


def _softmax_(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (softmax along `dim`, written over x; log Σ exp along `dim`). -inf entries get 0."""
    m = x.amax(dim=dim, keepdim=True)
    x.sub_(m).exp_()
    z = x.sum(dim=dim, keepdim=True)
    x.div_(z)
    return x, (m + z.log()).squeeze(dim)


class _PooledSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of the targets under a softmax over pooled per-dimension scores.

    Forward and gradients in one chunked pass (the backward only scales the stored gradients).
    """

    @staticmethod
    def forward(ctx, U, V, log_alpha, targets, seen, pool: str, tau: float, first, times, offsets, V_text):
        P, K, D = U.shape
        n = V.shape[0]
        Uf, Vf, La, Of, Vt = U.float(), V.float(), log_alpha.float(), offsets.float(), V_text.float()
        gU, gV, gA, gO = torch.empty_like(Uf), torch.zeros_like(Vf), torch.empty_like(La), torch.zeros_like(Of)
        gVt = torch.zeros_like(Vt)
        VT = Vf.T.contiguous()  # (D, N+1): the matmul reads it row by row
        VtT = Vt.T.contiguous() if first is not None else None
        total = Uf.new_zeros(())
        step = max(1, CHUNK_ELEMENTS // (K * n))
        for lo in range(0, P, step):
            hi = min(lo + step, P)
            c = hi - lo
            u, la, t = Uf[lo:hi], La[lo:hi], targets[lo:hi]  # (c, K, D), (c, K), (c,)
            rows = torch.arange(c, device=U.device)
            masked = _seen_in(seen, lo, hi)
            logits = (u.reshape(c * K, D) @ VT).view(c, K, n)  # (c, K, N+1)
            new = None
            if first is not None:  # (c, 1, N+1) the items no training event held before each moment:
                new = (first[None, :] >= times[lo:hi, None])[:, None, :]  # scored by their text alone
                logits = torch.where(new, (u.reshape(c * K, D) @ VtT).view(c, K, n), logits)
            if pool == "max":
                # s = τ · log Σ_k exp((s_k + log α_k) / τ): a soft maximum over the dimensions.
                if K == 1:
                    s, w = logits[:, 0].add_(la), None  # (c, N+1): the plain softmax's logits
                else:
                    w, lse_k = _softmax_(logits.add_(la[:, :, None]).div_(tau), dim=1)  # (c, K, N+1), (c, N+1)
                    s = lse_k.mul_(tau)  # w: each dimension's share of s_i
                if new is not None:
                    s.add_(new[:, 0] * Of[lo:hi, None])
                s[:, 0] = -torch.inf
                if masked is not None:
                    s[masked] = -torch.inf
                s_t = s[rows, t]
                p, lse = _softmax_(s)
                total += (lse - s_t).sum()
                p[rows, t] -= 1.0  # dL/ds
                if new is not None:
                    gO[lo:hi] = (p * new[:, 0]).sum(-1)
                if w is None:
                    g = p[:, None, :]  # (c, 1, N+1)
                    gA[lo:hi] = p.sum(-1, keepdim=True)
                else:
                    g = w.mul_(p[:, None, :])  # (c, K, N+1) dL/ds_k
                    gA[lo:hi] = g.sum(-1)
            else:
                # log p(t) = log Σ_k α_k softmax_i(s_k)_t: a mixture of per-dimension softmaxes.
                logits[:, :, 0] = -torch.inf
                if masked is not None:
                    logits[masked[0], :, masked[1]] = -torch.inf
                s_t = logits[rows, :, t]  # (c, K)
                p, lse = _softmax_(logits)  # (c, K, N+1), (c, K)
                joint = la + s_t - lse  # (c, K) log α_k + log p_k(t)
                total -= torch.logsumexp(joint, dim=1).sum()
                r = torch.softmax(joint, dim=1)  # (c, K) posterior share of each dimension
                g = p.mul_(r[:, :, None])  # (c, K, N+1)
                g[rows, :, t] -= r
                gA[lo:hi] = -r
            if new is None:
                g2 = g.reshape(c * K, n)
                gU[lo:hi] = (g2 @ Vf).view(c, K, D)
                gV.addmm_(g2.T, u.reshape(c * K, D))
            else:  # a new item's gradient goes to its text vector, a seen one's to its full vector
                g_new = (g * new).reshape(c * K, n)
                g2 = (g * ~new).reshape(c * K, n)
                gU[lo:hi] = (g2 @ Vf + g_new @ Vt).view(c, K, D)
                gV.addmm_(g2.T, u.reshape(c * K, D))
                gVt.addmm_(g_new.T, u.reshape(c * K, D))
        ctx.save_for_backward(gU / P, gV / P, gA / P, gO / P, gVt / P)
        ctx.dtypes = (U.dtype, V.dtype, log_alpha.dtype, offsets.dtype, V_text.dtype)
        return total / P

    @staticmethod
    def backward(ctx, grad):
        gU, gV, gA, gO, gVt = ctx.saved_tensors
        tU, tV, tA, tO, tVt = ctx.dtypes
        return (
            (grad * gU).to(tU),
            (grad * gV).to(tV),
            (grad * gA).to(tA),
            None,
            None,
            None,
            None,
            None,
            None,
            (grad * gO).to(tO),
            (grad * gVt).to(tVt),
        )


def pooled_softmax_ce(
    U: torch.Tensor,
    V: torch.Tensor,
    targets: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    seen: tuple[torch.Tensor, torch.Tensor] | None = None,
    pool: str = "max",
    tau: float = 1.0,
    new_items: NewItems | None = None,
) -> torch.Tensor:
    """Full-softmax cross-entropy with K user vectors per position.

    U (P, K, D) the user vector of each dimension, V (N+1, D) item vectors (row 0 padding, never
    predicted), targets (P,) in 1..N, log_alpha (P, K) log gate weights (None: log 1 for K = 1).
    With `seen` (see `seen_pairs`) the items a user already consumed leave the softmax, as they
    leave the history-masked ranking. pool "max": the score of item i is
    τ·log Σ_k exp((u_k·q_i + log α_k)/τ); with K = 1 and α = 1 it is u·q_i, the plain softmax.
    pool "mixture": p(i) = Σ_k α_k softmax(u_k·q)_i. `new_items` adds each position's new-item
    bias to the pooled score of the items new at its moment, each scored by its text vector ("max" only).
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if new_items is not None and pool != "max":
        raise ValueError("the new-item bias needs pool 'max' (a mixture has no one score per item)")
    if log_alpha is None:
        if U.shape[1] != 1:
            raise ValueError("log_alpha is needed for more than one user vector per position")
        log_alpha = U.new_zeros(U.shape[:2])
    if new_items is None:
        first, times, offsets, V_text = None, None, U.new_zeros(len(U)), V.new_zeros(())
    else:
        first, times, offsets, V_text = new_items
    return _PooledSoftmaxCE.apply(U, V, log_alpha, targets, seen, pool, float(tau), first, times, offsets, V_text)


def full_softmax_ce(
    u: torch.Tensor,
    item_vecs: torch.Tensor,
    targets: torch.Tensor,
    seen: tuple[torch.Tensor, torch.Tensor] | None = None,
    new_items: NewItems | None = None,
) -> torch.Tensor:
    """u (P, D) user vectors at supervised positions, item_vecs (N+1, D), targets (P,) in 1..N.

    With `seen` (see `seen_pairs`) the items a user already consumed leave the softmax, as they
    leave the history-masked ranking: the model spends no capacity pushing them down.
    """
    return pooled_softmax_ce(u[:, None, :], item_vecs, targets, seen=seen, new_items=new_items)


def sampled_softmax_ce(
    u: torch.Tensor,
    item_vecs: torch.Tensor,
    targets: torch.Tensor,
    log_q: torch.Tensor,
    n_negatives: int,
    new_items: NewItems | None = None,
) -> torch.Tensor:
    """In-batch targets plus uniform negatives as candidates, logits corrected by log Q(i).

    log_q (N+1,) is the log sampling probability of each item (its training frequency), which
    removes the popularity bias that in-batch negatives bring.
    """
    n_items = item_vecs.shape[0] - 1
    uniform = torch.randint(1, n_items + 1, (n_negatives,), device=u.device)
    cand, inverse = torch.unique(torch.cat([targets, uniform]), return_inverse=True)  # (C,)
    logits = u @ item_vecs[cand].T - log_q[cand]  # (P, C)
    if new_items is not None:
        first, times, offsets, V_text = new_items
        new = first[cand][None, :] >= times[:, None]  # (P, C)
        logits = torch.where(new, u @ V_text[cand].T - log_q[cand] + offsets[:, None], logits)
    return F.cross_entropy(logits, inverse[: len(targets)])


def next_item_loss(
    u: torch.Tensor,
    item_vecs: torch.Tensor,
    targets: torch.Tensor,
    mode: str,
    log_q: torch.Tensor | None = None,
    n_negatives: int = 1024,
    seen: tuple[torch.Tensor, torch.Tensor] | None = None,
    new_items: NewItems | None = None,
) -> torch.Tensor:
    """`new_items` (`NewItems`): the items new at each position's moment scored by their text and
    the new-item bias (models/nn/items.py)."""
    if mode == "full":
        return full_softmax_ce(u, item_vecs, targets, seen, new_items)
    if mode == "sampled":
        return sampled_softmax_ce(u, item_vecs, targets, log_q, n_negatives, new_items)
    raise ValueError(f"loss must be 'full' or 'sampled', got {mode!r}")
