"""One batch of users ranked over the catalogue: the Combiner's work, without Serve.

`rank` is what `Combiner` runs for each batch of requests and what the batch job
(`ray_app/batch`) runs for each chunk of users, so that both give the same top-k for the same
user state, moment and options: the gates and scores of `score_and_gates` (or an HNSW index's
candidates), the padding and, when asked, the seen items excluded, `k` finite items best first,
and per dimension its own top items when an explanation is asked for.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.data.features import moment_features
from ray_app.serve.ann import HNSWIndex, indexed_top
from ray_app.serve.records import RankJob, Ranking
from ray_app.serve.served_model import ServedModel


def excluded_items(jobs: list[RankJob], n: int, dev: torch.device) -> torch.Tensor:
    """(B, n) True where a job's item may not be recommended: the padding, and its seen items if asked."""
    excluded = torch.zeros(len(jobs), n, dtype=torch.bool, device=dev)
    excluded[:, 0] = True
    for b, job in enumerate(jobs):
        seen = job.state.seen
        if job.exclude_seen and seen is not None and len(seen):
            excluded[b, torch.tensor(seen, device=dev)] = True
    return excluded


@torch.no_grad()
def rank(served: ServedModel, jobs: list[RankJob], index: HNSWIndex | None = None) -> list[Ranking]:
    """Each job's top-k (catalogue indices and scores), gates and explanation; `index` None: the exact matmul."""
    m = served.model
    dev = served.device
    H = torch.from_numpy(np.stack([job.state.h for job in jobs])).to(dev)  # (B, U)
    now = np.array([job.now for job in jobs], np.float64)
    last = np.array([job.state.last_ts if job.state.last_ts is not None else job.now for job in jobs])
    ctx = torch.from_numpy(moment_features(now, now - last)).to(dev)  # (B, 5)
    intent = None
    if any(job.intent is not None for job in jobs):
        # The intent projection has no bias, so a zero vector is the same as no intent.
        zero = np.zeros(m.cfg.text_dim, np.float32)
        stacked = np.stack([zero if job.intent is None else job.intent for job in jobs]).astype(np.float32)
        intent = torch.from_numpy(stacked).to(dev)  # (B, 384)
    kmax = min(max(job.k for job in jobs), m.cfg.n_items)
    want_explain = [b for b, job in enumerate(jobs) if job.explain]
    if index is None:
        scores, alpha = m.score_and_gates(H, ctx, intent, item_vecs=served.item_vecs)  # (B, N+1), (B, K)
        excluded = excluded_items(jobs, scores.shape[1], dev)  # (B, N+1)
        top = scores.masked_fill(excluded, -torch.inf).topk(kmax, dim=-1)
        top_indices, top_values = top.indices.cpu().tolist(), top.values.cpu().tolist()  # plain lists: fast
        excluded = excluded[want_explain]  # (E, N+1)
    else:
        seen = [job.state.seen if job.exclude_seen else None for job in jobs]
        top_indices, top_values, alpha = indexed_top(served, index, H, ctx, intent, seen, kmax)
        excluded = excluded_items([jobs[b] for b in want_explain], m.cfg.n_items + 1, dev)  # (E, N+1)
    alpha = alpha.cpu().tolist()
    expl = (
        m.explain(
            H[want_explain],
            ctx[want_explain],
            intent[want_explain] if intent is not None else None,
            top_k=kmax,
            exclude=excluded,
            item_vecs=served.item_vecs,
        )
        if want_explain
        else None
    )
    if expl is not None:
        expl = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in expl.items()}
    names = served.dim_names
    results = []
    for b, job in enumerate(jobs):
        k = job.k
        items = [(i, v) for i, v in zip(top_indices[b][:k], top_values[b][:k]) if math.isfinite(v)]
        explanation = None
        if job.explain:
            e = want_explain.index(b)
            explanation = {
                name: [
                    (int(i), float(v))
                    for i, v in zip(expl["top_items"][e, q, :k], expl["top_scores"][e, q, :k])
                    if math.isfinite(float(v))  # not an excluded item, when fewer than k remain
                ]
                for q, name in enumerate(names)
            }
        results.append(Ranking(served.version, job.state.n_events, items, dict(zip(names, alpha[b])), explanation))
    return results
