"""The Combiner's HNSW option against its exact top-k: recall@10 and batch-1 latency at 60k items and beyond.

A decomposer is trained briefly (a time budget of sampled-softmax steps) on ml-latest-small, whose
users have tastes (the scale benchmark's generated data draws items by popularity alone, so every
user's top-10 there is the same few items and any index finds them). The queries are real user
vectors: the combined u at held-out test positions (the last few events of every user), the vector
the Combiner multiplies with the item vectors. The catalogues keep the model's 9.7k item vectors and
add draws from a Gaussian fitted to them (mean and full covariance), recorded as such. Per size:
an HNSW graph (ray_app/serve/ann.py, inner product) is built once; recall@10 against the exact
top-10 (exclude-seen off) and the p50/p99 latency at batch 1 of the exact matmul + topk and of the
graph search, both on one thread as in a replica, are measured at each efSearch of a sweep.

    python benchmarks/ann.py                   # -> benchmarks/results/ann.json, ann.png (about 8 min, 2 cores)
    python benchmarks/ann.py --sizes 60000 --queries 500 --train-seconds 10   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine_info import machine  # noqa: E402
from models.cli import add_settings, setting, settings_from  # noqa: E402
from models.files import write_json  # noqa: E402

RESULTS = HERE / "results"


@dataclass(frozen=True)
class AnnBenchConfig:
    data: Path = setting(Path("runs/data/ml-latest-small"), "a prepared dataset (the main job writes this one)")
    sizes: str = setting("60000,250000,1000000", "catalogue sizes, comma-separated")
    queries: int = setting(2000, "user vectors for recall (held-out test positions)")
    latency_queries: int = setting(300, "batch-1 calls timed per method and efSearch")
    train_seconds: float = setting(120.0, "training budget of the decomposer (sampled softmax)")
    max_len: int = setting(50, "training window (the model's max_len): 200 trains ~20x slower on 2 cores")
    m: int = setting(32, "HNSW links per node")
    ef_construction: int = setting(64, "HNSW build candidate list")
    ef_search: str = setting("16,32,64,128,256", "efSearch values swept, comma-separated", flag="--ef")
    build_threads: int = setting(2, "faiss threads while building (search is timed on one)")
    target_recall: float = setting(0.95, "efSearch chosen: the smallest reaching this recall@10")
    seed: int = setting(0, "random seed")
    out: Path = setting(RESULTS / "ann.json", "the JSON written (the plot beside it)")

    def ints(self, field: str) -> list[int]:
        return [int(x) for x in getattr(self, field).split(",") if x.strip()]


def train_briefly(data, split, cfg: AnnBenchConfig):
    """A decomposer trained for `train_seconds` of shuffled batches -> (model in eval mode, record)."""
    from models.data.batching import batch_builder, training_windows
    from models.training.defaults import train_config
    from models.training.loop import new_model, run_epoch

    torch.manual_seed(cfg.seed)
    model = new_model("decomposer", data, split, loss="sampled", max_len=cfg.max_len)
    tcfg = train_config("decomposer", seed=cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    windows = training_windows(split, model.cfg.max_len)
    builder, rng = batch_builder(data), np.random.default_rng(cfg.seed)
    order, steps, losses = rng.permutation(len(windows[0])), 0, []
    chunk = tcfg.batch_size * 4  # four optimizer steps between checks of the clock
    t0 = time.perf_counter()
    with tqdm(desc="train", unit="step") as bar:
        while time.perf_counter() - t0 < cfg.train_seconds:
            lo = (steps * tcfg.batch_size) % len(order)
            pick = order[lo : lo + chunk]
            losses.append(run_epoch(model, opt, builder, tuple(w[pick] for w in windows), tcfg, rng)["next_item"])
            steps += -(-len(pick) // tcfg.batch_size)
            bar.update(-(-len(pick) // tcfg.batch_size))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    record = {"steps": steps, "seconds": seconds, "batch_size": tcfg.batch_size, "sequences": steps * tcfg.batch_size}
    record.update(epochs=record["sequences"] / len(order), first_loss=losses[0], last_loss=losses[-1])
    return model.eval(), record


@torch.no_grad()
def user_vectors(model, data, split, cfg: AnnBenchConfig) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) the combined u of `queries` held-out test positions, and (Q,) their target items."""
    from models.data.batching import batch_builder, eval_samples
    from models.nn.items import last_position

    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(len(split.test_pos), size=min(cfg.queries, len(split.test_pos)), replace=False))
    targets, users = split.test_pos[rows], split.test_user[rows]
    starts, ends = eval_samples(split, targets, users, model.cfg.max_len)
    builder, out = batch_builder(data), []
    for lo in range(0, len(rows), 256):
        sl = slice(lo, lo + 256)
        batch = builder(starts[sl], ends[sl], split.user_start[users[sl]], supervise_all=False)
        h = model.last_hidden(batch)  # (B, U[+R·D])
        ctx = last_position(batch["ctx_feats"], batch["lengths"])  # (B, 5)
        out.append(model.user_vectors(h, ctx)[0])  # (B, D)
    return torch.cat(out).numpy(), data.items[targets]


