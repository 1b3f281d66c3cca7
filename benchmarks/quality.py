"""Quality benchmark: every model on the same split, same budget, several seeds.

    python benchmarks/quality.py --dataset ml-latest-small --seeds 0,1,2 --protocols loo,last10
    python benchmarks/quality.py --dataset synthetic

Prints a Markdown table (mean ± std over seeds of HR@10, NDCG@10, MRR, train time), paired
bootstrap intervals over users for decomposer − SASRec and decomposer − LSTM, and records
everything in benchmarks/results/quality_<dataset>.json (finished runs are kept, so an
interrupted benchmark resumes where it stopped).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.batching import make_split
from models.data import load_prepared, prepare_source
from models.metrics import paired_bootstrap, per_user_mean, summarize
from models.run import PROTOCOLS, format_table, train_config
from models.training import evaluate, fit, new_model

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (model kind, config overrides); the intent-text variant is an evaluation of "decomposer".
VARIANTS = {
    "decomposer": ("decomposer", {}),
    "lstm": ("lstm", {}),
    "sasrec": ("sasrec", {}),
    "popular": ("popular", {}),
    "decomposer, no gates": ("decomposer", {"use_gates": False}),
    "decomposer, no aux losses": ("decomposer", {"aux_weight": 0.0}),
    # K softmaxes per position: cheap on the synthetic catalogue, ~15x an epoch on MovieLens.
    "decomposer (mixture)": ("decomposer", {"combine": "mixture"}),
    # The decomposer leaves seen items out of its training softmax (mask_seen, the default);
    # the baselines as published keep them in. Both sides of that choice, for a fair comparison:
    "lstm (mask seen)": ("lstm", {"mask_seen": True}),
    "sasrec (mask seen)": ("sasrec", {"mask_seen": True}),
    "decomposer, seen items in the softmax": ("decomposer", {"mask_seen": False}),
}
ABLATIONS = ("decomposer, no gates", "decomposer, no aux losses", "decomposer, seen items in the softmax")
DEFAULT_VARIANTS = ("decomposer", "lstm", "sasrec", "popular", *ABLATIONS)
METRICS = ("hr@10", "ndcg@10", "mrr", "hr@20")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def run_one(data, split, variant: str, seed: int, args) -> dict:
    kind, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    model = new_model(kind, data, split, **overrides)
    cfg = train_config(kind, epochs=args.epochs, patience=args.patience, seed=seed, time_budget_s=args.time_budget)
    t0 = time.perf_counter()
    fitted = fit(model, data, split, cfg, desc=f"{variant} s{seed}")
    seconds = time.perf_counter() - t0
    out = {}
    for name, intent in [(variant, False)] + ([("decomposer + intent text", True)] if variant == "decomposer" else []):
        ev = evaluate(model, data, split, "test", with_intent=intent)
        out[name] = {"masked": summarize(ev["masked"]), "unmasked": summarize(ev["unmasked"]),
                     "user_ndcg@10": per_user_mean(ev["masked"]["ndcg@10"], ev["users"]).round(6).tolist(),
                     "best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
                     "train_seconds": round(seconds, 1), "config": {**model.cfg.to_dict(), **cfg.to_dict()}}
    return out


def aggregate(runs: dict, protocol: str) -> tuple[list[dict], dict]:
    by_variant: dict[str, list[dict]] = {}
    for key, r in runs.items():
        if key.startswith(protocol + "/"):
            by_variant.setdefault(key.split("/")[1], []).append(r)
    rows = []
    for name, rs in by_variant.items():
        row = {"model": name, "seeds": len(rs)}
        for m in METRICS:
            v = np.array([r["masked"][m] for r in rs])
            row[m] = f"{v.mean():.4f} ± {v.std():.4f}"
        u = np.array([r["unmasked"]["ndcg@10"] for r in rs])
        row["ndcg@10 unmasked"] = f"{u.mean():.4f}"
        row["train s"] = f"{np.mean([r['train_seconds'] for r in rs]):.0f}"
        rows.append(row)
    rows.sort(key=lambda r: -float(r["ndcg@10"].split()[0]))
    user_mean = {n: np.mean([r["user_ndcg@10"] for r in rs], axis=0) for n, rs in by_variant.items()}
    boot = {}
    for other in ("sasrec", "lstm", "sasrec (mask seen)", "lstm (mask seen)", "decomposer"):
        for name in ("decomposer", "decomposer + intent text", "decomposer (mixture)"):
            if name in user_mean and other in user_mean and name != other:
                boot[f"{name} − {other}"] = paired_bootstrap(user_mean[name], user_mean[other])
    return rows, boot


def plot(tables: dict, dataset: str, path: Path) -> None:
    """NDCG@10 (history-masked) per model and protocol, mean and std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 3.6), squeeze=False)
    for ax, (protocol, t) in zip(axes[0], tables.items()):
        rows = t["rows"][::-1]
        mean = [float(r["ndcg@10"].split()[0]) for r in rows]
        std = [float(r["ndcg@10"].split()[-1]) for r in rows]
        ax.barh([r["model"] for r in rows], mean, xerr=std, color="tab:blue", alpha=0.8)
        ax.set(title=f"{dataset}, {protocol}", xlabel="NDCG@10 (history-masked)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--protocols", default="loo,last10")
    p.add_argument("--variants", default=";".join(DEFAULT_VARIANTS),
                   help="';'-separated, from: " + "; ".join(VARIANTS))
    p.add_argument("--ablation-protocols", default="loo", help="protocols on which the ablations run")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--time-budget", type=float, help="training seconds per model")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    out = args.out or RESULTS / f"quality_{args.dataset}.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    runs = record.get("runs", {})
    data = load_prepared(prepare_source(args.dataset, Path("runs/data") / args.dataset, data_dir=args.data_dir))
    protocols = args.protocols.split(",")
    splits = {p: make_split(data.user_offsets, PROTOCOLS[p]) for p in protocols}
    # Most important first, so an interrupted run (resumed later) has the headline figures.
    plan = [(p, v, s) for p in protocols for s in seeds for v in variants if v not in ABLATIONS]
    plan += [(p, v, s) for p in protocols if p in args.ablation_protocols.split(",")
             for s in seeds for v in variants if v in ABLATIONS]
    for protocol, variant, seed in plan:
        if f"{protocol}/{variant}/{seed}" in runs:
            continue
        for name, r in run_one(data, splits[protocol], variant, seed, args).items():
            runs[f"{protocol}/{name}/{seed}"] = r
        record = {"benchmark": "quality", "dataset": args.dataset, "machine": machine(),
                  "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                  "users": data.n_users, "items": data.n_items, "events": int(len(data.items)), "runs": runs}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
    tables = {}
    for protocol in protocols:
        rows, boot = aggregate(runs, protocol)
        tables[protocol] = {"rows": rows, "bootstrap": boot}
        print(f"\n### {args.dataset}, protocol {protocol} ({len(splits[protocol].test_pos)} test targets, "
              f"history-masked, mean ± std over seeds)\n")
        print(format_table(rows, ["model", "seeds", *METRICS, "ndcg@10 unmasked", "train s"]))
        print("\nPaired bootstrap over users, NDCG@10 difference (95% interval):")
        for k, v in boot.items():
            print(f"- {k}: {v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]")
    record["summary"] = tables
    out.write_text(json.dumps(record, indent=1))
    plot(tables, args.dataset, out.with_suffix(".png"))
    print(f"\nrecorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
