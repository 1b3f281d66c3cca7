"""The primary comparison on equal footing: the same search budget for the decomposer and its baseline.

    nice -n 10 python benchmarks/equal_budget.py          # writes benchmarks/results/equal_budget_ml-latest-small.{json,png}
    python benchmarks/equal_budget.py --trials 12 --epochs 20 --seeds 0,1,2   # a larger budget (a GPU, a cluster)

Each model of `MODELS` is searched by `tuning.search` (Ray Tune + Optuna TPE + ASHA) with the
same settings: the same number of trials, epochs per trial, ASHA rungs, sampler seed, split
(last-10) and validation targets, and the same recipe fixed in every space (the seen-item mask
and the weight average, `tuning.space.RECIPE`). The baseline is SASRec given what the decomposer
gets: the MiniLM item text and the rating/time event features. The best configuration of each
search is then retrained from scratch with Ray Train on every seed, with an epoch cap and
patience the report checks no best epoch reached, and scored on the test targets
(history-masked NDCG@10). Popularity is the trivial row. The primary comparison, declared
before the run, is decomposer against the SASRec baseline; its interval resamples seeds and users.
A finished search or retrain is kept in the JSON and skipped on a rerun, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import machine  # noqa: E402  (sibling script)
from search_budget import SearchBudget, parse_budget  # noqa: E402  (sibling script)
from models.cli import setting  # noqa: E402
from models.nn import checkpoint  # noqa: E402
from models.data import load_prepared  # noqa: E402
from models.data.sources import DATA_DIR_HELP, MIN_USER_EVENTS_HELP  # noqa: E402
from models.files import write_json  # noqa: E402
from models.evaluation.metrics import per_user_mean, seed_user_bootstrap  # noqa: E402
from models.training.defaults import protocol_split  # noqa: E402
from models.evaluation.evaluate import HEADLINE, evaluate  # noqa: E402
from models.training.loop import new_model  # noqa: E402
from ray_app.train.data import resolve_dataset  # noqa: E402
from ray_app.train.settings import RayTrainSettings  # noqa: E402
from ray_app.train.preflight import connect  # noqa: E402
from ray_app.train.driver import run as train_run  # noqa: E402
from tuning import search  # noqa: E402
from tuning.results import TABLE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL = "last10"
# name -> (model kind, fixed settings on top of its space). Every space fixes the same recipe.
# The same budget and recipe for the other two trained baselines: the LSTM reads what the
# decomposer reads (its item tower with the text and its event encoder with ratings and times, no
# dimensions or gates); GRU4Rec reads item ids only. Rows of the table, not the primary comparison.
MODELS = {
    "decomposer": ("decomposer", []),
    "sasrec, text and event features": ("sasrec", ["use_text=true", "use_events=true"]),
    "lstm": ("lstm", []),
    "gru4rec": ("gru4rec", []),
}
PRIMARY = {
    "model": "decomposer",
    "baseline": "sasrec, text and event features",
    "protocol": PROTOCOL,
    "metric": "ndcg@10",
}
# Kept affordable for 2 CPU cores: the largest recurrent layers are out of every space (the same
# limit for the decomposer's LSTM, the LSTM baseline's and GRU4Rec's hidden state).
SPACE_LIMITS = {
    "decomposer": ["lstm_units={low: 32, high: 256, log: true}"],
    "lstm": ["lstm_units={low: 32, high: 256, log: true}"],
    "gru4rec": ["hidden={low: 32, high: 256, log: true}"],
}


@dataclass
class EqualBudgetSettings(SearchBudget):
    """The shared search budget, with ASHA's grace period, the retraining seeds and a Train worker's CPUs."""

    grace_period: int = setting(2)
    seeds: str = setting("0,1", "retraining seeds of each best configuration")
    cpus_per_worker: float = setting(2.0)
    data_dir: Path | None = setting(None, DATA_DIR_HELP)
    min_user_events: int | None = setting(None, MIN_USER_EVENTS_HELP)


def search_record(run_dir: Path, best: dict, wall_s: float) -> dict:
    table = pd.read_parquet(run_dir / TABLE)
    keep = [
        c
        for c in table.columns
        if c.startswith("param_")
        or c in ("trial_id", "status", "epochs", "best_valid_ndcg@10", "best_epoch", "train_seconds")
    ]
    rows = json.loads(table[keep].to_json(orient="records"))
    best_so_far = np.fmax.accumulate(table["best_valid_ndcg@10"].to_numpy(dtype=float)).tolist()
    return {
        "trials": len(table),
        "epochs_run": int(table["epochs"].sum()),
        "rows": rows,
        "best_so_far": [None if np.isnan(v) else v for v in best_so_far],
        "best_value": best.get("value"),
        "best_params": best.get("params"),
        "best_model_args": best.get("model_args"),
        "best_train": best.get("train"),
        "wall_s": wall_s,
    }


def test_scores(model_path: str, data, split) -> dict:
    model, _ = checkpoint.load(model_path)
    ev = evaluate(model, data, split, "test")
    return {
        "test_ndcg@10": float(ev["masked"][HEADLINE].mean()),
        "test_hr@10": float(ev["masked"]["hr@10"].mean()),
        "user_ndcg@10": per_user_mean(ev["masked"][HEADLINE], ev["users"]).round(6).tolist(),
    }


def retrain(
    kind: str, found: dict, seed: int, prepared: Path, data, split, args: EqualBudgetSettings, name: str
) -> dict:
    s = RayTrainSettings(
        dataset=str(prepared),
        model=kind,
        model_args=found["best_model_args"],
        protocol=PROTOCOL,
        lr=found["best_train"]["lr"],
        ema_decay=found["best_train"]["ema_decay"] or 0.0,
        epochs=args.retrain_epochs,
        patience=args.retrain_patience,
        seed=seed,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=str(args.storage / "retrain"),
        name=name,
        num_to_keep=1,
    )
    t0 = time.perf_counter()
    best = train_run(s)
    epochs_run = max((h.get("epoch", 0) for h in best.history), default=best.epoch)
    return {
        "seed": seed,
        "best_epoch": best.epoch,
        "epochs_run": epochs_run,
        "best_epoch_below_cap": best.epoch < args.retrain_epochs,
        "valid_ndcg@10": best.valid_ndcg10,
        "wall_s": time.perf_counter() - t0,
        **test_scores(best.model, data, split),
    }


def popularity(data, split) -> dict:
    ev = evaluate(new_model("popular", data, split), data, split, "test")
    return {
        "test_ndcg@10": float(ev["masked"][HEADLINE].mean()),
        "user_ndcg@10": per_user_mean(ev["masked"][HEADLINE], ev["users"]).round(6).tolist(),
    }


def primary(report: dict) -> dict | None:
    runs = report["retrain"]
    a, b = runs.get(PRIMARY["model"], {}), runs.get(PRIMARY["baseline"], {})
    if not a or not b:
        return None
    ua = np.array([r["user_ndcg@10"] for r in a.values()])
    ub = np.array([r["user_ndcg@10"] for r in b.values()])
    diff = seed_user_bootstrap(ua, ub)
    ma, mb = float(ua.mean()), float(ub.mean())
    return {
        **PRIMARY,
        "model_mean": ma,
        "baseline_mean": mb,
        "ratio": ma / mb,
        "difference": diff["mean"],
        "lo": diff["lo"],
        "hi": diff["hi"],
        "seeds": diff["seeds"],
        "users": diff["users"],
        "target_ratio": 1.05,
        "met": bool(ma >= 1.05 * mb and diff["lo"] > 0),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, run) in enumerate(report["searches"].items()):
        ys = [np.nan if v is None else v for v in run["best_so_far"]]
        left.plot(range(1, len(ys) + 1), ys, "-o", color=f"C{i}", label=name)
    left.set_xlabel("trials")
    left.set_ylabel("best validation NDCG@10 so far")
    left.set_title(f"the same search budget ({report['settings']['trials']} trials, ASHA)")
    left.legend(fontsize=8)
    names = list(report["retrain"]) + ["popular"]
    for i, name in enumerate(names):
        vals = (
            [r["test_ndcg@10"] for r in report["retrain"][name].values()]
            if name != "popular"
            else [report["popular"]["test_ndcg@10"]]
        )
        right.bar(i, np.mean(vals), color=f"C{i}", alpha=0.6)
        right.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    right.set_xticks(range(len(names)), [n.replace(", ", ",\n") for n in names], fontsize=8)
    right.set_ylabel("test NDCG@10 (last 10, history-masked)")
    right.set_title("best configurations retrained (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan(s: EqualBudgetSettings, out: Path) -> dict:
    """The report so far (empty unless `out` holds runs of the same budget), its header refreshed."""
    report = json.loads(out.read_text()) if out.is_file() else {}
    unset = tuple(n for n in ("data_dir", "min_user_events") if getattr(s, n) is None)  # runs recorded before them
    settings = s.record(leave_out=("out", "seeds", *unset))
    if report.get("settings") != settings:
        report = {"searches": {}, "retrain": {}}  # another budget: start over
    report.update(
        {
            "benchmark": "equal_budget",
            "dataset": s.dataset,
            "protocol": PROTOCOL,
            "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": settings,
            "models": {k: {"kind": v[0], "fixed": v[1]} for k, v in MODELS.items()},
            "space_limits": SPACE_LIMITS,
            "declared_primary": PRIMARY,
        }
    )
    return report


def run_searches(s: EqualBudgetSettings, prepared: Path, report: dict, save) -> None:
    """Every model of `MODELS` searched with the same budget (a recorded search is skipped)."""
    for name, (kind, fixed) in MODELS.items():
        if name in report["searches"]:
            print(f"search {name}: recorded, skipped", flush=True)
            continue
        key = kind if not fixed else f"{kind}-" + "-".join(f.split("=")[0] for f in fixed)
        settings = search.SearchSettings(
            dataset=str(prepared),
            model=kind,
            protocol=PROTOCOL,
            storage_path=str(s.storage),
            name=key,
            num_samples=s.trials,
            seed=0,
            startup_trials=s.startup_trials,
            epochs=s.epochs,
            grace_period=s.grace_period,
            reduction_factor=3,
            patience=3,
            cpus_per_worker=s.cpus_per_worker,
            space_overrides=[*SPACE_LIMITS.get(kind, []), *fixed],
        )
        t0 = time.perf_counter()
        best = search.run(settings)
        report["searches"][name] = search_record(s.storage / key, best, time.perf_counter() - t0)
        save()


def run_retrains(s: EqualBudgetSettings, prepared: Path, data, split, report: dict, save) -> None:
    """Each search's best configuration retrained on every seed (a recorded seed is skipped)."""
    for seed in [int(x) for x in s.seeds.split(",")]:
        for name, (kind, _) in MODELS.items():
            done = report["retrain"].setdefault(name, {})
            if str(seed) in done:
                continue
            run_name = f"{name.split(',')[0]}-seed{seed}"
            print(f"retrain {name}, seed {seed}", flush=True)
            done[str(seed)] = retrain(kind, report["searches"][name], seed, prepared, data, split, s, run_name)
            report["primary"] = primary(report)
            save()


