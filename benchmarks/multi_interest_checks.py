"""The mechanism checks and the intent measures of `multi_interest.py`, on its retrained models.

Each is a row of the results, named for what it asks:
- `k_ablation`: the searched decomposer against its backbone alone (no dimension: the base readout)
  widened to the same parameter count, retrained on the same seeds: does the decomposition earn it?
- `constant_gates`: the searched decomposer with its gates fixed to the learned prior (no context).
- `context_shuffled`: the retrained decomposers scored with each request's moment given to another
  user: if this costs nothing, the gates do not use the context.
- `dimension_overlap`: the mean share of two members' top-10 lists that they have in common (the
  base and the dimensions; 1: the dimensions collapsed into one).
- `clusters`: the decomposer's gain over the strongest baseline on users whose recent window spans
  two or more genre clusters, and on the others.
- `intent`: the searched decomposer trained with words (the target's phrases at a rate, a share of
  them wrong) against text retrieval and SASRec fused with it (the same words, the fusion weight
  chosen on validation), per regime of words, and intent adherence: for a fixed set of genre
  phrases, the share of each user's top 10 that carries the asked genre.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from models.data.batching import batch_builder, eval_samples, flat_ranges
from models.evaluation.evaluate import HEADLINE, evaluate, history_mask
from models.evaluation.metrics import per_user_mean, seed_user_bootstrap
from models.nn import checkpoint
from models.nn.items import last_position

# Genre phrases written once: the words, and the genres (by name, any of them) an item must carry.
GENRE_PHRASES = {
    "something light and funny": ("Comedy",),
    "a scary movie": ("Horror",),
    "an animated film for the kids": ("Animation", "Children", "Family"),
    "a romantic evening": ("Romance",),
    "a war film": ("War",),
    "a documentary": ("Documentary",),
    "a western": ("Western",),
    "a musical": ("Musical",),
}
RECENT = 10  # the recent window of the cluster check: the last events before the first test target
CLUSTERS = 8
SPAN = 3  # a window spans a cluster when at least this many of its items fall in it


def first_test_targets(split) -> np.ndarray:
    """(U,) each user's first test target (test targets are grouped by user, oldest first)."""
    return split.test_pos[np.r_[0, np.flatnonzero(np.diff(split.test_user)) + 1]]


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_backbone(model_args: dict, n_items: int, n_genres: int) -> dict:
    """The decomposer's settings with no dimension (the base readout alone) and the backbone widened
    until its parameter count is the nearest to the decomposer's."""
    target = param_count(checkpoint.build("decomposer", {**model_args, "n_items": n_items, "n_genres": n_genres}))
    alone = {**model_args, "dims": [], "n_latent": 0, "combine": "max", "tau": 1.0, "separation": 0.0}

    def count(units: int) -> int:
        return param_count(checkpoint.build("decomposer", {**alone, "lstm_units": units, "n_items": n_items}))

    units = int(model_args.get("lstm_units", 128))
    while count(units + 1) <= target:
        units += 1
    if abs(count(units + 1) - target) < abs(count(units) - target):
        units += 1
    return {**alone, "lstm_units": units, "matched_parameters": {"decomposer": target, "alone": count(units)}}


def compare_runs(a: dict, b: dict) -> dict:
    """Two sets of retrained seeds: means, ratio, the seed-and-user interval of a − b."""
    seeds = sorted(set(a) & set(b), key=int)
    ua = np.array([a[k]["user_ndcg@10"] for k in seeds])
    ub = np.array([b[k]["user_ndcg@10"] for k in seeds])
    diff = seed_user_bootstrap(ua, ub)
    return {
        "model_mean": float(ua.mean()),
        "baseline_mean": float(ub.mean()),
        "ratio": float(ua.mean() / ub.mean()),
        "difference": diff["mean"],
        "lo": diff["lo"],
        "hi": diff["hi"],
        "seeds": len(seeds),
    }


class ShuffledContext(torch.nn.Module):
    """A model whose requests carry the moment of another request of the same batch."""

    def __init__(self, model, seed: int = 0):
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def score(self, batch):
        perm = torch.randperm(len(batch["lengths"]), generator=self.gen)
        return self.model.score({**batch, "ctx_feats": batch["ctx_feats"][perm]})


def user_ndcg(model, data, split, **kw) -> list[float]:
    ev = evaluate(model, data, split, "test", **kw)
    return per_user_mean(ev["masked"][HEADLINE], ev["users"]).round(6).tolist()


def context_shuffled(paths: dict[str, str], data, split) -> dict:
    """Per seed, the test NDCG@10 with each request's moment taken from another user's request."""
    out = {}
    for seed, path in paths.items():
        model, _ = checkpoint.load(path)
        out[seed] = {"user_ndcg@10": user_ndcg(ShuffledContext(model, int(seed)), data, split)}
    return out