def catalogue(model_vecs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n+1, D): row 0 padding, the model's items, then draws from a Gaussian fitted to them."""
    real = model_vecs[1:]
    extra = max(n - len(real), 0)
    mean, cov = real.mean(0), np.cov(real, rowvar=False)
    draws = rng.multivariate_normal(mean, cov, size=extra, method="cholesky").astype(np.float32)
    return np.concatenate([model_vecs[:1], real[:n], draws])


def exact_top(vecs: torch.Tensor, u: np.ndarray, k: int = 10) -> np.ndarray:
    """(Q, k) the exact top-k catalogue indices of every query, in chunks."""
    out = []
    for lo in range(0, len(u), 64):
        scores = torch.from_numpy(u[lo : lo + 64]) @ vecs.T  # (b, N+1)
        scores[:, 0] = -torch.inf
        out.append(scores.topk(k, dim=-1).indices)
    return torch.cat(out).numpy()


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (rows of catalogue indices)."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def timed(fn, queries: np.ndarray) -> dict:
    """p50/p99 ms of fn(one query (1, D)) over the queries, after a few warm-up calls."""
    for q in queries[:5]:
        fn(q[None])
    lat = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None])
        lat.append(time.perf_counter() - t)
    lat = np.array(lat) * 1e3
    return {"p50_ms": float(np.median(lat)), "p99_ms": float(np.quantile(lat, 0.99))}


def one_size(n: int, model_vecs: np.ndarray, u: np.ndarray, targets: np.ndarray, cfg: AnnBenchConfig) -> dict:
    import faiss

    from ray_app.serve.ann import HNSWIndex, IndexSettings

    vecs = catalogue(model_vecs, n, np.random.default_rng(cfg.seed + n))
    n_real = len(model_vecs) - 1
    V = torch.from_numpy(vecs)
    truth = exact_top(V, u)  # (Q, 10)
    settings = IndexSettings(kind="hnsw", m=cfg.m, ef_construction=cfg.ef_construction, threads=cfg.build_threads)
    t0 = time.perf_counter()
    index = HNSWIndex(vecs, settings)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)  # timed as a replica runs it

    def exact(q):
        scores = torch.from_numpy(q) @ V.T  # (1, N+1): the Combiner's exact path
        scores[:, 0] = -torch.inf
        return scores.topk(10, dim=-1)

    lat_q = u[: cfg.latency_queries]
    rec = {
        "items": n,  # catalogue indices 1..model_items are the model's, the rest Gaussian draws
        "model_items": min(n, n_real),
        "gaussian_items": max(n - n_real, 0),
        "exact_top10_share_gaussian": float(np.mean(truth > n_real)),
        "exact_top10_distinct_items": int(len(np.unique(truth))),  # over all queries: the users differ
        "build_s": build_s,
        "build_threads": cfg.build_threads,
        "index_bytes": int(faiss.serialize_index(index.index).nbytes),
        "vectors_bytes": int(index.vecs.nbytes),
        "exact": timed(exact, lat_q),
        "exact_hit10_target": float(np.mean((truth == targets[:, None]).any(1))),
        "sweep": [],
    }
    for ef in tqdm(cfg.ints("ef_search"), desc=f"{n:,} items: efSearch", leave=False):
        index.index.hnsw.efSearch = ef
        found = index.search(u, 10)[0]
        row = {"ef_search": ef, "recall_at_10": recall_at(found, truth)}
        row.update(timed(lambda q: index.top(q, [None], 10), lat_q))
        row["hit10_target"] = float(np.mean((found == targets[:, None]).any(1)))
        row["p50_ratio_to_exact"] = row["p50_ms"] / rec["exact"]["p50_ms"]
        rec["sweep"].append(row)
    ok = [r for r in rec["sweep"] if r["recall_at_10"] >= cfg.target_recall]
    rec["chosen"] = min(ok, key=lambda r: r["ef_search"]) if ok else None
    return rec


