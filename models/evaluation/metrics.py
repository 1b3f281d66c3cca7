"""Full-ranking metrics over a users × items score matrix (vectorised, one path for valid and test)."""

from __future__ import annotations

import numpy as np
import torch

KS = (10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all items; ties count half (expected rank under random order).

    scores (B, N+1) with column 0 = padding; targets (B,); history (B, N+1) bool of items to
    remove from the ranking (the target itself always stays).
    """
    scores = scores.float().clone()
    scores[:, 0] = -torch.inf
    bad = torch.isnan(scores).any(1)
    if bad.any():  # NaN compares false with everything: a NaN target would rank -0.5 (NDCG 1.71)
        rows = torch.nonzero(bad).flatten()
        raise ValueError(
            f"scores hold NaN in {len(rows)} of {len(scores)} rows (first: row {int(rows[0])}); "
            "the model diverged or was fed NaN"
        )
    if history is not None:
        keep = torch.zeros_like(history)
        keep[torch.arange(len(targets)), targets] = True
        scores = scores.masked_fill(history & ~keep, -torch.inf)
    t = scores.gather(1, targets[:, None])  # (B, 1)
    greater = (scores > t).sum(1)
    ties = (scores == t).sum(1) - 1
    return greater.double() + ties.double() / 2


def rank_metrics(ranks: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-target metric values from 0-based ranks: hr@k, ndcg@k, mrr."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    out = {}
    for k in KS:
        hit = r < k
        out[f"hr@{k}"] = hit.double().numpy()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).numpy()
    out["mrr"] = (1.0 / (r + 1.0)).numpy()
    return out


def summarize(per_target: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in per_target.items()}


def per_user_mean(values: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Average per-target values within each user (for bootstrapping over users)."""
    uniq, inv = np.unique(users, return_inverse=True)
    return np.bincount(inv, weights=values) / np.bincount(inv)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of a - b over users and its bootstrap confidence interval (users resampled together)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def seed_user_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of a − b and its interval with both seeds and users resampled.

    a (Sa, U) and b (Sb, U): per-user scores of each seed of two models on the same users. Each
    replicate draws Sa seeds of a and Sb of b with replacement (the two models' seeds are
    independent runs) and U users with replacement (paired: the same users for both), so the
    interval holds the variance between training runs as well as between users.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must score the same users: {a.shape[1]} against {b.shape[1]}")
    rng = np.random.default_rng(seed)
    sa = rng.integers(0, len(a), size=(n_boot, len(a)))
    sb = rng.integers(0, len(b), size=(n_boot, len(b)))
    d = a[sa].mean(1) - b[sb].mean(1)  # (n_boot, U) per replicate's seeds
    users = rng.integers(0, a.shape[1], size=(n_boot, a.shape[1]))
    means = np.take_along_axis(d, users, axis=1).mean(1)  # (n_boot,)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {
        "mean": float(a.mean() - b.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "seeds": [len(a), len(b)],
        "users": int(a.shape[1]),
    }
