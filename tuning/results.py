"""What a search leaves behind: the trial table, the best configuration, plots, and study bookkeeping.

The table has one row per trial over every session of the run (a resumed search appends), so
`best_config.json` and the plots always describe the whole study.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from ray.tune import Callback

from tuning.space import SearchSpace, dimension_set, trial_settings
from models.files import write_json

TABLE = "results.parquet"
BEST = "best_config.json"
DONE_STATES = ("COMPLETE", "PRUNED", "FAIL")


# ---- Optuna study bookkeeping --------------------------------------------------------------


def finished_trials(storage, study_name: str) -> int:
    """Trials of the study that ended (completed, stopped or failed); 0 for a new study."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return 0
    return sum(t.state.name in DONE_STATES for t in study.get_trials(deepcopy=False))


def close_interrupted(storage, study_name: str) -> int:
    """Trials left RUNNING by an interrupted session are marked failed, so they count and TPE skips them."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in stale:
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


def previous_rows(run_dir: Path) -> int:
    path = run_dir / TABLE
    return len(pd.read_parquet(path)) if path.is_file() else 0


# ---- random search over the same space -------------------------------------------------------


def random_param_space(space: SearchSpace, seed: int) -> dict:
    """A Tune param_space whose one entry draws a whole configuration from the define-by-run space.

    Tune's own domains cannot express the conditional parameters, so each draw runs the same
    `space.suggest` against a throw-away Optuna trial with a uniform random sampler.
    """
    from ray import tune

    return {"params": tune.sample_from(RandomDraw(space, np.random.default_rng(seed)))}


class RandomDraw:
    """Picklable (Tune saves its search state): one uniform draw from the space per call."""

    def __init__(self, space: SearchSpace, rng: np.random.Generator):
        self.space, self.rng = space, rng

    def __call__(self, _spec) -> dict:
        import optuna

        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=int(self.rng.integers(2**31))))
        trial = study.ask()
        fixed = self.space.suggest(trial)  # fills trial.params
        return {**trial.params, **fixed}


# ---- progress ---------------------------------------------------------------------------------


class Progress(Callback):
    """One line per finished trial: its result, the best so far, how many are left."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric, self.done, self.best = total, metric, 0, -math.inf

    def _line(self, trial, what: str) -> None:
        self.done += 1
        value = (trial.last_result or {}).get(self.metric)
        if value is not None:
            self.best = max(self.best, value)
        params = trial.config.get("params", trial.config)
        shown = f"{value:.4f}" if value is not None else "-"
        best = f"{self.best:.4f}" if self.best > -math.inf else "-"
        print(
            f"[tune] trial {self.done}/{self.total} {trial.trial_id} {what}: {self.metric} {shown} "
            f"after {(trial.last_result or {}).get('training_iteration', 0)} epoch(s), "
            f"{dimension_set(params)}, size {params.get('lstm_units', params.get('hidden'))}, "
            f"lr {params.get('lr', 0):.4g}; "
            f"best so far {best}",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED")
        error = getattr(trial, "error_file", None) or ""
        if error:
            print(f"[tune]   its error: {error}", flush=True)


# ---- the table ----------------------------------------------------------------------------------


def trial_rows(grid, session: str, sampler: str, wall_s: float) -> list[dict]:
    """One row per trial of a Tune ResultGrid: parameters, metrics at its best epoch, checkpoint, status."""
    rows = []
    for r in grid:
        params = {k: v for k, v in r.config.get("params", r.config).items() if k != "optuna_trial"}
        history = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        row = {
            "session": session,
            "sampler": sampler,
            "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
            "optuna_trial": r.config.get("optuna_trial"),
            "status": "failed" if r.error else "ok",
            "error": _first_line(r.error),
            "epochs": int(len(history)),
            "dimension_set": dimension_set(params),
            "session_wall_s": wall_s,
        }
        row.update({f"param_{k}": v for k, v in params.items()})
        if len(history) and "valid_ndcg@10" in history:
            best = history.loc[history["valid_ndcg@10"].idxmax()]
            row.update(
                {
                    "best_valid_ndcg@10": float(best["valid_ndcg@10"]),
                    "best_epoch": int(best["epoch"]),
                    "valid_hr@10": float(best.get("valid_hr@10", np.nan)),
                    "valid_mrr": float(best.get("valid_mrr", np.nan)),
                    "train_seconds": float(history["train_seconds"].sum()),
                    "checkpoint": str(best.get("checkpoint_path") or ""),
                }
            )
        rows.append(row)
    return rows


def _first_line(err) -> str:
    if not err:
        return ""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def write_table(run_dir: Path, rows: list[dict]) -> pd.DataFrame:
    """Append this session's rows to the run's table -> the whole table (Parquet and CSV)."""
    path = run_dir / TABLE
    old = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    table = pd.concat([old, pd.DataFrame(rows)], ignore_index=True) if rows else old
    if len(table):
        table = table.drop_duplicates("trial_id", keep="last").reset_index(drop=True)
        table.to_parquet(path.with_suffix(".parquet.tmp"), index=False)
        path.with_suffix(".parquet.tmp").replace(path)
        table.to_csv(run_dir / "results.csv", index=False)
    return table


# ---- the best configuration ------------------------------------------------------------------------


def best_config(table: pd.DataFrame, setup, metric: str) -> dict | None:
    """The trial with the highest validation NDCG@10 and the checkpoint of its best epoch."""
    if not len(table) or "best_valid_ndcg@10" not in table or table["best_valid_ndcg@10"].isna().all():
        return None
    row = table.loc[table["best_valid_ndcg@10"].idxmax()]
    params = {k.removeprefix("param_"): _plain(v) for k, v in row.items() if k.startswith("param_") and not _missing(v)}
    model_args, train = trial_settings(params)
    ckpt = row.get("checkpoint") or ""
    return {
        "search": setup.name,
        "sampler": setup.settings.sampler,
        "metric": metric,
        "value": float(row["best_valid_ndcg@10"]),
        "trial_id": row["trial_id"],
        "optuna_trial": None if _missing(row.get("optuna_trial")) else int(row["optuna_trial"]),
        "epoch": int(row["best_epoch"]),
        "dimension_set": row["dimension_set"],
        "params": params,
        "model_kind": params.get("model", "decomposer"),
        "model_args": {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()},
        "train": {
            "lr": train["lr"],
            "ema_decay": train["ema_decay"],
            "epochs": setup.settings.epochs,
            "batch_size": setup.settings.batch_size,
            "protocol": setup.settings.protocol,
        },
        "checkpoint": ckpt,
        "model": f"{ckpt}/model.pt" if ckpt else "",  # "model": what checkpoint.load reads
        "dataset": str(setup.prepared),
        "optuna_storage": setup.storage_url,
        "study_name": setup.name,
        "n_trials": int(len(table)),
        "n_failed": int((table["status"] == "failed").sum()),
    }


def write_best(run_dir: Path, best: dict | None) -> None:
    if best:
        write_json(run_dir / BEST, best, indent=2)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


# ---- plots ------------------------------------------------------------------------------------------


def study_from_table(table: pd.DataFrame, space: SearchSpace):
    """An in-memory Optuna study rebuilt from the table (random search has none of its own)."""
    import optuna

    study = optuna.create_study(direction="maximize")
    for _, row in table.iterrows():
        params = {
            k.removeprefix("param_"): _plain(v) for k, v in row.items() if k.startswith("param_") and not _missing(v)
        }
        fixed = optuna.trial.FixedTrial(params)
        space.suggest(fixed)  # records the distributions of this branch
        ok = row["status"] == "ok" and not _missing(row.get("best_valid_ndcg@10"))
        study.add_trial(
            optuna.trial.create_trial(
                params=fixed.params,
                distributions=fixed.distributions,
                value=float(row["best_valid_ndcg@10"]) if ok else None,
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            )
        )
    return study


def plots(run_dir: Path, table: pd.DataFrame, space: SearchSpace, study, metric: str) -> list[Path]:
    """Optimisation history, parameter importances, the dimension-set effect -> PNG files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    if not len(table):
        return written
    study = study or study_from_table(table, space)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]

    def save(name: str, draw) -> None:
        try:
            ax = draw()
        except (ValueError, RuntimeError) as e:  # e.g. importances of one trial
            print(f"[tune] plot {name} skipped: {e}", flush=True)
            return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{name}.png")

    if complete:
        save("optimization_history", lambda: ovm.plot_optimization_history(study, target_name=metric))
    if len(complete) >= 2:
        save("param_importances", lambda: ovm.plot_param_importances(study, target_name=metric))
    ok = (
        table[table["status"] == "ok"].dropna(subset=["best_valid_ndcg@10"])
        if "best_valid_ndcg@10" in table
        else table[:0]
    )
    if len(ok):
        save("dimension_sets", lambda: _dimension_plot(ok, plt))
    return written


def _dimension_plot(ok: pd.DataFrame, plt):
    """Validation NDCG@10 of every trial, grouped by its dimension set (best group first)."""
    groups = ok.groupby("dimension_set")["best_valid_ndcg@10"]
    order = groups.max().sort_values(ascending=False).index.tolist()
    fig, ax = plt.subplots()
    for i, label in enumerate(order):
        ys = groups.get_group(label).to_numpy()
        ax.scatter(np.full(len(ys), i), ys, alpha=0.7)
        ax.hlines(ys.max(), i - 0.3, i + 0.3, color="black", linewidth=1)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("best validation NDCG@10 of the trial")
    ax.set_title("Dimension-set effect (bar: best trial of the set)")
    return ax
