"""Search a model's shape with Ray Tune: Optuna's TPE (or random search) and ASHA.

    python -m tuning.search --smoke-test                                  # tiny synthetic search
    python -m tuning.search --dataset ml-latest-small --protocol last10 --model sasrec \\
        --space-override use_text=true --space-override use_events=true   # a baseline, same budget
    python -m tuning.search --dataset ml-latest-small --num-samples 30 --epochs 8 --name ml-small
    python -m tuning.search --dataset ml-latest-small --name ml-small --num-samples 40   # resumes: 10 more
    python -m tuning.search --space-override 'lstm_units={low: 64, high: 256, log: true}' \\
        --space-override combine=concat --space-file space.yaml --optuna-storage postgresql://host/db

Each trial is one Ray Train run of `ray_app.train` (Train V2 pattern: the Tune function builds
and fits the `TorchTrainer`; `TuneReportCallback` forwards every epoch's report to Tune), so a
trial can use several workers or GPUs on a cluster. ASHA stops weak trials after whole epochs;
the objective is the trial's best validation NDCG@10 so far, which is also what its best
checkpoint holds. The Optuna study lives in an RDB storage (SQLite in the run folder by
default), so running the same `--name` again continues the study: `--num-samples` is the
study's total, and only the missing trials run. Outputs in `<storage-path>/<name>/`:
`best_config.json` (with the checkpoint serving loads), `results.parquet` / `results.csv`
and `plots/*.png`. Bad input stops with a one-line error (exit 2) before any trial starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from models.cli import add_settings, setting, settings_from
from ray_app.train.data import SetupError, load_checked, resolve_dataset
from ray_app.train.settings import METRIC, RayTrainSettings
from ray_app.train.driver import build_trainer, exit_status
from ray_app.train.preflight import check_storage, connect, plan
from tuning import results
from models.data.sources import DATA_DIR_HELP, DATASETS, MIN_USER_EVENTS_HELP
from models.training.defaults import PROTOCOLS
from tuning.space import MODEL_SPACES, SearchSpace, SpaceError

OBJECTIVE = f"best_{METRIC}"  # best validation NDCG@10 so far in the trial: ASHA and Optuna both read it
MODE = "max"
TRIAL_DRIVER_CPU = 0.01
SMOKE_SPACE = ["lstm_units=[16, 32]", "dim_size=[8, 16]", "max_len=[10, 20]", "max_latent=2"]


@dataclass
class SearchSettings:
    dataset: str = setting("synthetic", f"{' | '.join(DATASETS)} | a prepared folder")
    model: str = setting(
        "decomposer",
        "the model searched; each has its space in tuning/space.py, with the same recipe fixed",
        choices=tuple(MODEL_SPACES),
    )
    protocol: str = setting(
        "loo", "the split: loo (validation = the event before the last) or last10", choices=sorted(PROTOCOLS)
    )
    data_dir: Path | None = setting(None, DATA_DIR_HELP)
    min_user_events: int | None = setting(None, MIN_USER_EVENTS_HELP)
    prepared_dir: Path | None = setting(None, "where a named dataset is prepared (default runs/data/NAME)")
    storage_path: str = setting("runs/tune", "folder that holds the run folder (<storage-path>/<name>)")
    name: str | None = setting(None, "run name; the same name continues the same Optuna study")
    sampler: str = setting("tpe", "tpe (OptunaSearch) | random (BasicVariantGenerator)", choices=("tpe", "random"))
    num_samples: int = setting(20, "trials in the study (earlier sessions count)")
    time_budget_s: float | None = setting(None, "wall-clock seconds for this session's trials", flag="--time-budget")
    seed: int = setting(0, "sampler and training seed")
    startup_trials: int | None = setting(None, "TPE's random start (default: a third of --num-samples, 2..10)")
    epochs: int = setting(10, "epochs per trial at most (ASHA max_t)")
    grace_period: int = setting(1, "epochs before ASHA may stop a trial")
    reduction_factor: int = setting(2, "ASHA: keep 1/rf of the trials at each rung")
    patience: int = setting(3, "early stopping inside a trial")
    batch_size: int | None = setting(None, "training windows per step (default the trainer's)")
    intent_rate: float | None = setting(
        None, "share of training positions with words from the target (default the trainer's 0.3; 0: none)"
    )
    num_workers: int = setting(1, "Train workers per trial")
    cpus_per_worker: float = setting(1.0)
    use_gpu: bool = setting(False)
    optuna_storage: str | None = setting(None, "Optuna RDB URL (default sqlite:///<run folder>/optuna.db)")
    space_overrides: list[str] = setting(
        help="value read as YAML: 64 (fixed), [concat, sum] (choices), {low: 32, high: 256, log: true}; repeatable",
        flag="--space-override",
        metavar="KEY=VALUE",
        factory=list,
    )
    space_files: list[Path] = setting(
        help="YAML or JSON mapping of overrides; repeatable", flag="--space-file", factory=list
    )
    verbose: bool = setting(
        False, "show Ray's own logs and the trials' output (otherwise in /tmp/ray/session_latest/logs)"
    )

    def run_name(self) -> str:
        return self.name or f"search-{Path(self.dataset).name}-{datetime.now():%Y%m%d-%H%M%S}"


@dataclass
class Setup:
    """A checked search: nothing here can fail once trials start."""

    settings: SearchSettings
    name: str
    run_dir: Path
    space: SearchSpace
    prepared: Path
    storage_url: str | None
    storage: object | None  # the opened Optuna RDBStorage (TPE only)
    remaining: int
    done_before: int


# ---- checks before any trial -----------------------------------------------------------------


def prepare(s: SearchSettings) -> Setup:
    if s.num_samples < 1:
        raise SetupError(f"--num-samples must be at least 1, got {s.num_samples}")
    if s.time_budget_s is not None and s.time_budget_s <= 0:
        raise SetupError(f"--time-budget must be positive, got {s.time_budget_s:g}")
    if s.protocol not in PROTOCOLS:
        raise SetupError(f"--protocol {s.protocol}: choose from {', '.join(sorted(PROTOCOLS))}")
    if s.sampler not in ("tpe", "random"):
        raise SetupError(f"--sampler {s.sampler}: choose from tpe, random")
    for flag, v in (
        ("--epochs", s.epochs),
        ("--grace-period", s.grace_period),
        ("--patience", s.patience),
        ("--num-workers", s.num_workers),
    ):
        if v < 1:
            raise SetupError(f"{flag} must be at least 1, got {v}")
    if s.reduction_factor < 2:
        raise SetupError(f"--reduction-factor must be at least 2, got {s.reduction_factor}")
    if s.sampler == "random" and s.optuna_storage:
        raise SetupError("--optuna-storage: only --sampler tpe keeps an Optuna study")
    if "://" in s.storage_path:
        raise SetupError(
            f"--storage-path {s.storage_path}: the run folder holds the tables and plots; "
            "give a local or mounted folder"
        )
    try:
        space = SearchSpace.from_overrides(s.space_overrides, s.space_files, model=s.model)
    except SpaceError as e:
        raise SetupError(str(e)) from None
    name = s.run_name()
    check_storage(s.storage_path, name)
    run_dir = Path(s.storage_path).expanduser().resolve() / name
    prepared = resolve_dataset(s.dataset, s.data_dir, s.prepared_dir, min_user_events=s.min_user_events)
    load_checked(prepared)
    url = storage = None
    if s.sampler == "tpe":
        url = s.optuna_storage or f"sqlite:///{run_dir / 'optuna.db'}"
        storage = open_storage(url)
        results.close_interrupted(storage, name)  # an interrupted session's trial counts as failed
        done = results.finished_trials(storage, name)
    else:
        done = results.previous_rows(run_dir)
    return Setup(s, name, run_dir, space, prepared, url, storage, max(0, s.num_samples - done), done)


def open_storage(url: str):
    """The Optuna RDB storage at `url`, connected now: an unreachable one fails before any trial."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # sqlalchemy raises OperationalError, ArgumentError, ImportError (no driver)...
        raise SetupError(
            f"--optuna-storage {redact(url)}: cannot open it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def redact(url: str) -> str:
    """The URL without its password, for error messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


# ---- one trial: a Ray Train run ----------------------------------------------------------------


def run_trial(config: dict, base: RayTrainSettings) -> None:
    """Tune function: build the trial's `TorchTrainer` from `ray_app.train` and fit it."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tuning.space import trial_settings

    params = config.get("params", config)  # random search nests them (see search_algorithm)
    model_args, train = trial_settings(params)
    crash = train["fail_at_epoch"] is not None
    s = dataclasses.replace(
        base,
        model_args=model_args,
        lr=train["lr"],
        ema_decay=train["ema_decay"],
        name=ray.tune.get_context().get_trial_id(),
        fail_at_epoch=train["fail_at_epoch"],
        max_failures=0 if crash else base.max_failures,
    )
    trainer = build_trainer(plan(s))
    # The trial is a Train V2 driver: every epoch's report (and its checkpoint path) goes on to Tune.
    trainer.run_config.callbacks.append(TuneReportCallback())
    trainer.fit()


def search_algorithm(setup: Setup, storage):
    """(search algorithm, Tune param_space) for the chosen sampler, over the same define-by-run space."""
    s = setup.settings
    if s.sampler == "random":
        from ray.tune.search import BasicVariantGenerator

        # Offset by the trials already run, so a resumed random search does not redraw the same configurations.
        seed = s.seed + setup.done_before
        return BasicVariantGenerator(max_concurrent=1, random_state=seed), results.random_param_space(setup.space, seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # group=True
    startup = s.startup_trials if s.startup_trials is not None else min(10, max(2, s.num_samples // 3))
    # multivariate + group: TPE models the parameters jointly and per conditional branch.
    sampler = optuna.samplers.TPESampler(
        seed=s.seed + setup.done_before, n_startup_trials=startup, multivariate=True, group=True
    )

    return OptunaSearch(
        space=Define(setup.space), metric=OBJECTIVE, mode=MODE, sampler=sampler, study_name=setup.name, storage=storage
    ), None


@dataclass
class Define:
    """The define-by-run function OptunaSearch calls (a picklable object: Tune saves the searcher)."""

    space: SearchSpace

    def __call__(self, trial) -> dict:
        return {**self.space.suggest(trial), "optuna_trial": trial.number}  # links table rows to the study


def trial_base(setup: Setup) -> RayTrainSettings:
    """The Ray Train settings every trial starts from; each trial replaces the sampled ones (see run_trial)."""
    s = setup.settings
    return RayTrainSettings(
        dataset=str(setup.prepared),
        model=s.model,
        protocol=s.protocol,
        epochs=s.epochs,
        patience=s.patience,
        seed=s.seed,
        batch_size=s.batch_size,
        intent_rate=s.intent_rate,
        num_workers=s.num_workers,
        cpus_per_worker=s.cpus_per_worker,
        use_gpu=s.use_gpu,
        storage_path=str(setup.run_dir / "trials"),
        num_to_keep=1,
    )


def build_tuner(setup: Setup, session: str):
    """The `Tuner` of this session's remaining trials: one at a time, ASHA over whole epochs."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from tuning.cleanup import ReleaseWorkerGroups

    s = setup.settings
    base = trial_base(setup)
    algo, param_space = search_algorithm(setup, setup.storage)
    callbacks = [results.Progress(setup.remaining, OBJECTIVE)]
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray: every worker group is ours
        bundle = {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {})}
        callbacks.append(ReleaseWorkerGroups(bundle))
    return ray.tune.Tuner(
        # The trial function only drives Train; its workers hold the CPUs (or GPUs). Tune wants a
        # non-empty request, so a sliver of a CPU.
        ray.tune.with_resources(ray.tune.with_parameters(run_trial, base=base), {"cpu": TRIAL_DRIVER_CPU}),
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=OBJECTIVE,
            mode=MODE,
            search_alg=algo,
            num_samples=setup.remaining,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=s.epochs,
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
            ),
            max_concurrent_trials=1,
            time_budget_s=s.time_budget_s,
        ),
        run_config=ray.tune.RunConfig(
            name=session,
            storage_path=str(setup.run_dir),
            verbose=0,
            callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )


def write_outputs(setup: Setup, rows: list) -> dict:
    """The table (earlier sessions' rows and `rows`), the best configuration and the plots, written
    to the run folder and summed up on the console -> the best configuration record."""
    import optuna

    storage = setup.storage
    table = results.write_table(setup.run_dir, rows)
    study = optuna.load_study(study_name=setup.name, storage=storage) if storage is not None else None
    best = results.best_config(table, setup, OBJECTIVE)
    results.write_best(setup.run_dir, best)
    results.plots(setup.run_dir, table, setup.space, study, OBJECTIVE)
    n_failed = int((table["status"] == "failed").sum()) if len(table) else 0
    if best:
        print(
            f"best: trial {best['trial_id']} {OBJECTIVE} {best['value']:.4f} ({best['dimension_set']}); "
            f"checkpoint {best['model']}",
            flush=True,
        )
    print(f"{len(table)} trial(s) in the table, {n_failed} failed; outputs in {setup.run_dir}", flush=True)
    return best


def run(s: SearchSettings, num_cpus: int | None = None) -> dict:
    """Check, search, write the outputs -> the best configuration record (see results.best_config)."""
    import optuna

    setup = prepare(s)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    session = f"session-{datetime.now():%Y%m%d-%H%M%S}"
    print(
        f"search {setup.name}: {s.sampler}, {setup.done_before} trial(s) done before, {setup.remaining} to run "
        f"(≤ {s.epochs} epochs each, ASHA grace {s.grace_period}); run folder {setup.run_dir}",
        flush=True,
    )
    rows = []
    if setup.remaining:
        connect(num_cpus, s.verbose)
        tuner = build_tuner(setup, session)
        t0 = time.perf_counter()
        grid = tuner.fit()
        rows = results.trial_rows(grid, session, s.sampler, time.perf_counter() - t0)
    best = write_outputs(setup, rows)
    return best or {}


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[SearchSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m tuning.search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_settings(p, SearchSettings)
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started when RAY_ADDRESS is not set")
    p.add_argument("--smoke-test", action="store_true", help="a tiny search: 3 trials of 2 epochs, small models")
    a = p.parse_args(argv)
    s = settings_from(SearchSettings, a)
    if a.smoke_test:
        s = dataclasses.replace(
            s,
            num_samples=3,
            epochs=2,
            patience=2,
            batch_size=s.batch_size or 16,
            space_overrides=SMOKE_SPACE + s.space_overrides,
        )
    return s, a


def main(argv=None) -> int:
    """`python -m tuning.search` -> its exit status."""
    s, a = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return exit_status(run, s, a.num_cpus)


if __name__ == "__main__":
    sys.exit(main())
