"""Everything checked and planned before a Ray Train run starts: storage, resources, the local
Ray, the data shards of each worker; a run that cannot work stops here with a one-line error.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from models.nn import checkpoint
from models.training.defaults import PROTOCOLS, protocol_split
from models.training.precision import bf16_problem
from ray_app.train.data import (
    SetupError,
    item_counts,
    item_first_seen,
    load_checked,
    read_shards,
    resolve_dataset,
    user_ranges,
)
from ray_app.train.settings import LSTM_MODELS, MODEL_KINDS, RayTrainSettings, check_model_args


def storage_location(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A local folder (made absolute: Train's controller runs elsewhere) or any pyarrow URI."""
    if "://" in storage_path:
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())


def check_storage(storage_path: str, name: str) -> None:
    """Create the run folder and write a probe file: an unwritable path fails here, not after an epoch."""
    try:
        fs, root = storage_location(storage_path)
        run_dir = f"{root.rstrip('/')}/{name}"
        fs.create_dir(run_dir, recursive=True)
        probe = f"{run_dir}/.write-probe"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError, ArrowInvalid, ArrowNotImplementedError...
        raise SetupError(
            f"--storage-path {storage_path}: cannot write the run folder {name!r} there ({type(e).__name__}: {e})"
        ) from None


def check_resources(s: RayTrainSettings) -> None:
    """The whole request must fit the cluster as it is now; otherwise Train would wait forever."""
    import ray

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    asks = [("CPU", s.cpus_per_worker)] + ([("GPU", s.gpus_per_worker)] if s.use_gpu else [])
    for res, per_worker in asks:
        have, need = total.get(res, 0.0), s.num_workers * per_worker
        if need > have:
            raise SetupError(
                f"{s.num_workers} workers × {per_worker:g} {res} need {need:g} {res}, "
                f"the cluster has {have:g}" + (" (no GPU at all)" if res == "GPU" and not have else "")
            )
        biggest = max((n.get(res, 0.0) for n in nodes), default=0.0)
        if per_worker > biggest:
            raise SetupError(f"one worker needs {per_worker:g} {res}, the largest node has {biggest:g}")


def connect(num_cpus: int | None = None, verbose: bool = False) -> float:
    """Join the cluster at RAY_ADDRESS, else start a local one -> seconds it took.

    Quiet unless `verbose`: the logs of Ray's own processes and of the workers stay in Ray's log
    files (`/tmp/ray/session_latest/logs`) instead of the console, and Ray's driver-side messages
    below WARNING are not shown. What a run has to say reaches the console through the driver
    (`EpochLines`, the summary and result lines).
    """
    import ray

    t0 = time.perf_counter()
    if not verbose:
        quiet_console()
    if not ray.is_initialized():
        quiet = {} if verbose else {"log_to_driver": False}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**quiet)
        else:
            ray.init(num_cpus=num_cpus, **quiet)
    return time.perf_counter() - t0


class _ConsoleFilter(logging.Filter):
    """Warnings and errors only, less two notices that ask nothing of the user: Ray's default token
    authentication, and Ray Data's progress bars being off (`ray_app.train.data` turns them off).
    Ray Data's progress, which it logs where the console is not a terminal, is shown."""

    HIDDEN = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled")
    PROGRESS = "ray.data._internal.progress"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self.PROGRESS):
            return True
        return record.levelno >= logging.WARNING and not any(h in record.getMessage() for h in self.HIDDEN)


def quiet_console() -> None:
    """Ray's driver-side console handlers keep warnings only; its log files keep everything."""
    import ray.data  # noqa: F401  configures its own console and file handlers when imported

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not any(isinstance(f, _ConsoleFilter) for f in h.filters):
                h.addFilter(_ConsoleFilter())


@dataclass
class Plan:
    """Everything `TorchTrainer` needs, checked: the loop config, the per-worker shards, the run place."""

    settings: RayTrainSettings
    name: str
    prepared: Path
    loop_config: dict
    datasets: dict
    summary: str


def plan(s: RayTrainSettings, num_cpus: int | None = None) -> Plan:
    """Check every input (SetupError), join or start Ray, read the shards, stage the item tables."""
    import ray

    if s.model not in MODEL_KINDS:
        raise SetupError(f"--model {s.model}: choose from {', '.join(MODEL_KINDS)}")
    if s.protocol not in PROTOCOLS:
        raise SetupError(f"--protocol {s.protocol}: choose from {', '.join(sorted(PROTOCOLS))}")
    check_model_args(s.model, s.model_args)
    for flag, rate in (("--intent-rate", s.intent_rate), ("--wrong-intent-rate", s.wrong_intent_rate)):
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise SetupError(f"{flag} must be in [0, 1], got {rate:g}")
    if s.use_gpu and s.num_workers > 1 and s.gpus_per_worker < 1:
        raise SetupError("--gpus-per-worker below 1 with several workers: NCCL cannot share one GPU between ranks")
    if s.bf16 and not s.use_gpu and s.model in LSTM_MODELS and not os.environ.get("RAY_ADDRESS"):
        problem = bf16_problem("cpu")  # the workers run on this machine
        if problem:
            raise SetupError(f"--bf16: {problem}; train without --bf16, or on GPUs with --use-gpu")
    name = s.run_name()
    check_storage(s.storage_path, name)
    prepared = resolve_dataset(s.dataset, s.data_dir, s.prepared_dir, min_user_events=s.min_user_events)
    data = load_checked(prepared)  # the users' event offsets, not the events
    try:
        split = protocol_split(data.user_offsets, s.protocol)
    except ValueError as e:
        raise SetupError(f"--dataset {prepared}: {e}") from None
    connect(num_cpus, s.verbose)
    if s.check_resources:
        check_resources(s)
    cfg = s.train_config()
    model_args = dict(s.model_args)
    max_len = model_args.get("max_len", checkpoint.MODELS[s.model][0].max_len)
    ranges = user_ranges(data.user_offsets, split, max_len, s.num_workers)
    shards = read_shards(prepared, ranges)  # Ray Data reads the Parquet here, in its own tasks
    loop_config = {
        "model": s.model,
        "model_args": model_args,
        "train": cfg.to_dict(),
        "protocol": s.protocol,
        "dataset": str(prepared),
        "counts": ray.put(item_counts(data, split)),  # items' training events; each worker reads the item tables
        "first_seen": ray.put(item_first_seen(data, split)),  # each item's first training event time
        "users": [ranges.users(r) for r in range(s.num_workers)],
        "windows": int(ranges.windows.sum()),
        "cpus_per_worker": s.cpus_per_worker,
        "bf16": s.bf16,
        "fail_at_epoch": s.fail_at_epoch,
        "fault_marker": _run_path(s.storage_path, name, ".fault-injected"),
    }
    summary = (
        f"{prepared.name}: {data.n_users} users, {data.n_items} items, {data.n_events} events; "
        f"{s.model}, {s.num_workers} worker(s) with {ranges.windows.tolist()} training windows; "
        f"run {name} in {s.storage_path}"
    )
    return Plan(s, name, prepared, loop_config, {f"users_{r}": shard for r, shard in enumerate(shards)}, summary)


def _run_path(storage_path: str, *parts: str) -> str:
    """A path under the storage root as the user wrote it (URI kept, local folder made absolute)."""
    root = storage_path.rstrip("/") if "://" in storage_path else storage_location(storage_path)[1]
    return "/".join([root, *parts])
