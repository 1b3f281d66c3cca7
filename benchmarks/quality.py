"""Quality benchmark: every model on the same split, same budget, several seeds.

    python benchmarks/quality.py --dataset ml-latest-small --seeds 0,1,2 --protocols loo,last10
    python benchmarks/quality.py --dataset synthetic
    python benchmarks/quality.py --prepared runs/data/ml-latest-small --device cuda --workers 8

Prints a Markdown table (mean ± std over seeds of HR@10, NDCG@10, MRR, train time), paired
bootstrap intervals over users for the decomposer against each baseline, and records
everything in benchmarks/results/quality_<dataset>.json (finished runs are kept, so an
interrupted benchmark resumes where it stopped). `--workers N` trains N runs at once in
separate processes (on one GPU, or on N CPU cores); `--deadline S` starts no run after S
seconds, for a bounded session on a borrowed machine; `--by-variant` runs every seed of
the first variant before the next (the default runs every variant of the first seed first).

One comparison is declared before any run (`PRIMARY`): the decomposer against SASRec with the
same information (item text, rating and time features) and the same recipe options (seen items
out of the softmax, averaged weights), on last-10. Its interval resamples seeds and users; every
other interval printed is exploratory. Requests with words are evaluated in four regimes
(`models.data.batching.INTENT_REGIMES`); the oracle one is built from the answer and is only ever
compared with baselines given the same words.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from machine_info import machine  # sibling script
from models.nn.baselines import FusedWithText
from models.files import atomic_path
from models.data.batching import INTENT_REGIMES, make_split
from models.data import load_prepared, prepare_source
from models.evaluation.metrics import per_user_mean, seed_user_bootstrap, summarize
from models.training.defaults import PROTOCOLS, train_config
from models.evaluation.report import format_table
from models.training.loop import TrainConfig, fit, new_model, training_counts
from models.evaluation.evaluate import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
# The plain decomposer (no residual readout, no profiles, dropout 0.2, last weights): the
# "plain decomposer" runs train with it, and the variants "decomposer, <change>" below change it.
FIRST = {"residual": False, "dropout": 0.2, "profile_decays": ()}
FIRST_TRAIN = {"ema_decay": None}
THREE_PROFILES = (1.0, 0.98, 0.9)  # today's default, spelled out: the variants below keep their meaning


def first(changes: dict | None = None, train: dict | None = None) -> tuple:
    """A decomposer variant: the plain decomposer with `changes` (model) and `train` (TrainConfig) on top."""
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
    # Content-based: the items whose text is nearest the mean text of the window's last items.
    "text similarity to the history": ("history-text", {}),
    # Ablations of today's default (ABLATIONS).
    "decomposer, no gates": ("decomposer", {"use_gates": False}),
    "decomposer, no aux losses": ("decomposer", {"aux_weight": 0.0}),
    "decomposer, seen items in the softmax": ("decomposer", {"mask_seen": False}),
    # The plain decomposer and its ablations. (The synthetic runs of these
    # ablations and of the mixture predate `mask_seen` and trained without it; their configs say so.)
    "plain decomposer": first(),
    "plain decomposer, no gates": first({"use_gates": False}),
    "plain decomposer, no aux losses": first({"aux_weight": 0.0}),
    "plain decomposer, seen items in the softmax": first({"mask_seen": False}),
    # K softmaxes per position: cheap on the synthetic catalogue, ~15x an epoch on MovieLens.
    "decomposer (mixture)": first({"combine": "mixture"}),
    # The decomposer leaves seen items out of its training softmax (mask_seen, the default);
    # the baselines as published keep them in. Both sides of that choice, for a fair comparison:
    "lstm (mask seen)": ("lstm", {"mask_seen": True}),
    "sasrec (mask seen)": ("sasrec", {"mask_seen": True}),
    "gru4rec": ("gru4rec", {}),
    "gru4rec (mask seen)": ("gru4rec", {"mask_seen": True}),
    # Candidate changes to the plain decomposer, chosen between on validation NDCG@10, never on test.
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
    "decomposer, residual, three profiles (λ 1, 0.98, 0.9)": first(
        {"residual": True, "profile_decays": THREE_PROFILES}
    ),
    # lr 1e-2 over ~14 steps an epoch: the recurrent runs that stop early rank worst.
    "decomposer, residual, lr halved on plateau": first({"residual": True}, {"lr_decay_patience": 2}),
    "decomposer, residual, dropout 0.4, lr halved on plateau": first(
        {"residual": True, "dropout": 0.4}, {"lr_decay_patience": 2}
    ),
    "decomposer, residual, no intent training": first({"residual": True}, {"intent_rate": 0.0}),
    "decomposer, residual, no text in item vectors": first({"residual": True, "use_text": False}),
    # Heavier dropout (the best of 0.2/0.4/0.5 on the GPU) with the other candidates on top of it.
    "decomposer, residual, dropout 0.5": first({"residual": True, "dropout": 0.5}),
    "decomposer, residual, three profiles, dropout 0.5": first(
        {"residual": True, "dropout": 0.5, "profile_decays": THREE_PROFILES}
    ),
    "decomposer, dropout 0.5, weight decay 0.1": first({"dropout": 0.5}, {"weight_decay": 0.1}),
    "decomposer, dropout 0.5, batch 32": first({"dropout": 0.5}, {"batch_size": 32}),
    # An average of the weights (decay 0.98 a step, ~3.5 epochs at batch 64) against lr 1e-2's noise.
    "decomposer, dropout 0.5, weights averaged": first({"dropout": 0.5}, {"ema_decay": 0.98}),
    "decomposer, residual, dropout 0.5, weights averaged": first(
        {"residual": True, "dropout": 0.5}, {"ema_decay": 0.98}
    ),
    # (residual, three profiles, dropout 0.5, weights averaged: the best on validation, now "decomposer")
    "sasrec (mask seen), weights averaged": ("sasrec", {"mask_seen": True}, {"ema_decay": 0.98}),
    # The same regularisation offered to the recurrent baselines, so a gain is not one-sided tuning.
    "lstm (mask seen), dropout 0.4": ("lstm", {"mask_seen": True, "dropout": 0.4}),
    "gru4rec (mask seen), dropout 0.4": ("gru4rec", {"mask_seen": True, "dropout": 0.4}),
    # Equal information: SASRec with the decomposer's inputs, and the decomposer without text,
    # so that the table separates what the text buys from what the decomposition buys.
    "sasrec, text and event features, mask seen, weights averaged": (
        "sasrec",
        {"mask_seen": True, "use_text": True, "use_events": True},
        {"ema_decay": 0.98},
    ),
    "decomposer, no text": ("decomposer", {"use_text": False}),
}
TEXT_SASREC = "sasrec, text and event features, mask seen, weights averaged"
# Declared before the runs: the one comparison the headline rests on.
PRIMARY = {"protocol": "last10", "model": "decomposer", "baseline": TEXT_SASREC, "metric": "ndcg@10"}
# Trained baselines that are also evaluated fused with text retrieval, for requests with words.
FUSED = (TEXT_SASREC, "sasrec (mask seen), weights averaged")
FUSION_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)  # chosen on validation, per regime
assert not [v for v in VARIANTS if "/" in v], "a variant name keys runs as protocol/variant/seed: no '/'"
INTENT_EVALUATED = (
    "decomposer",
    "text retrieval",
    "phrase popularity",
    "decomposer, no text",
    "plain decomposer",
    "decomposer, residual readout",
    "decomposer, residual, dropout 0.5",
    "decomposer, residual, three profiles, dropout 0.5",
    "decomposer, dropout 0.5, weights averaged",
)
ABLATIONS = ("decomposer, no gates", "decomposer, no aux losses", "decomposer, seen items in the softmax")
DEFAULT_VARIANTS = ("decomposer", "lstm", "sasrec", "popular", *ABLATIONS)
METRICS = ("hr@10", "ndcg@10", "mrr", "hr@20")


def build_variant(variant: str, data, split, seed: int, **train) -> tuple[torch.nn.Module, TrainConfig]:
    """A fresh model of `variant` (seeded) and its training config; `train` sets epochs, patience, ..."""
    kind, overrides, *train_overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    model = new_model(kind, data, split, **overrides)
    return model, train_config(kind, seed=seed, **train, **(train_overrides[0] if train_overrides else {}))


def intent_name(variant: str, regime: str) -> str:
    return f"{variant} + {regime} intent"


def fused_name(variant: str) -> str:
    return f"{variant}, fused with text retrieval"


def cold_rows(data, split) -> np.ndarray:
    """Test rows whose target item appears in no training event (first seen after training)."""
    return np.nonzero(training_counts(data, split)[data.items[split.test_pos]] == 0)[0]


def cold_table(runs: dict, protocol: str) -> dict:
    """Per model (no words): NDCG@10 on the cold-start targets, mean over seeds."""
    by: dict[str, list] = {}
    for key, r in runs.items():
        if key.startswith(protocol + "/") and "cold_items" in r:
            by.setdefault(key.split("/")[1], []).append(r["cold_items"])
    return {
        name: {
            "targets": rs[0]["targets"],
            "seeds": len(rs),
            "ndcg@10": round(float(np.mean([c["ndcg@10"] for c in rs])), 6),
            "hr@10": round(float(np.mean([c["hr@10"] for c in rs])), 6),
        }
        for name, rs in by.items()
    }


def fusion_weight(model, text_rule, data, split, regime: str, device: str) -> tuple[float, float]:
    """The fusion weight with the best validation NDCG@10 under `regime` -> (weight, that NDCG@10)."""
    scored = []
    for w in FUSION_WEIGHTS:
        ev = evaluate(
            FusedWithText(model, text_rule, w), data, split, "valid", with_intent=True, intent=regime, device=device
        )
        scored.append((float(np.mean(ev["masked"]["ndcg@10"])), w))
    best, w = max(scored)
    return w, best


def run_one(data, split, variant: str, seed: int, args, device: str = "cpu", progress: bool = True) -> dict:
    model, cfg = build_variant(
        variant, data, split, seed, epochs=args.epochs, patience=args.patience, time_budget_s=args.time_budget
    )
    t0 = time.perf_counter()
    fitted = fit(model, data, split, cfg, progress=progress, device=device, desc=f"{variant} s{seed}")
    seconds = time.perf_counter() - t0
    common = {
        "valid_ndcg@10": round(fitted.best_valid["ndcg@10"], 6),
        "best_epoch": fitted.best_epoch,
        "epochs_run": len(fitted.history),
        "train_seconds": round(seconds, 1),
        "device": device,
        "machine": machine()["gpu"] if device.startswith("cuda") else f"{os.cpu_count()} CPUs",
        "config": {**model.cfg.to_dict(), **cfg.to_dict()},
    }

    def entry(ev: dict, **extra) -> dict:
        new = ~ev["repeat"]  # targets the user had not seen: the mask gives nothing away there
        fresh = (
            {**summarize({k: v[new] for k, v in ev["masked"].items()}), "targets": int(new.sum())}
            if new.any()
            else None
        )
        return {
            "masked": summarize(ev["masked"]),
            "unmasked": summarize(ev["unmasked"]),
            "masked_new": fresh,
            "user_ndcg@10": per_user_mean(ev["masked"]["ndcg@10"], ev["users"]).round(6).tolist(),
            **common,
            **extra,
        }

    out = {variant: entry(evaluate(model, data, split, "test", device=device))}
    cold = cold_rows(data, split)
    if len(cold):  # targets whose item no training event holds: only text can place them
        ev = evaluate(model, data, split, "test", device=device, rows=cold)
        out[variant]["cold_items"] = {
            "targets": int(len(cold)),
            **summarize(ev["masked"]),
            "target_ndcg@10": np.round(ev["masked"]["ndcg@10"], 6).tolist(),
        }
    if variant in INTENT_EVALUATED:
        for regime in INTENT_REGIMES:
            ev = evaluate(model, data, split, "test", with_intent=True, intent=regime, device=device)
            out[intent_name(variant, regime)] = entry(ev, intent=regime)
    if variant in FUSED:
        text_rule = new_model("intent-text", data, split).to(device)
        for regime in INTENT_REGIMES:
            w, valid = fusion_weight(model, text_rule, data, split, regime, device)
            ev = evaluate(
                FusedWithText(model, text_rule, w), data, split, "test", with_intent=True, intent=regime, device=device
            )
            out[intent_name(fused_name(variant), regime)] = entry(
                ev, intent=regime, fusion_weight=w, fusion_valid_ndcg=round(valid, 6)
            )
    return out


_WORKER: dict = {}


def _exit_with_parent(parent: int, every_s: float = 2.0) -> None:
    """A worker ends itself once the benchmark that started it is gone (killed, not only stopped):
    a spawned pool's workers would otherwise train on for hours with nobody to record them."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _worker_init(prepared: str, n_tests: dict, args, device: str, threads: int, parent: int) -> None:
    """Each worker process loads the prepared data once and keeps its splits."""
    _exit_with_parent(parent)
    torch.set_num_threads(threads)
    data = load_prepared(Path(prepared))
    _WORKER.update(
        data=data, args=args, device=device, splits={p: make_split(data.user_offsets, n) for p, n in n_tests.items()}
    )


