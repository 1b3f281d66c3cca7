"""The job's stages before serving: prepare the data, train (or tune, or take a given checkpoint),
evaluate against the baselines; each failure a newcomer can fix is a NewcomerError."""

from __future__ import annotations

from pathlib import Path

from main_job.settings import MainSettings, NewcomerError

ORACLE_ROW = "decomposer + oracle intent (the target's own words)"


def prepare(s: MainSettings) -> Path:
    """The dataset prepared under runs/data (a small synthetic one with --smoke) -> its folder."""
    from models.data.errors import DataError
    from models.data.sources import prepare_source
    from models.data.synthetic import SyntheticConfig

    synthetic = SyntheticConfig(n_users=120, n_items=150, min_events=10, max_events=30) if s.smoke else None
    name = f"{s.dataset}-smoke" if s.smoke else s.dataset
    print(f"\n==> preparing {s.dataset}", flush=True)
    try:
        prepared = prepare_source(
            s.dataset,
            s.data_root / name,
            data_dir=s.data_dir,
            synthetic_config=synthetic,
            min_user_events=s.min_user_events,
        )
    except (DataError, FileExistsError) as e:  # a missing, malformed or unreachable dataset: one line, its fix
        raise NewcomerError(str(e)) from None
    return prepared


def tune(s: MainSettings, prepared: Path) -> Path:
    """A short search (Ray Tune + Optuna, each trial a Ray Train run) -> its best trial's checkpoint."""
    from tuning.search import SearchSettings
    from tuning.search import run as run_search

    print(f"\n==> tuning: {s.tune_samples} trials", flush=True)
    best = run_search(
        SearchSettings(
            dataset=str(prepared),
            num_samples=s.tune_samples,
            seed=s.seed,
            epochs=2 if s.smoke else 10,
            storage_path=str((s.runs / "tune").resolve()),
            verbose=s.verbose,
        ),
        num_cpus=s.num_cpus,
    )
    if not best.get("model"):
        raise NewcomerError("the tuning search finished without a successful trial; see its table in runs/main/tune")
    return Path(best["model"])


def train(s: MainSettings, prepared: Path, model_args: dict) -> Path:
    """One Ray Train run of the decomposer -> its best checkpoint's model file."""
    from ray_app.train.settings import RayTrainSettings
    from ray_app.train.driver import SetupError, run

    print("\n==> training the decomposer with Ray Train", flush=True)
    settings = RayTrainSettings(
        dataset=str(prepared),
        model="decomposer",
        model_args=model_args,
        epochs=2 if s.smoke else s.epochs,
        patience=s.patience,
        seed=s.seed,
        batch_size=s.batch_size,
        storage_path=str((s.runs / "ray").resolve()),
        verbose=s.verbose,
    )
    try:
        best = run(settings, num_cpus=s.num_cpus)
    except SetupError as e:
        raise NewcomerError(str(e)) from None
    return Path(best.model)


def resolve_checkpoint(path: Path) -> Path:
    """`--checkpoint`: what `ray_app.serve.served_model.resolve_checkpoint` accepts, its error a NewcomerError."""
    from ray_app.serve.served_model import ServingSetupError
    from ray_app.serve.served_model import resolve_checkpoint as resolve

    try:
        return resolve(path)
    except ServingSetupError as e:
        raise NewcomerError(f"--checkpoint {e}") from None


def evaluate(s: MainSettings, prepared: Path, checkpoint_path: Path) -> str:
    """The trained decomposer and the baselines on the same split -> the printed table."""
    import torch

    from models.nn import checkpoint
    from models.data.batching import make_split
    from models.data.dataset import load_prepared
    from models.evaluation.metrics import summarize
    from models.evaluation.report import TABLE_METRICS, format_table, table_row
    from models.training.defaults import train_config
    from models.evaluation.evaluate import evaluate as evaluate_model
    from models.training.loop import fit, new_model

    data = load_prepared(prepared)
    split = make_split(data.user_offsets, 1)
    model, _ = checkpoint.load(checkpoint_path)
    # The intent phrase of a test target is drawn from that target's own genres and tags: an oracle,
    # shown for what the context path can carry, not as what a user would type.
    rows = [("decomposer", model, False), (ORACLE_ROW, model, True)]
    for kind in s.baselines:
        print(f"\n==> baseline {kind}", flush=True)
        torch.manual_seed(s.seed)
        base = new_model(kind, data, split)
        fit(
            base,
            data,
            split,
            train_config(
                kind, epochs=2 if s.smoke else s.epochs, patience=s.patience, seed=s.seed, batch_size=s.batch_size
            ),
            desc=kind,
        )
        rows.append((kind, base, False))
    table = []
    for name, m, intent in rows:
        ev = evaluate_model(m, data, split, "test", with_intent=intent)
        table.append(table_row(name, summarize(ev["masked"]), summarize(ev["unmasked"])))
    return format_table(table, ["model", *TABLE_METRICS, "ndcg@10 unmasked"])
