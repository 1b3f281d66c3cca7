"""TPE against random search on ml-latest-small, then the best configuration against the default.

    nice -n 10 python benchmarks/tuning_search.py                      # writes benchmarks/results/tuning.{json,png}
    python benchmarks/tuning_search.py --trials 6 --seeds 0,1 --epochs 3 --retrain-epochs 6

Each search is `tuning.search` with the same trial budget, ASHA and space; the sampler is Optuna's
TPE (OptunaSearch) or Tune's BasicVariantGenerator drawing from the same define-by-run space.
Reported: best validation NDCG@10 against the number of trials for every (sampler, seed), and how
many trials each needed to reach the stated target (a share of the best value any search found).
Then the best configuration found is retrained from scratch with Ray Train and compared with the
default configuration on test NDCG@10 (history-masked, leave-one-out), same epochs and seed.
A finished search is kept in the JSON and skipped on a rerun, so an interrupted benchmark resumes.
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
from search_budget import SearchBudget, parse_budget, redefault  # noqa: E402  (sibling script)
from models.cli import setting  # noqa: E402
from models.nn import checkpoint  # noqa: E402
from models.data.batching import make_split  # noqa: E402
from models.data import load_prepared  # noqa: E402
from models.evaluation.evaluate import HEADLINE, evaluate  # noqa: E402
from ray_app.train.data import resolve_dataset  # noqa: E402
from ray_app.train.settings import RayTrainSettings  # noqa: E402
from ray_app.train.preflight import connect  # noqa: E402
from ray_app.train.driver import run as train_run  # noqa: E402
from tuning import search  # noqa: E402
from tuning.results import TABLE  # noqa: E402
from models.files import write_json

RESULTS = Path(__file__).resolve().parent / "results"
# Kept affordable for 2 shared CPU cores: the upper LSTM sizes and the longest histories are out.
SPACE = ["lstm_units={low: 32, high: 256, log: true}", "max_len=[50, 100]"]
SHARED_NOTE = (
    "machine was shared: 2 CPU cores used by several engineers' jobs at once, "
    "so times are inflated and noisy; quality figures are unaffected"
)
SAMPLERS = ("tpe", "random")


@dataclass
class TuningSettings(SearchBudget):
    """The shared search budget with this comparison's defaults, the searches' seeds, the batch size and the target."""

    epochs: int = redefault(SearchBudget, "epochs", 3)
    retrain_epochs: int = redefault(SearchBudget, "retrain_epochs", 6)
    retrain_patience: int = redefault(SearchBudget, "retrain_patience", 3)
    storage: Path = redefault(SearchBudget, "storage", Path("runs/bench-tuning"))
    out: Path = redefault(SearchBudget, "out", RESULTS / "tuning.json")
    seeds: str = setting("0,1", "seeds of the searches: each sampler searches once per seed")
    batch_size: int = setting(128)
    target_share: float = setting(0.97, "target = share × best value of any search")


def curve(run_dir: Path) -> list[float | None]:
    """Best validation NDCG@10 after each trial, in the order the trials ended (None before any success)."""
    table = pd.read_parquet(run_dir / TABLE)
    best, out = -np.inf, []
    for v in table["best_valid_ndcg@10"]:
        if not pd.isna(v):
            best = max(best, float(v))
        out.append(best if np.isfinite(best) else None)
    return out


def trials_to(values: list[float | None], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v is not None and v >= target), None)


def test_ndcg(model_path: str, prepared: Path) -> dict:
    model, _ = checkpoint.load(model_path)
    data = load_prepared(prepared)
    split = make_split(data.user_offsets, 1)
    ev = evaluate(model, data, split, "test")
    return {
        "test_ndcg@10": float(ev["masked"][HEADLINE].mean()),
        "test_hr@10": float(ev["masked"]["hr@10"].mean()),
        "test_ndcg@10_unmasked": float(ev["unmasked"][HEADLINE].mean()),
    }


def retrain(name: str, model_args: dict, lr: float | None, prepared: Path, args: TuningSettings) -> dict:
    s = RayTrainSettings(
        dataset=str(prepared),
        model_args=model_args,
        lr=lr,
        epochs=args.retrain_epochs,
        patience=args.retrain_patience,
        seed=0,
        batch_size=args.batch_size,
        storage_path=str(args.storage / "retrain"),
        name=name,
        num_to_keep=1,
    )
    t0 = time.perf_counter()
    best = train_run(s)
    return {
        "model_args": model_args,
        "lr": lr,
        "checkpoint": best.model,
        "best_epoch": best.epoch,
        "valid_ndcg@10": best.valid_ndcg10,
        "wall_s": time.perf_counter() - t0,
        **test_ndcg(best.model, prepared),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, run in report["searches"].items():
        ys = [np.nan if v is None else v for v in run["best_so_far"]]
        ax.plot(
            range(1, len(ys) + 1),
            ys,
            "-o" if run["sampler"] == "tpe" else "--s",
            color="C0" if run["sampler"] == "tpe" else "C1",
            alpha=0.8,
            label=key,
        )
    if report.get("target") is not None:
        ax.axhline(report["target"], color="grey", linewidth=1, label=f"target {report['target']:.4f}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trials")
    ax.set_ylabel("best validation NDCG@10 so far")
    ax.set_title("ml-latest-small: TPE (solid) vs random (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan(s: TuningSettings) -> dict:
    """The report so far (its recorded searches are kept), its header refreshed."""
    report = json.loads(s.out.read_text()) if s.out.is_file() else {}
    report.update(
        {
            "benchmark": "tuning",
            "dataset": s.dataset,
            "machine": machine(),
            "note": SHARED_NOTE,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": s.record(),
            "space_overrides": SPACE,
        }
    )
    report.setdefault("searches", {})
    return report


def run_searches(s: TuningSettings, prepared: Path, report: dict, save) -> None:
    """TPE and random search on every seed, the same budget each (a recorded search is skipped)."""
    for seed in [int(x) for x in s.seeds.split(",")]:
        for sampler in SAMPLERS:
            key = f"{sampler}-seed{seed}"
            if key in report["searches"] and report["searches"][key].get("trials") == s.trials:
                print(f"{key}: recorded, skipped", flush=True)
                continue
            settings = search.SearchSettings(
                dataset=str(prepared),
                storage_path=str(s.storage),
                name=key,
                sampler=sampler,
                num_samples=s.trials,
                seed=seed,
                startup_trials=s.startup_trials,
                epochs=s.epochs,
                grace_period=1,
                reduction_factor=3,
                patience=2,
                batch_size=s.batch_size,
                space_overrides=SPACE,
            )
            t0 = time.perf_counter()
            best = search.run(settings)
            values = curve(s.storage / key)
            report["searches"][key] = {
                "sampler": sampler,
                "seed": seed,
                "trials": len(values),
                "best_so_far": values,
                "best": best.get("value"),
                "best_params": best.get("params"),
                "best_model_args": best.get("model_args"),
                "best_lr": best.get("train", {}).get("lr"),
                "best_checkpoint": best.get("model"),
                "wall_s": time.perf_counter() - t0,
            }
            save()


def compare_samplers(s: TuningSettings, report: dict) -> dict:
    """The target, the trials each search needed to reach it, and the summary per sampler (recorded too)."""
    runs = report["searches"]
    finals = [r["best"] for r in runs.values() if r["best"] is not None]
    report["target"] = s.target_share * max(finals) if finals else None
    report["target_rule"] = f"{s.target_share:g} × the best validation NDCG@10 found by any search"
    for r in runs.values():
        r["trials_to_target"] = trials_to(r["best_so_far"], report["target"]) if report["target"] else None
    summary = {}
    for sampler in SAMPLERS:
        mine = [r for r in runs.values() if r["sampler"] == sampler]
        reached = [r["trials_to_target"] for r in mine]
        summary[sampler] = {
            "mean_best": float(np.mean([r["best"] for r in mine])) if mine else None,
            "trials_to_target": reached,
            "mean_trials_to_target (unreached = budget + 1)": float(
                np.mean([t if t else s.trials + 1 for t in reached])
            )
            if mine
            else None,
        }
    report["summary"] = summary
    return summary


def retrain_winner(s: TuningSettings, prepared: Path, report: dict) -> None:
    """The best configuration any search found and the default one retrained alike, unless already recorded."""
    runs = report["searches"]
    winner_key = max(runs, key=lambda k: runs[k]["best"] or -1)
    winner = runs[winner_key]
    done = report.get("retrain", {})
    if done.get("from") != winner_key or done.get("epochs") != s.retrain_epochs:
        tuned = retrain(f"tuned-{winner_key}", winner["best_model_args"], winner["best_lr"], prepared, s)
        default = retrain("default", {}, None, prepared, s)
        report["retrain"] = {
            "from": winner_key,
            "epochs": s.retrain_epochs,
            "tuned": tuned,
            "default": default,
            "tuned_beats_default": tuned["test_ndcg@10"] > default["test_ndcg@10"],
        }


def main(argv=None) -> int:
    s = parse_budget(TuningSettings, __doc__, argv)
    prepared = resolve_dataset(s.dataset)
    report = plan(s)
    connect(2)
    t_start = time.perf_counter()

    def save() -> None:
        s.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(s.out, report, indent=2)

    run_searches(s, prepared, report, save)
    summary = compare_samplers(s, report)
    save()
    retrain_winner(s, prepared, report)
    report["elapsed_s_this_invocation"] = time.perf_counter() - t_start
    save()
    plot(report, s.out.with_suffix(".png"))
    print(
        json.dumps(
            {
                "summary": summary,
                "target": report["target"],
                "retrain": {k: report["retrain"][k] for k in ("from", "tuned_beats_default")},
                "tuned_test": report["retrain"]["tuned"]["test_ndcg@10"],
                "default_test": report["retrain"]["default"]["test_ndcg@10"],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
