"""The settings of a Ray Train run, their command line, and the checks of a model's overrides."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from models.data.sources import DATA_DIR_HELP, DATASETS, MIN_USER_EVENTS_HELP
from models.evaluation.evaluate import HEADLINE
from models.cli import add_settings, setting, settings_from
from models.nn import checkpoint
from models.training.defaults import PROTOCOLS, train_config
from models.training.loop import TrainConfig
from ray_app.train.data import SetupError

METRIC = f"valid_{HEADLINE}"  # what checkpoints are ranked by and early stopping watches


MODEL_KINDS = ("decomposer", "lstm", "gru4rec", "sasrec")  # the trainable ones; most-popular needs no training


LSTM_MODELS = ("decomposer", "lstm")  # oneDNN's bf16 LSTM needs native bf16 on a CPU (models/training/precision.py)


FIXED_BY_DATA = ("n_items", "n_genres", "text_dim")


@dataclass
class RayTrainSettings:
    dataset: str = setting("synthetic", f"{' | '.join(DATASETS)} | a prepared folder")
    data_dir: Path | None = setting(None, DATA_DIR_HELP)
    min_user_events: int | None = setting(None, MIN_USER_EVENTS_HELP)
    prepared_dir: Path | None = setting(None, "where a named dataset is prepared (default runs/data/NAME)")
    model: str = setting("decomposer", choices=MODEL_KINDS)
    model_args: dict = field(default_factory=dict)  # typed overrides of the model's config (--set KEY=VALUE)
    protocol: str = setting("loo", choices=sorted(PROTOCOLS))
    epochs: int = setting(200)
    patience: int = setting(10, "epochs without a better validation NDCG@10")
    seed: int = setting(0)
    lr: float | None = setting(None, "learning rate (default: the model's, models.training.defaults.TRAIN_DEFAULTS)")
    batch_size: int | None = setting(None, "training windows per step, over all workers (default 64)")
    ema_decay: float | None = setting(
        None,
        "validate and keep a moving average of the weights, θ̄ ← D·θ̄ + (1 − D)·θ after every step "
        "(default: the model's, 0.98 for the decomposer); 0 turns it off",
        metavar="D",
    )
    intent_rate: float | None = setting(
        None,
        "share of training positions whose context carries words from the target's phrases "
        "(default 0.3; 0: a model trained on no target-derived words)",
    )
    wrong_intent_rate: float | None = setting(None, "share of those words that are a phrase the target does not carry")
    time_budget_s: float | None = setting(None, "seconds of training, summed over epochs", flag="--time-budget")
    max_steps: int | None = setting(None, "at most this many training steps per epoch (benchmarks, smoke runs)")
    num_workers: int = setting(1)
    cpus_per_worker: float = setting(1.0)
    use_gpu: bool = setting(False, "one GPU per worker (see --gpus-per-worker)")
    gpus_per_worker: float = setting(1.0)
    bf16: bool = setting(
        False,
        "bfloat16 autocast in training: GPUs, and CPUs with native bf16 (AVX-512 BF16 or "
        "AMX); refused on a local CPU without it, float32 with a warning on such a cluster worker",
    )
    storage_path: str = setting("runs/ray", "local folder or pyarrow URI (s3://, gs://, ...)")
    name: str | None = setting(None, "run name; the same name resumes from its latest checkpoint")
    max_failures: int = setting(2, "worker-group restarts from the latest checkpoint")
    num_to_keep: int = setting(3, "best checkpoints kept (the latest is kept too)", flag="--keep")
    check_resources: bool = setting(
        True, "autoscaling cluster: do not require the resources to be there already", flag="--skip-resource-check"
    )
    fail_at_epoch: int | None = setting(None, "testing: rank 0 exits once before reporting this epoch")
    verbose: bool = setting(
        False, "show Ray's own logs and the workers' output (otherwise in /tmp/ray/session_latest/logs)"
    )

    def train_config(self) -> TrainConfig:
        given = {
            k: v
            for k, v in (
                ("lr", self.lr),
                ("batch_size", self.batch_size),
                ("max_steps", self.max_steps),
                ("intent_rate", self.intent_rate),
                ("wrong_intent_rate", self.wrong_intent_rate),
            )
            if v is not None
        }
        if self.ema_decay is not None:
            given["ema_decay"] = self.ema_decay or None  # 0 turns the average off
        return train_config(
            self.model,
            epochs=self.epochs,
            patience=self.patience,
            seed=self.seed,
            time_budget_s=self.time_budget_s,
            **given,
        )

    def run_name(self) -> str:
        if self.name:
            return self.name
        return f"{self.model}-{Path(self.dataset).name}-{datetime.now():%Y%m%d-%H%M%S}"


def parse_model_args(kind: str, pairs: list[str]) -> dict:
    """["lstm_units=64", "dims=topic,time"] → typed overrides of the model's config dataclass."""
    from pydantic import TypeAdapter, ValidationError

    cfg_cls = checkpoint.MODELS[kind][0]
    hints = typing.get_type_hints(cfg_cls)
    allowed = sorted(f.name for f in dataclasses.fields(cfg_cls) if f.init and f.name not in FIXED_BY_DATA)
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SetupError(f"--set {pair!r}: expected KEY=VALUE")
        if key in FIXED_BY_DATA:
            raise SetupError(f"--set {key}: fixed by the dataset, cannot be overridden")
        if key not in allowed:
            raise SetupError(
                f"--set {key}: not a setting of {cfg_cls.__name__} ({kind}); choose from {', '.join(allowed)}"
            )
        sequence = typing.get_origin(hints[key]) in (tuple, list)
        value = [v.strip() for v in raw.split(",") if v.strip()] if sequence else raw  # dims=topic,time
        try:
            out[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as e:
            raise SetupError(f"--set {key}={raw}: {e.errors()[0]['msg']}") from None
    check_model_args(kind, out)
    return out


def check_model_args(kind: str, args: dict) -> None:
    """Overrides that the model's config accepts (its own checks included), else SetupError."""
    cfg_cls = checkpoint.MODELS[kind][0]
    try:
        cfg_cls(**{"n_items": 1, **args})
    except (TypeError, ValueError) as e:
        raise SetupError(f"--set: {e}") from None


def parse_args(argv=None, description: str | None = None) -> tuple[RayTrainSettings, argparse.Namespace]:
    """The command line of `python -m ray_app.train` (its description: the driver's docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m ray_app.train", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_settings(p, RayTrainSettings)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, repeatable (e.g. --set lstm_units=64 --set dims=topic,time)",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started when RAY_ADDRESS is not set")
    a = p.parse_args(argv)
    for flag, value in (
        ("--num-workers", a.num_workers),
        ("--epochs", a.epochs),
        ("--patience", a.patience),
        ("--keep", a.num_to_keep),
        ("--cpus-per-worker", a.cpus_per_worker),
        ("--gpus-per-worker", a.gpus_per_worker),
    ):
        if value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    if a.max_steps is not None and a.max_steps <= 0:
        p.error(f"--max-steps must be positive, got {a.max_steps}")
    if a.ema_decay is not None and not 0.0 <= a.ema_decay < 1.0:
        p.error(f"--ema-decay must be in [0, 1), got {a.ema_decay}")
    try:
        model_args = parse_model_args(a.model, a.set)
    except SetupError as e:
        p.error(str(e))
    return settings_from(RayTrainSettings, a, model_args=model_args), a