def finish(report: dict, data, split, out: Path, save) -> None:
    """Popularity, the primary comparison and the epoch-cap check recorded; the plot and the summary."""
    report["popular"] = popularity(data, split)
    report["primary"] = primary(report)
    report["all_best_epochs_below_cap"] = all(
        r["best_epoch_below_cap"] for m in report["retrain"].values() for r in m.values()
    )
    save()
    plot(report, out.with_suffix(".png"))
    summary = {name: [round(r["test_ndcg@10"], 4) for r in runs.values()] for name, runs in report["retrain"].items()}
    print(
        json.dumps(
            {
                "test ndcg@10 per seed": summary,
                "popular": round(report["popular"]["test_ndcg@10"], 4),
                "primary": report["primary"],
            },
            indent=1,
            default=str,
        )
    )


def main(argv=None) -> int:
    s = parse_budget(EqualBudgetSettings, __doc__, argv)
    out = s.out or RESULTS / f"equal_budget_{Path(s.dataset).name}.json"
    prepared = resolve_dataset(s.dataset, s.data_dir, min_user_events=s.min_user_events)
    data = load_prepared(prepared)
    split = protocol_split(data.user_offsets, PROTOCOL)
    report = plan(s, out)

    def save() -> None:
        write_json(out, report, indent=2)

    # A trial's driver holds a sliver of a CPU beside its Train worker: one logical CPU more than
    # the worker's, so a 2-CPU worker fits on a 2-core machine.
    connect(int(np.ceil(s.cpus_per_worker)) + 1)
    run_searches(s, prepared, report, save)
    run_retrains(s, prepared, data, split, report, save)
    finish(report, data, split, out, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