def table(sizes: list[dict]) -> str:
    head = f"{'items':>10} {'efSearch':>8} {'recall@10':>9} {'HNSW p50':>9} {'p99':>7} {'exact p50':>9} {'p99':>7}"
    lines = [head + f" {'ratio':>6} {'build s':>7} {'index MiB':>9}"]
    for s in sizes:
        for r in s["sweep"]:
            mark = "*" if s["chosen"] is not None and r["ef_search"] == s["chosen"]["ef_search"] else " "
            lines.append(
                f"{s['items']:>10,} {r['ef_search']:>7}{mark} {r['recall_at_10']:>9.4f} {r['p50_ms']:>9.3f} "
                f"{r['p99_ms']:>7.3f} {s['exact']['p50_ms']:>9.3f} {s['exact']['p99_ms']:>7.3f} "
                f"{r['p50_ratio_to_exact']:>6.3f} {s['build_s']:>7.1f} {s['index_bytes'] / 2**20:>9.1f}"
            )
    return "\n".join(lines + ["* the efSearch chosen: the smallest with recall@10 >= the target"])


def plot(sizes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for s in sizes:
        efs = [r["ef_search"] for r in s["sweep"]]
        (line,) = ax1.plot(efs, [r["recall_at_10"] for r in s["sweep"]], "o-", label=f"{s['items']:,} items")
        ax2.plot(efs, [r["p50_ms"] for r in s["sweep"]], "o-", color=line.get_color(), label=f"HNSW {s['items']:,}")
        ax2.axhline(s["exact"]["p50_ms"], ls="--", color=line.get_color(), label=f"exact {s['items']:,}")
    ax1.axhline(0.95, color="grey", lw=0.8)
    ax1.set(xlabel="efSearch", ylabel="recall@10 vs exact top-10", title="HNSW recall")
    ax2.set(yscale="log", xlabel="efSearch", ylabel="p50 latency, batch 1 (ms)", title="HNSW against exact")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(efs, [str(e) for e in efs])
        ax.minorticks_off()
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, AnnBenchConfig)
    cfg = settings_from(AnnBenchConfig, p.parse_args(argv))
    from models.data import load_prepared
    from models.data.batching import make_split

    info = machine("exact: torch matmul + topk; HNSW: faiss search; both timed on one thread, batch 1")
    torch.set_num_threads(cfg.build_threads)  # training and ground truth use the machine
    data = load_prepared(cfg.data)
    split = make_split(data.user_offsets, -(-cfg.queries // data.n_users))  # enough held-out positions
    model, trained = train_briefly(data, split, cfg)
    u, targets = user_vectors(model, data, split, cfg)
    with torch.no_grad():
        model_vecs = model.items.all().numpy()  # (N+1, D)
    torch.set_num_threads(1)  # what a replica with a fractional CPU gets
    sizes = [one_size(n, model_vecs, u, targets, cfg) for n in tqdm(cfg.ints("sizes"), desc="catalogues")]
    import faiss

    report = {
        "machine": info,
        "command": "python benchmarks/ann.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: os.path.relpath(v, HERE.parent) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "faiss": faiss.__version__,
        "data": {"dataset": str(cfg.data), "users": data.n_users, "items": data.n_items, "events": data.n_events},
        "model": {"kind": "decomposer", "combine": model.cfg.combine, "item_dim": model.cfg.item_dim, **trained},
        "queries": {"count": len(u), "what": "combined user vectors u at held-out test positions (user_vectors)"},
        "construction": "catalogues beyond the model's items: its item vectors plus draws from a Gaussian fitted "
        "to them (mean, full covariance); exclude-seen off",
        "sizes": sizes,
    }
    write_json(cfg.out, report, indent=1)
    plot(sizes, cfg.out.with_suffix(".png"))
    print(table(sizes))
    print(f"wrote {cfg.out} and {cfg.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
