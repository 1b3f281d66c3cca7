"""Quality benchmark: every model on the same split, same budget, several seeds.

    python benchmarks/quality.py --dataset ml-latest-small --seeds 0,1,2 --protocols loo,last10
    python benchmarks/quality.py --dataset synthetic
    python benchmarks/quality.py --prepared runs/data/ml-latest-small --device cuda --workers 8

Prints a Markdown table (mean ± std over seeds of HR@10, NDCG@10, MRR, train time), paired
bootstrap intervals over users for the decomposer against each baseline, and records
everything in benchmarks/results/quality_<dataset>.json (finished runs are kept, so an
interrupted benchmark resumes where it stopped). `--workers N` trains N runs at once in
separate processes (on one GPU, or on N CPU cores); `--deadline S` starts no run after S
seconds, for a bounded session on a borrowed machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from models.batching import make_split
from models.data import load_prepared, prepare_source
from models.metrics import paired_bootstrap, per_user_mean, summarize
from models.run import PROTOCOLS, format_table, train_config
from models.training import TrainConfig, evaluate, fit, new_model

RESULTS = Path(__file__).resolve().parent / "results"
# The plain decomposer (no residual readout, no profiles, dropout 0.2, last weights): the
# "(first default)" runs train with it, and the variants "decomposer, <change>" below change it.
FIRST = {"residual": False, "dropout": 0.2, "profile_decays": ()}
FIRST_TRAIN = {"ema_decay": None}
THREE_PROFILES = (1.0, 0.98, 0.9)     # today's default, spelled out: the variants below keep their meaning


def first(changes: dict | None = None, train: dict | None = None) -> tuple:
    """A decomposer variant: the first defaults with `changes` (model) and `train` (TrainConfig) on top."""
    return "decomposer", {**FIRST, **(changes or {})}, {**FIRST_TRAIN, **(train or {})}


# name -> (model kind, model config overrides[, training overrides]); INTENT_EVALUATED variants are
# also evaluated with the intent text ("<name> + intent text").
VARIANTS = {
    # The defaults: residual readout, three profiles, dropout 0.5, averaged weights (chosen on validation).
    "decomposer": ("decomposer", {}),
    "lstm": ("lstm", {}),
    "sasrec": ("sasrec", {}),
    "popular": ("popular", {}),
    # The trivial rule of repeating histories: the window's items first, then by popularity.
    "seen, then popular": ("seen-popular", {}),
    # Intent-aware rules: with the same words as "<model> + intent text", they are its baselines.
    "text retrieval": ("intent-text", {}),
    "phrase popularity": ("intent-popular", {}),
    # Ablations of today's default (ABLATIONS).
    "decomposer, no gates": ("decomposer", {"use_gates": False}),
    "decomposer, no aux losses": ("decomposer", {"aux_weight": 0.0}),
    "decomposer, seen items in the softmax": ("decomposer", {"mask_seen": False}),
    # The plain decomposer and its ablations. (The synthetic runs of these
    # ablations and of the mixture predate `mask_seen` and trained without it; their configs say so.)
    "decomposer (first default)": first(),
    "decomposer (first default), no gates": first({"use_gates": False}),
    "decomposer (first default), no aux losses": first({"aux_weight": 0.0}),
    "decomposer (first default), seen items in the softmax": first({"mask_seen": False}),
    # K softmaxes per position: cheap on the synthetic catalogue, ~15x an epoch on MovieLens.
    "decomposer (mixture)": first({"combine": "mixture"}),
    # The decomposer leaves seen items out of its training softmax (mask_seen, the default);
    # the baselines as published keep them in. Both sides of that choice, for a fair comparison:
    "lstm (mask seen)": ("lstm", {"mask_seen": True}),
    "sasrec (mask seen)": ("sasrec", {"mask_seen": True}),
    "gru4rec": ("gru4rec", {}),
    "gru4rec (mask seen)": ("gru4rec", {"mask_seen": True}),
    # Candidate changes to the first default, chosen between on validation NDCG@10, never on test.
    "decomposer (large)": first({"lstm_units": 256, "item_dim": 128, "dim_size": 64}),
    "decomposer, dropout 0.4": first({"dropout": 0.4}),
    "decomposer, lr 3e-3": first({}, {"lr": 3e-3}),
    "decomposer, dropout 0.5": first({"dropout": 0.5}),
    "decomposer, dropout 0.4, sum": first({"dropout": 0.4, "combine": "sum"}),
    "decomposer, K·α": first({"scale_gates": True}),
    "decomposer, no gates, no aux losses": first({"use_gates": False, "aux_weight": 0.0}),
    "decomposer, residual readout": first({"residual": True}),
    "decomposer, residual, dropout 0.4": first({"residual": True, "dropout": 0.4}),
    "decomposer, residual, profile": first({"residual": True, "profile_decays": (1.0,)}),
    "decomposer, residual, profile, dropout 0.4": first({"residual": True, "profile_decays": (1.0,), "dropout": 0.4}),
    "decomposer, residual, three profiles (λ 1, 0.98, 0.9)": first({"residual": True,
                                                                     "profile_decays": THREE_PROFILES}),
    # lr 1e-2 over ~14 steps an epoch: the recurrent runs that stop early rank worst.
    "decomposer, residual, lr halved on plateau": first({"residual": True}, {"lr_decay_patience": 2}),
    "decomposer, residual, dropout 0.4, lr halved on plateau": first({"residual": True, "dropout": 0.4},
                                                                     {"lr_decay_patience": 2}),
    "decomposer, residual, no intent training": first({"residual": True}, {"intent_rate": 0.0}),
    "decomposer, residual, no text in item vectors": first({"residual": True, "use_text": False}),
    # Heavier dropout (the best of 0.2/0.4/0.5 on the GPU) with the other candidates on top of it.
    "decomposer, residual, dropout 0.5": first({"residual": True, "dropout": 0.5}),
    "decomposer, residual, three profiles, dropout 0.5": first({"residual": True, "dropout": 0.5,
                                                                 "profile_decays": THREE_PROFILES}),
    "decomposer, dropout 0.5, weight decay 0.1": first({"dropout": 0.5}, {"weight_decay": 0.1}),
    "decomposer, dropout 0.5, batch 32": first({"dropout": 0.5}, {"batch_size": 32}),
    # An average of the weights (decay 0.98 a step, ~3.5 epochs at batch 64) against lr 1e-2's noise.
    "decomposer, dropout 0.5, weights averaged": first({"dropout": 0.5}, {"ema_decay": 0.98}),
    "decomposer, residual, dropout 0.5, weights averaged": first({"residual": True, "dropout": 0.5},
                                                                   {"ema_decay": 0.98}),
    # (residual, three profiles, dropout 0.5, weights averaged: the best on validation, now "decomposer")
    "sasrec (mask seen), weights averaged": ("sasrec", {"mask_seen": True}, {"ema_decay": 0.98}),
    # The same regularisation offered to the recurrent baselines, so a gain is not one-sided tuning.
    "lstm (mask seen), dropout 0.4": ("lstm", {"mask_seen": True, "dropout": 0.4}),
    "gru4rec (mask seen), dropout 0.4": ("gru4rec", {"mask_seen": True, "dropout": 0.4}),
}
assert not [v for v in VARIANTS if "/" in v], "a variant name keys runs as protocol/variant/seed: no '/'"
INTENT_EVALUATED = ("decomposer", "text retrieval", "phrase popularity", "decomposer (first default)", "decomposer, residual readout",
                    "decomposer, residual, dropout 0.5", "decomposer, residual, three profiles, dropout 0.5",
                    "decomposer, dropout 0.5, weights averaged")
ABLATIONS = ("decomposer, no gates", "decomposer, no aux losses", "decomposer, seen items in the softmax")
DEFAULT_VARIANTS = ("decomposer", "lstm", "sasrec", "popular", *ABLATIONS)
METRICS = ("hr@10", "ndcg@10", "mrr", "hr@20")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def build_variant(variant: str, data, split, seed: int, **train) -> tuple[torch.nn.Module, TrainConfig]:
    """A fresh model of `variant` (seeded) and its training config; `train` sets epochs, patience, ..."""
    kind, overrides, *train_overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    model = new_model(kind, data, split, **overrides)
    return model, train_config(kind, seed=seed, **train, **(train_overrides[0] if train_overrides else {}))


def run_one(data, split, variant: str, seed: int, args, device: str = "cpu", progress: bool = True) -> dict:
    model, cfg = build_variant(variant, data, split, seed, epochs=args.epochs, patience=args.patience,
                               time_budget_s=args.time_budget)
    t0 = time.perf_counter()
    fitted = fit(model, data, split, cfg, progress=progress, device=device, desc=f"{variant} s{seed}")
    seconds = time.perf_counter() - t0
    out = {}
    with_intent = [(f"{variant} + intent text", True)] if variant in INTENT_EVALUATED else []
    for name, intent in [(variant, False)] + with_intent:
        ev = evaluate(model, data, split, "test", with_intent=intent, device=device)
        out[name] = {"masked": summarize(ev["masked"]), "unmasked": summarize(ev["unmasked"]),
                     "user_ndcg@10": per_user_mean(ev["masked"]["ndcg@10"], ev["users"]).round(6).tolist(),
                     "valid_ndcg@10": round(fitted.best_valid["ndcg@10"], 6),
                     "best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
                     "train_seconds": round(seconds, 1), "device": device,
                     "machine": machine()["gpu"] if device.startswith("cuda") else f"{os.cpu_count()} CPUs",
                     "config": {**model.cfg.to_dict(), **cfg.to_dict()}}
    return out


_WORKER: dict = {}


def _worker_init(prepared: str, n_tests: dict, args, device: str, threads: int) -> None:
    """Each worker process loads the prepared data once and keeps its splits."""
    torch.set_num_threads(threads)
    data = load_prepared(Path(prepared))
    _WORKER.update(data=data, args=args, device=device,
                   splits={p: make_split(data.user_offsets, n) for p, n in n_tests.items()})


def _worker_run(protocol: str, variant: str, seed: int) -> dict:
    w = _WORKER
    return run_one(w["data"], w["splits"][protocol], variant, seed, w["args"], w["device"], progress=False)


def write_json(path: Path, record: dict) -> None:
    """Atomic: an interrupted write leaves the previous results intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


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
        valid = [r["valid_ndcg@10"] for r in rs if "valid_ndcg@10" in r]
        row["valid ndcg@10"] = f"{np.mean(valid):.4f}" if valid else ""
        row["train s"] = f"{np.mean([r['train_seconds'] for r in rs]):.0f}"
        rows.append(row)
    rows.sort(key=lambda r: -float(r["ndcg@10"].split()[0]))
    user_mean = {n: np.mean([r["user_ndcg@10"] for r in rs], axis=0) for n, rs in by_variant.items()}
    boot = {}
    baselines = [n for n in user_mean if n.split()[0] in ("sasrec", "gru4rec", "lstm")]
    baselines += ["decomposer", "decomposer (first default)"]
    for other in baselines:
        for name in [n for n in user_mean if n.startswith("decomposer")]:   # every decomposer variant
            if other in user_mean and name != other:
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
    p.add_argument("--prepared", type=Path, help="an already prepared folder (then --dataset only names the results)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--protocols", default="loo,last10")
    p.add_argument("--variants", default=";".join(DEFAULT_VARIANTS),
                   help="';'-separated, from: " + "; ".join(VARIANTS))
    p.add_argument("--ablation-protocols", default="loo", help="protocols on which the ablations run")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--time-budget", type=float, help="training seconds per model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--deadline", type=float, help="start no run after this many seconds")
    p.add_argument("--out", type=Path)
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="another results JSON whose runs join the tables (read only; e.g. runs from another machine)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    protocols = args.protocols.split(",")
    bad = [x for x in protocols if x not in PROTOCOLS]
    if bad:
        p.error(f"--protocols: unknown {bad}; choose from {list(PROTOCOLS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    out = args.out or RESULTS / f"quality_{args.dataset}.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    runs = record.setdefault("runs", {})
    prepared = args.prepared or prepare_source(args.dataset, Path("runs/data") / args.dataset, data_dir=args.data_dir)
    data = load_prepared(prepared)
    splits = {p: make_split(data.user_offsets, PROTOCOLS[p]) for p in protocols}
    # Most important first, so an interrupted run (resumed later) has the headline figures.
    plan = [(p, v, s) for p in protocols for s in seeds for v in variants if v not in ABLATIONS]
    plan += [(p, v, s) for p in protocols if p in args.ablation_protocols.split(",")
             for s in seeds for v in variants if v in ABLATIONS]
    plan = [t for t in plan if "/".join(map(str, t)) not in runs]
    t_start = time.perf_counter()

    def save(results: dict) -> None:
        runs.update(results)
        record.update({"benchmark": "quality", "dataset": args.dataset, "machine": machine(),
                       "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                       "users": data.n_users, "items": data.n_items, "events": int(len(data.items)), "runs": runs})
        write_json(out, record)

    def keyed(protocol: str, seed: int, results: dict) -> dict:
        return {f"{protocol}/{name}/{seed}": r for name, r in results.items()}

    def past_deadline() -> bool:
        return args.deadline is not None and time.perf_counter() - t_start > args.deadline

    if args.workers <= 1:
        for protocol, variant, seed in plan:
            if past_deadline():
                print(f"deadline: {args.deadline:.0f} s passed, {variant} s{seed} and later runs not started")
                break
            save(keyed(protocol, seed, run_one(data, splits[protocol], variant, seed, args, args.device)))
    else:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        init = (str(prepared), {p: PROTOCOLS[p] for p in protocols}, args, args.device, threads)
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=init) as pool:
            todo, running = list(plan), {}
            while todo or running:
                while todo and len(running) < args.workers and not past_deadline():
                    task = todo.pop(0)
                    running[pool.submit(_worker_run, *task)] = task
                if not running:
                    print(f"deadline: {args.deadline:.0f} s passed, {len(todo)} runs not started")
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    protocol, variant, seed = running.pop(fut)
                    try:
                        results = fut.result()
                    except Exception as e:  # one failed run (e.g. out of memory) must not lose the others
                        print(f"FAILED {protocol}/{variant}/{seed}: {type(e).__name__}: {e}", flush=True)
                        continue
                    save(keyed(protocol, seed, results))
                    r = results[variant]
                    print(f"{time.perf_counter() - t_start:6.0f}s {protocol}/{variant}/{seed}: "
                          f"test ndcg@10 {r['masked']['ndcg@10']:.4f} valid {r['valid_ndcg@10']:.4f} "
                          f"epochs {r['epochs_run']} in {r['train_seconds']:.0f}s", flush=True)
    shown = dict(runs)
    for extra in args.also:
        for key, r in json.loads(extra.read_text())["runs"].items():
            shown.setdefault(key, r)
    tables = {}
    for protocol in protocols:
        rows, boot = aggregate(shown, protocol)
        tables[protocol] = {"rows": rows, "bootstrap": boot}
        print(f"\n### {args.dataset}, protocol {protocol} ({len(splits[protocol].test_pos)} test targets, "
              f"history-masked, mean ± std over seeds)\n")
        print(format_table(rows, ["model", "seeds", *METRICS, "ndcg@10 unmasked", "valid ndcg@10", "train s"]))
        print("\nPaired bootstrap over users, NDCG@10 difference (95% interval):")
        for k, v in boot.items():
            print(f"- {k}: {v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]")
    record["summary"] = tables
    write_json(out, record)
    plot(tables, args.dataset, out.with_suffix(".png"))
    print(f"\nrecorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
