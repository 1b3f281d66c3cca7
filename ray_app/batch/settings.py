"""The settings of a batch recommendation job and their command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from models.cli import add_settings, setting, settings_from


@dataclass
class BatchSettings:
    checkpoint: str | None = setting(
        None, "a model.pt, a checkpoint folder, or a Ray Train run folder (its best_checkpoint.json); required"
    )
    data: Path | None = setting(
        None,
        "the users' events: a prepared dataset folder, or an event log (a folder with events.csv or "
        "events.parquet, or that file; docs/data-and-evaluation.md); required",
    )
    out: Path | None = setting(
        None, "the output folder: Parquet shards of user_id, rank, item_id, score, model_version; required"
    )
    store_url: str | None = setting(
        None,
        "the serving store (the API's store_url): the items added while serving (POST /items) are ranked "
        "too, placed by their text as /recommend places them; default: the trained catalogue only",
    )
    k: int = setting(100, "items per user")
    exclude_seen: bool = setting(True, "keep the items a user already has in the ranking", flag="--include-seen")
    at: float | None = setting(
        None, "the moment recommended for, in epoch seconds (the context's clock and gap); default: when the job starts"
    )
    workers: int | None = setting(
        None, "model actors; default: as many as the cluster's CPUs (or GPUs, with --num-gpus) hold when it starts"
    )
    cpus_per_worker: float = setting(1.0, "CPUs of each model actor (its torch threads)")
    num_gpus: float = setting(0.0, "GPUs of each model actor (0: none)")
    users_per_call: int = setting(64, "users ranked in one call of the model (their scores over the catalogue at once)")
    events_per_task: int = setting(200_000, "a prepared dataset's events that a model actor reads at a time")
    overwrite: bool = setting(False, "replace an existing --out, once the new output is complete")
    verbose: bool = setting(
        False, "show Ray's own logs and the workers' output (otherwise in /tmp/ray/session_latest/logs)"
    )


def parse_args(argv=None, description: str | None = None) -> tuple[BatchSettings, argparse.Namespace]:
    """The command line of `python -m ray_app.batch`."""
    p = argparse.ArgumentParser(
        prog="python -m ray_app.batch", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_settings(p, BatchSettings)
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started when RAY_ADDRESS is not set")
    a = p.parse_args(argv)
    for flag, value in (("--checkpoint", a.checkpoint), ("--data", a.data), ("--out", a.out)):
        if value is None:
            p.error(f"{flag} is required")
    for flag, value in (
        ("--k", a.k),
        ("--cpus-per-worker", a.cpus_per_worker),
        ("--users-per-call", a.users_per_call),
        ("--events-per-task", a.events_per_task),
    ):
        if value <= 0:
            p.error(f"{flag} must be positive, got {value:g}")
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    if a.num_gpus < 0:
        p.error(f"--num-gpus must not be negative, got {a.num_gpus:g}")
    return settings_from(BatchSettings, a), a
