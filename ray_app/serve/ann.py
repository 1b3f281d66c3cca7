"""The Combiner's item index: exact (one matmul over the catalogue, the default) or an approximate
nearest-neighbour graph (HNSW, from faiss) for catalogues too large to score within the latency budget.

A concat- or sum-mode decomposer scores item i as u · q_i, the inner product of the combined user
vector with the item's vector, so the top-k is a maximum-inner-product search that an HNSW graph
answers approximately (benchmarks/ann.py measures its recall@10 against the exact top-10). A
max-mode one scores by a soft maximum over its members' inner products: each member's vector is
searched, and the union of their candidates is scored exactly (the hard maximum's top-k is always
in that union; the soft one differs from it by at most τ·log M). A mixture-mode one normalises
each dimension over the whole catalogue, which no vector search reproduces: it is refused when the
replica loads it, naming the option.

The index is built once per model version, when the replica is configured with that version, and
kept beside its item vectors (`ServedModel.indexes`); a version that a request brings first is
ranked exactly while its graph builds in a thread (`Combiner._index_for`). Explanations stay exact (per-dimension matmuls).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ray_app.serve.served_model import ServedModel, ServingSetupError


class IndexSettings(BaseModel):
    """How the Combiner finds a request's top-k items (the `index:` of the app's arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # frozen: hashable, the cache key of a built index
    kind: Literal["exact", "hnsw"] = "exact"  # exact: u @ V.T and topk; hnsw: faiss IndexHNSWFlat, inner product
    m: int = Field(32, ge=4, le=128)  # HNSW links per node: more is higher recall, more memory and build time
    ef_construction: int = Field(64, ge=8)  # candidate list while building: more is a better graph, slower build
    ef_search: int = Field(64, ge=1)  # candidate list per query: the recall/latency knob (benchmarks/ann.py)
    max_candidates: int = Field(2048, ge=1)  # a user whose k + seen exceeds this is ranked exactly
    threads: int = Field(1, ge=1)  # faiss's OpenMP threads; a replica holds a fraction of a core