def _worker_run(protocol: str, variant: str, seed: int) -> dict:
    w = _WORKER
    return run_one(w["data"], w["splits"][protocol], variant, seed, w["args"], w["device"], progress=False)


def write_json(path: Path, record: dict) -> None:
    """Atomic: an interrupted write leaves the previous results intact."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


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
        new = [r["masked_new"]["ndcg@10"] for r in rs if r.get("masked_new")]
        row["ndcg@10 new targets"] = f"{np.mean(new):.4f}" if new else ""
        valid = [r["valid_ndcg@10"] for r in rs if "valid_ndcg@10" in r]
        row["valid ndcg@10"] = f"{np.mean(valid):.4f}" if valid else ""
        row["train s"] = f"{np.mean([r['train_seconds'] for r in rs]):.0f}"
        rows.append(row)
    rows.sort(key=lambda r: -float(r["ndcg@10"].split()[0]))
    per_seed = {n: np.array([r["user_ndcg@10"] for r in rs]) for n, rs in by_variant.items()}  # (S, U)
    boot = {}
    baselines = [n for n in per_seed if n.startswith(("sasrec", "gru4rec", "lstm")) and " intent" not in n]
    baselines += ["decomposer", "plain decomposer"]
    for other in baselines:
        for name in [n for n in per_seed if n.startswith("decomposer") and " intent" not in n]:
            if other in per_seed and name != other:
                boot[f"{name} − {other}"] = seed_user_bootstrap(per_seed[name], per_seed[other])
    return rows, boot


def seed_means(runs: dict, protocol: str, name: str, metric: str = "ndcg@10") -> list[float]:
    return [r["masked"][metric] for k, r in runs.items() if k.rsplit("/", 1)[0] == f"{protocol}/{name}"]


def primary_comparison(runs: dict) -> dict | None:
    """The declared comparison (PRIMARY) from the runs recorded so far; None until both sides have run."""
    p = PRIMARY
    users = {}
    for side in ("model", "baseline"):
        users[side] = np.array(
            [r["user_ndcg@10"] for k, r in runs.items() if k.rsplit("/", 1)[0] == f"{p['protocol']}/{p[side]}"]
        )
    if not len(users["model"]) or not len(users["baseline"]):
        return None
    a = float(np.mean(seed_means(runs, p["protocol"], p["model"], p["metric"])))
    b = float(np.mean(seed_means(runs, p["protocol"], p["baseline"], p["metric"])))
    boot = seed_user_bootstrap(users["model"], users["baseline"])
    return {
        **p,
        "model_mean": round(a, 6),
        "baseline_mean": round(b, 6),
        "ratio": round(a / b, 4),
        "difference": round(a - b, 6),
        "lo": round(boot["lo"], 6),
        "hi": round(boot["hi"], 6),
        "seeds": boot["seeds"],
        "users": boot["users"],
        "interval": "95%, bootstrap over seeds and users (paired by user)",
    }


def intent_table(runs: dict, protocol: str) -> dict:
    """Per regime: the decomposer with the words against the strongest baseline given the same words."""
    out = {}
    no_words = seed_means(runs, protocol, "decomposer")
    for regime in INTENT_REGIMES:
        mine = seed_means(runs, protocol, intent_name("decomposer", regime))
        rivals = {
            name: seed_means(runs, protocol, intent_name(name, regime))
            for name in ("text retrieval", "phrase popularity", *map(fused_name, FUSED))
        }
        rivals = {n: float(np.mean(v)) for n, v in rivals.items() if v}
        if not mine or not rivals:
            continue
        name = max(rivals, key=rivals.get)
        m = float(np.mean(mine))
        out[regime] = {
            "model": round(m, 6),
            "baseline": round(rivals[name], 6),
            "baseline_name": name,
            "ratio": round(m / rivals[name], 4) if rivals[name] else None,
            "model_seeds": len(mine),
            "oracle": regime == "oracle",
        }
        if no_words:
            out[regime]["model_without_words"] = round(float(np.mean(no_words)), 6)
    return out


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
    p.add_argument("--variants", default=";".join(DEFAULT_VARIANTS), help="';'-separated, from: " + "; ".join(VARIANTS))
    p.add_argument("--ablation-protocols", default="loo", help="protocols on which the ablations run")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--time-budget", type=float, help="training seconds per model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--deadline", type=float, help="start no run after this many seconds")
    p.add_argument(
        "--by-variant",
        action="store_true",
        help="every seed of a variant before the next variant (default: every variant of a seed first)",
    )
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        help="another results JSON whose runs join the tables (read only; e.g. runs from another machine)",
    )
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
    if args.by_variant:
        plan = [(p, v, s) for p in protocols for v in variants if v not in ABLATIONS for s in seeds]
    else:
        plan = [(p, v, s) for p in protocols for s in seeds for v in variants if v not in ABLATIONS]
    plan += [
        (p, v, s)
        for p in protocols
        if p in args.ablation_protocols.split(",")
        for s in seeds
        for v in variants
        if v in ABLATIONS
    ]
    plan = [t for t in plan if "/".join(map(str, t)) not in runs]
    t_start = time.perf_counter()

    def save(results: dict) -> None:
        runs.update(results)
        record.update(
            {
                "benchmark": "quality",
                "dataset": args.dataset,
                "machine": machine(),
                "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                "users": data.n_users,
                "items": data.n_items,
                "events": int(len(data.items)),
                "runs": runs,
            }
        )
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
        init = (str(prepared), {p: PROTOCOLS[p] for p in protocols}, args, args.device, threads, os.getpid())
        with ProcessPoolExecutor(
            args.workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=init
        ) as pool:
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
                    print(
                        f"{time.perf_counter() - t_start:6.0f}s {protocol}/{variant}/{seed}: "
                        f"test ndcg@10 {r['masked']['ndcg@10']:.4f} valid {r['valid_ndcg@10']:.4f} "
                        f"epochs {r['epochs_run']} in {r['train_seconds']:.0f}s",
                        flush=True,
                    )
    shown = dict(runs)
    for extra in args.also:
        for key, r in json.loads(extra.read_text())["runs"].items():
            shown.setdefault(key, r)
    tables = {}
    for protocol in protocols:
        rows, boot = aggregate(shown, protocol)
        tables[protocol] = {"rows": rows, "bootstrap": boot}
        print(
            f"\n### {args.dataset}, protocol {protocol} ({len(splits[protocol].test_pos)} test targets, "
            f"history-masked, mean ± std over seeds)\n"
        )
        print(
            format_table(
                rows,
                ["model", "seeds", *METRICS, "ndcg@10 unmasked", "ndcg@10 new targets", "valid ndcg@10", "train s"],
            )
        )
        print(
            "\nExploratory: NDCG@10 differences, 95% bootstrap over seeds and users "
            "(not the declared comparison; read as leads, not findings):"
        )
        for k, v in boot.items():
            print(f"- {k}: {v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] ({v['seeds'][0]}/{v['seeds'][1]} seeds)")
    record["summary"] = tables
    primary = primary_comparison(shown)
    record["primary"] = primary
    if primary:
        print(
            f"\nPrimary comparison (declared before the runs), {primary['protocol']} NDCG@10: "
            f"{primary['model']} {primary['model_mean']:.4f} against {primary['baseline']} "
            f"{primary['baseline_mean']:.4f}: ratio {primary['ratio']:.3f}, difference "
            f"{primary['difference']:+.4f} [{primary['lo']:+.4f}, {primary['hi']:+.4f}] "
            f"({primary['seeds'][0]} and {primary['seeds'][1]} seeds, {primary['users']} users)"
        )
    cold = cold_table(shown, PRIMARY["protocol"])
    record["cold_items"] = cold
    if cold:
        print(
            f"\nCold-start targets ({PRIMARY['protocol']}: items no training event holds; id-only models "
            "have nothing learned about them, their scores are untrained embeddings):"
        )
        for name, c in sorted(cold.items(), key=lambda kv: -kv[1]["ndcg@10"]):
            print(
                f"- {name}: NDCG@10 {c['ndcg@10']:.4f}, HR@10 {c['hr@10']:.4f} "
                f"({c['targets']} targets, {c['seeds']} seeds)"
            )
    intent = intent_table(shown, PRIMARY["protocol"])
    record["intent"] = intent
    for regime, r in intent.items():
        label = " (oracle: the words come from the target)" if r["oracle"] else ""
        print(
            f"intent {regime}{label}: decomposer {r['model']:.4f} against {r['baseline_name']} "
            f"{r['baseline']:.4f} (ratio {r['ratio']}); without words {r.get('model_without_words', float('nan')):.4f}"
        )
    write_json(out, record)
    plot(tables, args.dataset, out.with_suffix(".png"))
    print(f"\nrecorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