@torch.no_grad()
def dimension_overlap(path: str, data, split, k: int = 10, batch_size: int = 256) -> float:
    """Mean over users and over pairs of members (dimensions and base, not the words) of the share
    of their top-k lists (seen items excluded) they have in common."""
    model, _ = checkpoint.load(path)
    members = [m for m in model.cfg.member_names if m != "intent"]
    if len(members) < 2:
        return float("nan")
    targets, users = first_test_targets(split), np.arange(len(split.user_start))
    starts, ends = eval_samples(split, targets, users, model.cfg.max_len)
    builder, shares = batch_builder(data), []
    for lo in range(0, len(targets), batch_size):
        sl = slice(lo, lo + batch_size)
        ustart = split.user_start[users[sl]]
        batch = builder(starts[sl], ends[sl], ustart, supervise_all=False)
        h = model.last_hidden(batch)
        ctx = last_position(batch["ctx_feats"], batch["lengths"])
        seen = history_mask(data.items, ustart, targets[sl], data.n_items)
        top = model.explain(h, ctx, top_k=k, exclude=seen)["top_items"][:, : len(members)]  # (B, M, k)
        hit = (top[:, :, None, :, None] == top[:, None, :, None, :]).any(-1).float().mean(-1)  # (B, M, M)
        pairs = torch.triu_indices(len(members), len(members), 1)
        shares.append(hit[:, pairs[0], pairs[1]].mean(-1))
    return float(torch.cat(shares).mean())


def multi_cluster_users(data, split, seed: int = 0) -> np.ndarray:
    """(U,) True where a user's last RECENT events before the test window span two or more genre
    clusters (k-means over the items' genre vectors, SPAN items each)."""
    genres = data.item_genres.astype(np.float64)
    unit = genres / np.maximum(np.linalg.norm(genres, axis=1, keepdims=True), 1e-12)
    _, label = kmeans2(unit[1:], CLUSTERS, seed=seed, minit="++")
    label = np.r_[-1, label]  # item 0 is padding
    first_test = first_test_targets(split)
    start = np.maximum(split.user_start, first_test - RECENT)
    rows, pos = flat_ranges(start, first_test - start)
    counts = np.zeros((len(split.user_start), CLUSTERS), np.int64)
    np.add.at(counts, (rows, label[data.items[pos]]), 1)
    return (counts >= SPAN).sum(1) >= 2


def cluster_gain(model_runs: dict, base_runs: dict, multi: np.ndarray) -> dict:
    """The model's NDCG@10 gain over the baseline on multi-cluster users and on the others."""
    seeds = sorted(set(model_runs) & set(base_runs), key=int)
    ua = np.array([model_runs[k]["user_ndcg@10"] for k in seeds])
    ub = np.array([base_runs[k]["user_ndcg@10"] for k in seeds])
    out = {"users_multi": int(multi.sum()), "users_single": int((~multi).sum())}
    for name, rows in (("multi", multi), ("single", ~multi)):
        diff = seed_user_bootstrap(ua[:, rows], ub[:, rows])
        out[name] = {"difference": diff["mean"], "lo": diff["lo"], "hi": diff["hi"]}
    return out


@torch.no_grad()
def intent_adherence(model, data, split, encoder, users: np.ndarray, batch_size: int = 128) -> dict[str, float]:
    """Per phrase, the mean share of a user's top 10 (seen items excluded) that carries the asked genre,
    the request read at the user's first test target; and their mean ("all")."""
    names = list(data.genre_names)
    first = first_test_targets(split)[users]
    starts, ends = eval_samples(split, first, users, getattr(model.cfg, "max_len", 200))
    builder, out = batch_builder(data), {}
    for phrase, wanted in GENRE_PHRASES.items():
        cols = [names.index(g) for g in wanted if g in names]
        if not cols:
            continue
        carries = torch.as_tensor(data.item_genres[:, cols].sum(1) > 0)  # (N+1,)
        words = torch.as_tensor(np.asarray(encoder.encode([phrase])[0], np.float32))
        shares = []
        for lo in range(0, len(users), batch_size):
            sl = slice(lo, lo + batch_size)
            ustart = split.user_start[users[sl]]
            batch = builder(starts[sl], ends[sl], ustart, supervise_all=False)
            B, T = batch["items"].shape
            batch["intent"] = words.expand(B, T, -1).clone()
            batch["intent_mask"] = torch.ones(B, T, dtype=torch.bool)
            scores = model.score(batch).float().cpu()
            seen = history_mask(data.items, ustart, first[sl], data.n_items)
            scores = scores.masked_fill(seen, -torch.inf)
            scores[:, 0] = -torch.inf
            top = scores.topk(10, dim=1).indices
            shares.append(carries[top].float().mean(1))
        out[phrase] = float(torch.cat(shares).mean())
    out["all"] = float(np.mean([v for v in out.values()]))
    return out