class HNSWIndex:
    """An HNSW graph over items 1..N (row 0, the padding, is left out) with the inner-product metric."""

    def __init__(self, item_vecs: np.ndarray, settings: IndexSettings):
        import faiss  # only a replica that asks for the option needs the library

        faiss.omp_set_num_threads(settings.threads)  # faiss's threads would otherwise contend with Ray's workers
        self.vecs = np.ascontiguousarray(item_vecs[1:], dtype=np.float32)  # (N, D)
        self.index = faiss.IndexHNSWFlat(self.vecs.shape[1], settings.m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = settings.ef_construction
        self.index.add(self.vecs)
        self.index.hnsw.efSearch = settings.ef_search
        self.max_candidates = settings.max_candidates

    @property
    def n_items(self) -> int:
        return len(self.vecs)

    def add(self, vecs: np.ndarray) -> None:
        """(k, D) the vectors of items appended to the catalogue (added while serving): into the graph."""
        if len(vecs):
            vecs = np.ascontiguousarray(vecs, dtype=np.float32)
            self.index.add(vecs)
            self.vecs = np.concatenate([self.vecs, vecs])

    def search(self, u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """u (B, D) -> catalogue indices (B, k) and scores (B, k), best first; index 0 where fewer were found."""
        scores, ids = self.index.search(np.ascontiguousarray(u, dtype=np.float32), k)  # (B, k) each
        return ids + 1, scores  # faiss's -1 (nothing found) becomes 0, the padding

    def exact(self, u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The same answer by a matmul, for the rows the graph cannot serve."""
        scores = u @ self.vecs.T  # (B, N)
        k = min(k, scores.shape[1])
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k) the k best, unordered
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        top = np.take_along_axis(part, order, axis=1)  # (B, k) best first
        return top + 1, np.take_along_axis(scores, top, axis=1)

    def top(self, u: np.ndarray, seen: list[np.ndarray | None], k: int) -> tuple[list[list[int]], list[list[float]]]:
        """Per row: the k best items not in its `seen` (None: nothing excluded) -> indices and scores.

        The graph is asked for k + |seen| candidates, so that k remain after the seen ones are
        dropped; a row needing more than `max_candidates` is ranked by a matmul instead, and so is a
        row the graph answered short (HNSW may return fewer results than asked, the rest -1, when
        the ask is large against efSearch), so every row gets min(k, unseen items) items.
        """
        k = min(k, self.n_items)
        need = [min(k + (len(s) if s is not None else 0), self.n_items) for s in seen]
        graph = [b for b, n in enumerate(need) if n <= self.max_candidates]
        matmul = [b for b, n in enumerate(need) if n > self.max_candidates]
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for rows, find in ((graph, self.search), (matmul, self.exact)):
            if rows:
                ids, scores = find(u[rows], max(need[b] for b in rows))
                found.update({b: (ids[j], scores[j]) for j, b in enumerate(rows)})
        indices, values = [], []
        for b, s in enumerate(seen):
            s = np.zeros(0, np.int64) if s is None else np.asarray(s)
            ids, scores = found[b]
            keep, unseen = ids > 0, self.n_items
            if len(s):  # a request without exclude_seen skips the set work
                keep &= ~np.isin(ids, s)
                unseen -= len(np.unique(s[(s >= 1) & (s <= self.n_items)]))
            if keep.sum() < min(k, unseen):  # the graph answered short: the exact answer instead
                ids, scores = (x[0] for x in self.exact(u[b : b + 1], need[b]))
                keep = ~np.isin(ids, s)
            indices.append(ids[keep][:k].tolist())
            values.append(scores[keep][:k].tolist())
        return indices, values


CANDIDATES_PER_QUERY = 2  # max mode: each search of a request asks for this many times k


def pooled_top(
    index: HNSWIndex, U: np.ndarray, log_alpha: np.ndarray, tau: float, seen: list[np.ndarray | None], k: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Max mode: U (B, M, D) the members' vectors, log α (B, M) -> per row the k best unseen items by
    s(i) = τ · log Σ_m exp((u_m · q_i + log α_m) / τ), among the candidates of M + 1 searches: each
    member's own top k (where one interest dominates, s is its score) and the top k of their
    α-weighted mean (where several agree: at τ = 1, s is at least the α-weighted mean score)."""
    B, M, D = U.shape
    w = np.exp(log_alpha - log_alpha.max(1, keepdims=True))
    mean = (w[:, :, None] * U).sum(1) / w.sum(1)[:, None]  # (B, D)
    queries = np.concatenate([U, mean[:, None]], axis=1).reshape(B * (M + 1), D)
    cand, _ = index.top(queries, [s for s in seen for _ in range(M + 1)], CANDIDATES_PER_QUERY * k)
    indices, values = [], []
    for b in range(B):
        rows = cand[b * (M + 1) : (b + 1) * (M + 1)]
        ids = np.unique(np.concatenate([np.asarray(c, np.int64) for c in rows]))
        if not len(ids):
            indices.append([])
            values.append([])
            continue
        logits = U[b] @ index.vecs[ids - 1].T + log_alpha[b][:, None]  # (M, C)
        m = logits.max(0)
        s = m + tau * np.log(np.exp((logits - m) / tau).sum(0))  # (C,)
        order = np.argsort(-s, kind="stable")[:k]
        indices.append(ids[order].tolist())
        values.append(s[order].tolist())
    return indices, values


def check_servable(served: ServedModel, settings: IndexSettings) -> None:
    """ServingSetupError when `settings` cannot serve this checkpoint's scores."""
    combine = served.model.cfg.combine
    if settings.kind != "exact" and combine == "mixture":
        raise ServingSetupError(
            f"{served.path}: index.kind {settings.kind!r} searches by the inner product u · q_i, but this "
            f"checkpoint combines its dimensions as a {combine!r} (a log-sum-exp over dimensions, which no "
            "vector search reproduces); serve it with index.kind 'exact'"
        )


def item_index(served: ServedModel, settings: IndexSettings) -> HNSWIndex | None:
    """The index `settings` asks for over this model version's items, built on the first call; None for exact."""
    if settings.kind == "exact":
        return None
    if settings not in served.indexes:
        check_servable(served, settings)
        with served.lock:  # the items added while serving so far (ray_app/serve/catalogue.py)
            vecs = served.item_vecs.detach().cpu().numpy()  # (N+1, D)
        index = HNSWIndex(vecs, settings)  # outside the lock: a build takes seconds
        with served.lock:  # items added during the build join the graph before anyone searches it
            index.add(served.item_vecs.detach().cpu().numpy()[len(vecs) :])
            served.indexes.setdefault(settings, index)
    return served.indexes[settings]


def user_vectors(served: ServedModel, H: torch.Tensor, ctx: torch.Tensor, intent: torch.Tensor | None):
    """The combined user vectors u (B, D) the exact path multiplies with the items, and the gates α (B, K)."""
    u, _, alpha = served.model.user_vectors(H, ctx, intent)
    return served.model.items.user_side(u).cpu().numpy(), alpha


def indexed_top(
    served: ServedModel, index: HNSWIndex, H, ctx, intent, seen: list[np.ndarray | None], k: int
) -> tuple[list[list[int]], list[list[float]], torch.Tensor]:
    """The graph's answer for a batch of requests -> (indices, scores, gates α (B, M)), either mode."""
    m = served.model
    if not m.pooled:
        u, alpha = user_vectors(served, H, ctx, intent)
        return (*index.top(u, seen, k), alpha)
    U, log_alpha, _ = m.members(H, ctx, intent)
    U = m.items.user_side(U)  # (B, M, D[+1]): a 1 meets the items' bias
    top = pooled_top(index, U.cpu().numpy(), log_alpha.cpu().numpy(), m.cfg.tau, seen, k)
    return (*top, log_alpha.exp())
