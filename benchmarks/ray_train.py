"""Ray Train benchmark: the overhead of one Ray worker over the plain local loop, and two workers against one.

    python benchmarks/ray_train.py --dataset ml-latest-small --epochs 10
    python benchmarks/ray_train.py --dataset synthetic --epochs 1          # a smoke run

Three runs of the same model, epochs and seed, no early stopping, all on this machine's CPUs:
  local    `models.training.loop.fit` with torch on every core;
  1 worker `ray_app.train` with one worker holding every core;
  2 workers `ray_app.train` with two DDP workers of one core each, splitting each global batch.
Ray start-up (`ray.init`, reading the shards, starting the worker group) is reported apart from the
training loop, which runs from the first epoch's start to `fit()` returning (worker shutdown included).
Records benchmarks/results/ray_train.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from machine_info import machine  # sibling script
from models.data.batching import make_split
from models.data import load_prepared, prepare_source
from models.training.defaults import train_config
from models.training.loop import fit, new_model
from models.files import write_json

RESULTS = Path(__file__).resolve().parent / "results"
METRIC = "valid_ndcg@10"


def local_run(prepared: Path, args) -> dict:
    data = load_prepared(prepared)
    split = make_split(data.user_offsets, 1)
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(args.seed)
    model = new_model(args.model, data, split)
    cfg = train_config(args.model, epochs=args.epochs, patience=args.epochs, seed=args.seed)
    t0 = time.perf_counter()
    fitted = fit(model, data, split, cfg, progress=False)
    seconds = time.perf_counter() - t0
    return {
        "loop_s": seconds,
        "epoch_s": seconds / len(fitted.history),
        "sequences_per_s": fitted.sequences_per_s,
        "final_" + METRIC: fitted.history[-1][METRIC],
        "best_" + METRIC: fitted.best_valid["ndcg@10"],
    }


def ray_run(prepared: Path, storage: Path, workers: int, args) -> dict:
    from ray_app.train.settings import RayTrainSettings
    from ray_app.train.driver import run

    s = RayTrainSettings(
        dataset=str(prepared),
        model=args.model,
        epochs=args.epochs,
        patience=args.epochs,
        seed=args.seed,
        num_workers=workers,
        cpus_per_worker=os.cpu_count() // workers,
        storage_path=str(storage),
        name=f"bench-{workers}w",
    )
    t0 = time.time()
    best = run(s)
    end = time.time()
    h = best.history
    starts = [e["started_at"] for e in h]
    seqs = sum(e["sequences_per_s"] * e["train_seconds"] for e in h)
    return {
        "workers": workers,
        "cpus_per_worker": s.cpus_per_worker,
        "startup_s": starts[0] - t0,
        "loop_s": end - starts[0],
        # Steady state: the wall time between epoch starts (training, validation, checkpoint).
        "epoch_s": float(np.mean(np.diff(starts))) if len(starts) > 1 else end - starts[0],
        "sequences_per_s": seqs / sum(e["train_seconds"] for e in h),
        "final_" + METRIC: h[-1][METRIC],
        "best_" + METRIC: max(e[METRIC] for e in h),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-latest-small")
    p.add_argument("--model", default="decomposer", choices=("decomposer", "lstm", "sasrec"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "ray_train.json")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    prepared = prepare_source(args.dataset, Path("runs/data") / args.dataset)
    local = local_run(prepared, args)
    print(f"local: {local['loop_s']:.1f}s, {local['sequences_per_s']:.0f} seq/s", flush=True)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count())
    ray_init_s = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory(prefix="ray-train-bench-") as storage:
            one = ray_run(prepared, Path(storage), 1, args)
            two = ray_run(prepared, Path(storage), 2, args)
    finally:
        ray.shutdown()
    final = "final_" + METRIC
    figures = {
        "ray_init_s": ray_init_s,
        "local": local,
        "one_worker": one,
        "two_workers": two,
        "overhead_ratio": one["loop_s"] / local["loop_s"],  # target <= 1.15
        "overhead_ratio_per_epoch": one["epoch_s"] / local["epoch_s"],
        "two_vs_one_sequences_ratio": two["sequences_per_s"] / one["sequences_per_s"],
        "two_vs_one_final_ndcg_change": two[final] / one[final] - 1.0,  # target within ±0.02
    }
    record = {
        "benchmark": "ray_train",
        "dataset": args.dataset,
        "model": args.model,
        "epochs": args.epochs,
        "seed": args.seed,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "figures": figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(f"Ray start-up {ray_init_s:.1f}s + {one['startup_s']:.1f}s (1 worker), {two['startup_s']:.1f}s (2 workers)")
    print(
        f"1 worker / local wall time: {figures['overhead_ratio']:.3f} "
        f"(per epoch {figures['overhead_ratio_per_epoch']:.3f})"
    )
    print(
        f"2 workers / 1 worker sequences/s: {two['sequences_per_s']:.0f} / {one['sequences_per_s']:.0f} = "
        f"{figures['two_vs_one_sequences_ratio']:.2f}; final {METRIC} {two[final]:.4f} vs {one[final]:.4f} "
        f"({figures['two_vs_one_final_ndcg_change']:+.1%})"
    )
    print(f"recorded in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
