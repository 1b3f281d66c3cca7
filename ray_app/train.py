"""Train on a Ray cluster: a `TorchTrainer` over the epoch code shared with the local run.

    python -m ray_app.train                                         # synthetic data, local Ray
    python -m ray_app.train --dataset ml-latest-small --num-workers 2 --epochs 30
    python -m ray_app.train --dataset runs/data/ml-1m --use-gpu --bf16 --storage-path s3://bucket/runs
    ray job submit --working-dir . -- python -m ray_app.train --storage-path /shared/runs ...

Each worker gets a Ray Data shard of users (see `ray_app/data.py`), trains on it with
`models.training.run_epoch` (DDP through `prepare_model`) and evaluates its own users'
validation targets with `models.training.evaluate`; the per-target values are all-gathered, so
validation NDCG@10 is over all users and every worker takes the same early-stopping decision.
Rank 0 reports one checkpoint per epoch (model + config, item vocabulary, metrics, optimizer
state); a restarted worker group, or a second run with the same `--name`, resumes from the
latest one. The best checkpoint (by validation NDCG@10) is written to
`<storage>/<name>/best_checkpoint.json` for tuning and serving.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.fs
import torch
import torch.distributed as dist

from models import checkpoint
from models.batching import make_split, training_windows
from models.data import InteractionData
from models.metrics import summarize
from models.precision import bf16_problem
from models.run import PROTOCOLS, train_config
from models.training import (HEADLINE, TrainConfig, batch_builder, evaluate, new_model, run_epoch, training_counts,
                             weight_average)
from ray_app.data import SetupError, item_side, load_checked, read_shards, resolve_dataset, shard_data, user_ranges

METRIC = f"valid_{HEADLINE}"              # what checkpoints are ranked by and early stopping watches
MODEL_KINDS = ("decomposer", "lstm", "gru4rec", "sasrec")  # the trainable ones; most-popular needs no training
LSTM_MODELS = ("decomposer", "lstm")     # oneDNN's bf16 LSTM needs native bf16 on a CPU (models/precision.py)
FIXED_BY_DATA = ("n_items", "n_genres", "text_dim")
BEST_FILE = checkpoint.BEST_FILE
log = logging.getLogger(__name__)   # in a Train worker, its records reach the driver's console and the run logs


@dataclass
class RayTrainSettings:
    dataset: str = "synthetic"              # "synthetic", a MovieLens name, or a prepared folder
    data_dir: Path | None = None            # MovieLens source folder or zip
    prepared_dir: Path | None = None        # where a named dataset is prepared (default runs/data/NAME)
    model: str = "decomposer"
    model_args: dict = field(default_factory=dict)   # typed overrides of the model's config
    protocol: str = "loo"
    epochs: int = 200
    patience: int = 10
    seed: int = 0
    lr: float | None = None                 # None: the model's default (models.run.TRAIN_DEFAULTS)
    batch_size: int | None = None           # training windows per step, over all workers
    ema_decay: float | None = None          # weight average per step; None: the model's default, 0: off
    time_budget_s: float | None = None      # training seconds, summed over epochs
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    bf16: bool = False                      # bfloat16 autocast in training
    storage_path: str = "runs/ray"          # local folder or any pyarrow filesystem URI
    name: str | None = None                 # run folder under storage_path; same name = resume
    max_failures: int = 2                   # worker-group restarts from the latest checkpoint
    num_to_keep: int = 3                    # best checkpoints kept (the latest is kept too)
    check_resources: bool = True            # off for an autoscaling cluster that grows on demand
    fail_at_epoch: int | None = None        # testing: rank 0 dies once, before reporting this epoch
    verbose: bool = False                   # Ray's own logs and the workers' output on the console

    def train_config(self) -> TrainConfig:
        given = {k: v for k, v in (("lr", self.lr), ("batch_size", self.batch_size)) if v is not None}
        if self.ema_decay is not None:
            given["ema_decay"] = self.ema_decay or None                 # 0 turns the average off
        return train_config(self.model, epochs=self.epochs, patience=self.patience, seed=self.seed,
                            time_budget_s=self.time_budget_s, **given)

    def run_name(self) -> str:
        if self.name:
            return self.name
        return f"{self.model}-{Path(self.dataset).name}-{datetime.now():%Y%m%d-%H%M%S}"


# ---- settings and checks before anything runs ----------------------------------------------

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
            raise SetupError(f"--set {key}: not a setting of {cfg_cls.__name__} ({kind}); "
                             f"choose from {', '.join(allowed)}")
        sequence = typing.get_origin(hints[key]) in (tuple, list)
        value = [v.strip() for v in raw.split(",") if v.strip()] if sequence else raw   # dims=topic,time
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
        raise SetupError(f"--storage-path {storage_path}: cannot write the run folder {name!r} there "
                         f"({type(e).__name__}: {e})") from None


def check_resources(s: RayTrainSettings) -> None:
    """The whole request must fit the cluster as it is now; otherwise Train would wait forever."""
    import ray

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    asks = [("CPU", s.cpus_per_worker)] + ([("GPU", s.gpus_per_worker)] if s.use_gpu else [])
    for res, per_worker in asks:
        have, need = total.get(res, 0.0), s.num_workers * per_worker
        if need > have:
            raise SetupError(f"{s.num_workers} workers × {per_worker:g} {res} need {need:g} {res}, "
                             f"the cluster has {have:g}" + (" (no GPU at all)" if res == "GPU" and not have else ""))
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
    authentication, and Ray Data's progress bars being off (`ray_app.data` turns them off)."""

    HIDDEN = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not any(h in record.getMessage() for h in self.HIDDEN)


def quiet_console() -> None:
    """Ray's driver-side console handlers keep warnings only; its log files keep everything."""
    import ray.data  # noqa: F401  configures its own console and file handlers when imported

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not any(isinstance(f, _ConsoleFilter) for f in h.filters):
                h.addFilter(_ConsoleFilter())


# ---- the trainer ---------------------------------------------------------------------------

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
    if s.use_gpu and s.num_workers > 1 and s.gpus_per_worker < 1:
        raise SetupError("--gpus-per-worker below 1 with several workers: NCCL cannot share one GPU between ranks")
    if s.bf16 and not s.use_gpu and s.model in LSTM_MODELS and not os.environ.get("RAY_ADDRESS"):
        problem = bf16_problem("cpu")                                   # the workers run on this machine
        if problem:
            raise SetupError(f"--bf16: {problem}; train without --bf16, or on GPUs with --use-gpu")
    name = s.run_name()
    check_storage(s.storage_path, name)
    prepared = resolve_dataset(s.dataset, s.data_dir, s.prepared_dir)
    data = load_checked(prepared)
    try:
        split = make_split(data.user_offsets, PROTOCOLS[s.protocol])
    except ValueError as e:
        raise SetupError(f"--dataset {prepared}: {e}") from None
    connect(num_cpus, s.verbose)
    if s.check_resources:
        check_resources(s)
    cfg = s.train_config()
    model_args = dict(s.model_args)
    max_len = model_args.get("max_len", checkpoint.MODELS[s.model][0].max_len)
    ranges = user_ranges(data, split, max_len, s.num_workers)
    shards = read_shards(prepared, ranges)                              # Ray Data reads the Parquet here
    counts = training_counts(data, split)
    loop_config = {
        "model": s.model, "model_args": model_args, "train": cfg.to_dict(),
        "n_test": PROTOCOLS[s.protocol], "protocol": s.protocol, "dataset": str(prepared),
        "items": ray.put((item_side(data), counts)),                    # item tables, once per cluster
        "users": [ranges.users(r) for r in range(s.num_workers)],
        "windows": int(ranges.windows.sum()), "cpus_per_worker": s.cpus_per_worker, "bf16": s.bf16,
        "fail_at_epoch": s.fail_at_epoch, "fault_marker": _run_path(s.storage_path, name, ".fault-injected"),
    }
    summary = (f"{prepared.name}: {data.n_users} users, {data.n_items} items, {data.n_events} events; "
               f"{s.model}, {s.num_workers} worker(s) with {ranges.windows.tolist()} training windows; "
               f"run {name} in {s.storage_path}")
    return Plan(s, name, prepared, loop_config, {f"users_{r}": shard for r, shard in enumerate(shards)}, summary)


def build_trainer(p: Plan, callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    s = p.settings
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=p.loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=p.name, storage_path=_run_path(s.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=s.num_to_keep, checkpoint_score_attribute=METRIC,
                                                         checkpoint_score_order="max"),
            callbacks=callbacks or None),
        datasets=p.datasets,
        # Worker r reads only "users_r": the shards are cut at user boundaries, none is split again.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def train_loop_per_worker(config: dict) -> None:
    """One Train worker: its shard of users, the shared epoch and evaluation code, one report per epoch."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()                                       # [ray]
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()                               # [ray] cuda:k with --use-gpu, else cpu
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    items, counts = ray.get(config["items"])                            # [ray]
    shard = ray.train.get_dataset_shard(f"users_{rank}")                # [ray]
    data = shard_data(list(shard.iter_batches(batch_size=None, batch_format="numpy")), items,
                      tuple(config["users"][rank]))
    split = make_split(data.user_offsets, config["n_test"])
    cfg = TrainConfig(**config["train"])
    # batch_size is the global batch: with W workers each takes 1/W of it, so a step, and an epoch's
    # number of steps, are the same as one worker's and the results do not drift with W.
    cfg = dataclasses.replace(cfg, batch_size=max(1, -(-cfg.batch_size // ctx.get_world_size())))

    torch.manual_seed(cfg.seed)                                         # the same initial weights everywhere
    core = new_model(config["model"], data, split, **config["model_args"])
    core.set_item_data(data.item_emb, data.item_genres, counts)        # popularity of all users, not the shard's
    ema = weight_average(core, cfg)                                     # averaged weights (cfg.ema_decay), or None
    judged = ema.module if ema is not None else core                    # the weights validated and checkpointed
    state, opt_state = TrainState(), None
    restored = ray.train.get_checkpoint()                               # [ray] set after a failure or on resume
    if restored:
        with restored.as_directory() as d:
            state, opt_state = restore(Path(d), core, data, ema)
        if rank == 0:
            log.info("resuming after epoch %d (best %.4f at epoch %d)", state.epoch, state.best, state.best_epoch)
    model = ray.train.torch.prepare_model(                              # [ray] DDP when more than one worker
        core, parallel_strategy_kwargs={"find_unused_parameters": True,     # e.g. aux heads when λ = 0
                                        "forward_sync_buffers": False})     # buffers are the item tables: equal
    if ema is not None:
        ema.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)

    starts, ends, rows = training_windows(split, core.cfg.max_len)
    windows = (starts, ends, split.user_start[rows])
    builder = batch_builder(data)
    autocast = autocast_dtype(config["bf16"], device, has_lstm=config["model"] in LSTM_MODELS)
    precision = precision_name(config["bf16"], autocast, device)
    uneven = model.join if isinstance(model, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.finished(cfg):
            break
        rng = epoch_rng(cfg.seed, epoch, rank)                          # a resumed run replays the same order
        started_at, t0 = time.time(), time.perf_counter()
        with uneven():                                                  # shards differ by a few batches
            losses = run_epoch(model, optimizer, builder, windows, cfg, rng, device, autocast, ema=ema)
        train_s = time.perf_counter() - t0
        sync_average(ema)
        losses = mean_over_workers(losses, len(starts))
        valid, n_valid = validate(judged, data, split, cfg, device)
        state.update(epoch, losses, valid, train_s, config["windows"], started_at)
        metrics = {**{k: v for k, v in state.history[-1].items() if k != "started_at"}, "valid_targets": n_valid,
                   f"best_{METRIC}": state.best, "best_epoch": state.best_epoch, "world_size": ctx.get_world_size(),
                   "precision": precision}
        if config["fail_at_epoch"] == epoch and rank == 0:
            inject_fault(config["fault_marker"])
        report(metrics, rank, core, judged, optimizer, state, items, config)   # the driver prints its line


# ---- pieces of the worker loop -------------------------------------------------------------

@dataclass
class TrainState:
    epoch: int = 0                           # last finished epoch
    best: float = -1.0                       # best validation NDCG@10 so far
    best_epoch: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    def update(self, epoch: int, losses: dict, valid: dict, train_s: float, sequences: int, started_at: float) -> None:
        self.epoch, self.train_seconds = epoch, self.train_seconds + train_s
        self.history.append({"epoch": epoch, **{f"loss_{k}": v for k, v in losses.items()},
                             **{f"valid_{k}": v for k, v in valid.items()}, "train_seconds": train_s,
                             "sequences_per_s": sequences / max(train_s, 1e-9), "started_at": started_at})
        if valid[HEADLINE] > self.best:
            self.best, self.best_epoch = valid[HEADLINE], epoch

    def finished(self, cfg: TrainConfig) -> bool:
        """Early stopping on validation NDCG@10, or the time budget spent (same on every worker)."""
        if self.epoch and self.epoch - self.best_epoch >= cfg.patience:
            return True
        return cfg.time_budget_s is not None and self.train_seconds >= cfg.time_budget_s


def autocast_dtype(bf16: bool, device, has_lstm: bool = True) -> torch.dtype | None:
    """bfloat16 when asked for and the worker's device runs it; otherwise float32.

    The driver refuses --bf16 up front on a local CPU without bf16; a worker on another machine of a
    cluster may still lack it, and then trains in float32 rather than failing mid-epoch (its metrics
    say so, see `precision_name`, and the driver prints a warning). Only the LSTM needs native bf16
    on a CPU: GRU4Rec and SASRec autocast anywhere.
    """
    if not bf16:
        return None
    kind = torch.device(device).type
    problem = bf16_problem(kind) if (has_lstm or kind != "cpu") else None
    if problem:
        log.warning("--bf16 ignored on this worker, training in float32: %s", problem)
        return None
    return torch.bfloat16


def precision_name(bf16: bool, autocast: torch.dtype | None, device) -> str:
    """What the worker trains in, as its metrics report it: "bfloat16", "float32", or
    "float32 (bf16 unsupported: <why>)" when --bf16 was asked for and the device cannot run it."""
    if autocast is not None:
        return "bfloat16"
    if bf16:
        return f"float32 (bf16 unsupported: {bf16_problem(torch.device(device).type)})"
    return "float32"


def epoch_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """Batch order and intent sampling from (seed, epoch, rank); torch's dropout stream likewise."""
    seq = np.random.SeedSequence([seed, epoch, rank])
    torch.manual_seed(int(seq.generate_state(1)[0]))
    return np.random.default_rng(seq)


def gather(obj) -> list:
    """`obj` from every worker, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_average(ema) -> None:
    """Every rank takes the weight average of the rank that stepped most (None: no average).

    Shards differ by a few batches: under DDP's `join` a rank that runs out stops stepping (and
    updating its average) while the others go on, and DDP re-syncs the live weights at the end but
    not the averages. The rank with the most updates so far has seen every step of this epoch.
    """
    if ema is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    steps = gather(int(ema.n_averaged.item()))
    if len(set(steps)) == 1:                                            # even shards: already equal
        return
    src = int(np.argmax(steps))
    for t in itertools.chain(ema.module.parameters(), [ema.n_averaged]):   # buffers are not averaged
        dist.broadcast(t.data, src)


def mean_over_workers(losses: dict[str, float], n: int) -> dict[str, float]:
    parts = gather((losses, n))
    total = sum(m for _, m in parts)
    return {k: sum(l[k] * m for l, m in parts) / max(total, 1) for k in losses}


def validate(core, data: InteractionData, split, cfg: TrainConfig, device) -> tuple[dict[str, float], int]:
    """Each worker ranks its own users' validation targets; the per-target values of all are averaged."""
    ev = evaluate(core, data, split, "valid", batch_size=cfg.eval_batch_size, device=device)
    parts = gather((ev["masked"], ev["unmasked"][HEADLINE]))
    masked = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    out = summarize(masked)
    out[f"{HEADLINE}_unmasked"] = float(np.concatenate([p[1] for p in parts]).mean())
    return out, len(masked[HEADLINE])


def report(metrics: dict, rank: int, core, judged, optimizer, state: TrainState, items: InteractionData,
           config: dict) -> None:
    """Rank 0 writes the checkpoint; every rank reports (the call is a barrier).

    model.pt holds the validated weights (`judged`: the averaged ones when the run averages), which
    tuning and serving load; with an average, live.pt holds the weights training goes on from.
    """
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)                      # [ray]
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(Path(d) / "model.pt", judged, {
            "epoch": state.epoch, "metrics": metrics, "dataset": config["dataset"], "protocol": config["protocol"],
            "train_config": config["train"],
            "item_source_ids": torch.tensor(items.item_source_ids),     # item index -> source id
        })
        torch.save(optimizer.state_dict(), Path(d) / "optimizer.pt")
        if judged is not core:
            torch.save(core.state_dict(), Path(d) / "live.pt")
        (Path(d) / "train_state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),   # [ray]
                         checkpoint_dir_name=f"epoch_{state.epoch:04d}")


def restore(folder: Path, core, data: InteractionData, ema=None) -> tuple[TrainState, dict]:
    """Weights into `core` (checked against its config and item vocabulary) -> (state, optimizer state).

    With a weight average `ema`, model.pt holds the average and live.pt the training weights.
    """
    saved, meta = checkpoint.load(folder / "model.pt")
    if saved.cfg.to_dict() != core.cfg.to_dict():
        raise RuntimeError(f"{folder}: the run was started with other model settings; use another --name")
    if not np.array_equal(meta["item_source_ids"].numpy(), data.item_source_ids):
        raise RuntimeError(f"{folder}: the run was started on another item catalogue; use another --name")
    if ema is None:
        if (folder / "live.pt").is_file():
            raise RuntimeError(f"{folder}: the run was started with averaged weights; use another --name")
        core.load_state_dict(saved.state_dict())
    else:
        if not (folder / "live.pt").is_file():
            raise RuntimeError(f"{folder}: the run was started without averaged weights; use another --name")
        ema.module.load_state_dict(saved.state_dict())
        core.load_state_dict(torch.load(folder / "live.pt", map_location="cpu", weights_only=True))
        ema.n_averaged.fill_(1)                                         # the next step blends rather than copies
    state = TrainState(**json.loads((folder / "train_state.json").read_text()))
    # Saved from the training device; load_state_dict moves it onto the parameters' device.
    return state, torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)


def inject_fault(marker: str) -> None:
    """Testing: the first time only, rank 0 dies as a crashed worker would (no exception, no cleanup)."""
    fs, path = storage_location(marker)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return
    with fs.open_output_stream(path) as f:
        f.write(b"rank 0 exited here once\n")
    log.warning("fault injection: rank 0 exits now")
    os._exit(1)


def _run_path(storage_path: str, *parts: str) -> str:
    """A path under the storage root as the user wrote it (URI kept, local folder made absolute)."""
    root = storage_path.rstrip("/") if "://" in storage_path else storage_location(storage_path)[1]
    return "/".join([root, *parts])


# ---- the driver ----------------------------------------------------------------------------

def epoch_line(m: dict, epochs: int) -> str:
    """One epoch's reported metrics -> the line the driver prints."""
    return (f"epoch {m['epoch']:3d}/{epochs}  loss {m.get('loss_next_item', 0.0):.4f}  "
            f"valid ndcg@10 {m[METRIC]:.4f} over {m['valid_targets']} targets  "
            f"best {m[f'best_{METRIC}']:.4f} @ {m['best_epoch']}  {m['sequences_per_s']:.0f} seq/s  "
            f"{m['train_seconds']:.1f}s")


def _epoch_lines_callback(queue):
    """A Train callback, run on the controller, that sends rank 0's metrics of each report to `queue`.

    Printing is a side channel: a put that fails (the queue gone) drops the line, never the run.
    """
    from ray.train import UserCallback

    def send(item: dict) -> None:
        try:
            queue.put(item, timeout=5)
        except Exception:  # noqa: BLE001  a lost line must not fail the training run
            pass

    class EpochLines(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and METRIC in metrics[0]:
                send({k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))})

        def after_exception(self, run_context, worker_exceptions):
            for rank, e in sorted(worker_exceptions.items()):
                last_line = (str(e).strip().splitlines() or [""])[-1][:200]
                send({"failed_rank": rank, "error": f"{type(e).__name__}: {last_line}"})

    return EpochLines()


_END = {"end": True}        # the driver's last item: every report was put before fit() returned


@contextlib.contextmanager
def printed_epochs(epochs: int, out=None):
    """Yields Train callbacks; meanwhile a driver thread prints one line per reported epoch.

    The lines come from the controller through a Ray queue (an actor on the driver's node, where
    the controller runs too), so they show on the console even though the workers' own output stays
    in Ray's log files (see `connect`), and in a `ray job` log too. A worker that trained in float32
    although --bf16 was asked for says so in its metrics, and the driver prints that once.
    """
    import threading

    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = out or sys.stdout
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    def pump() -> None:
        last, warned = None, False
        while True:
            try:
                m = queue.get()
            except Exception:  # noqa: BLE001  the queue (or Ray) is gone: nothing more to print
                return
            if m == _END:
                return
            if "failed_rank" in m:
                say(f"worker {m['failed_rank']} failed ({m['error']}); Ray Train restarts the workers from the "
                    "latest checkpoint while --max-failures allows")
                continue
            if m.get("precision", "").startswith("float32 (") and not warned:
                say(f"warning: --bf16 ignored, training in {m['precision']}")
                warned = True
            if m["epoch"] != (last or 0) + 1:                        # a resumed run, or a restarted worker group
                say(f"resumed from the checkpoint of epoch {m['epoch'] - 1}")
            last = m["epoch"]
            say(epoch_line(m, epochs))

    thread = threading.Thread(target=pump, name="epoch-lines", daemon=True)
    thread.start()
    try:
        yield [_epoch_lines_callback(queue)]
    finally:
        with contextlib.suppress(Exception):   # never hide fit()'s own error behind the queue's
            queue.put(_END, timeout=5)
        thread.join(timeout=10)
        with contextlib.suppress(Exception):
            queue.shutdown()


def best_checkpoint(result, p: Plan) -> checkpoint.BestCheckpoint | None:
    """The kept checkpoint with the highest validation NDCG@10 (earliest on ties), as later stages read it."""
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if METRIC in m]
    if not kept:
        return None
    ckpt, metrics = max(kept, key=lambda cm: (cm[1][METRIC], -cm[1]["epoch"]))
    path = _run_path(p.settings.storage_path, p.name, Path(ckpt.path).name)
    with result.checkpoint.as_directory() as d:                        # the latest holds the whole history
        history = json.loads((Path(d) / "train_state.json").read_text())["history"]
    return checkpoint.BestCheckpoint(
        run=p.name, path=path, model=f"{path}/model.pt", epoch=metrics["epoch"], valid_ndcg10=metrics[METRIC],
        metrics=metrics, model_type=p.settings.model, dataset=str(p.prepared), protocol=p.settings.protocol,
        history=history)


def write_best(best: checkpoint.BestCheckpoint, p: Plan) -> str:
    """The record serving reads, replaced whole: written beside the old one, then moved over it
    (a rename on a local or shared file system; on object stores a PUT is whole anyway), so a
    reader or a crash never meets half a file."""
    fs, root = storage_location(p.settings.storage_path)
    target = f"{root.rstrip('/')}/{p.name}/{BEST_FILE}"
    tmp = f"{target}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(best.to_json().encode())
    fs.move(tmp, target)
    return _run_path(p.settings.storage_path, p.name, BEST_FILE)


def run(s: RayTrainSettings, num_cpus: int | None = None) -> checkpoint.BestCheckpoint:
    """Check, train, and record the best checkpoint -> its record (see `best_checkpoint`)."""
    p = plan(s, num_cpus)
    print(p.summary, flush=True)
    with printed_epochs(s.train_config().epochs) as callbacks:
        result = build_trainer(p, callbacks).fit()
    best = best_checkpoint(result, p)
    if best is None:
        raise RuntimeError(f"run {p.name} reported no checkpoint")
    where = write_best(best, p)
    print(f"best checkpoint: {best.path} (epoch {best.epoch}, {METRIC} {best.valid_ndcg10:.4f}); "
          f"recorded in {where}; resume with --name {p.name}", flush=True)
    return best


def parse_args(argv=None) -> tuple[RayTrainSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic | ml-latest-small | ml-1m | ... | a prepared folder")
    p.add_argument("--data-dir", type=Path, help="MovieLens folder or .zip for a named dataset")
    p.add_argument("--prepared-dir", type=Path, help="where a named dataset is prepared (default runs/data/NAME)")
    p.add_argument("--model", choices=MODEL_KINDS, default="decomposer")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, repeatable (e.g. --set lstm_units=64 --set dims=topic,time)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="loo")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=10, help="epochs without a better validation NDCG@10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="learning rate (default: the model's)")
    p.add_argument("--batch-size", type=int, help="training windows per step, over all workers (default 64)")
    p.add_argument("--ema-decay", type=float, metavar="D",
                   help="validate and keep a moving average of the weights, θ̄ ← D·θ̄ + (1 − D)·θ after every "
                        "step (default: the model's, 0.98 for the decomposer); 0 turns it off")
    p.add_argument("--time-budget", type=float, help="seconds of training, summed over epochs")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (see --gpus-per-worker)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast in training: GPUs, and CPUs with native bf16 (AVX-512 BF16 or AMX); "
                        "refused on a local CPU without it, float32 with a warning on such a cluster worker")
    p.add_argument("--storage-path", default="runs/ray", help="local folder or pyarrow URI (s3://, gs://, ...)")
    p.add_argument("--name", help="run name; the same name resumes from its latest checkpoint")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the latest checkpoint")
    p.add_argument("--keep", type=int, default=3, help="best checkpoints kept")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started when RAY_ADDRESS is not set")
    p.add_argument("--skip-resource-check", action="store_true",
                   help="autoscaling cluster: do not require the resources to be there already")
    p.add_argument("--fail-at-epoch", type=int, help="testing: rank 0 exits once before reporting this epoch")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own logs and the workers' output (otherwise in /tmp/ray/session_latest/logs)")
    a = p.parse_args(argv)
    for flag, value in (("--num-workers", a.num_workers), ("--epochs", a.epochs), ("--patience", a.patience),
                        ("--keep", a.keep), ("--cpus-per-worker", a.cpus_per_worker),
                        ("--gpus-per-worker", a.gpus_per_worker)):
        if value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    if a.ema_decay is not None and not 0.0 <= a.ema_decay < 1.0:
        p.error(f"--ema-decay must be in [0, 1), got {a.ema_decay}")
    try:
        model_args = parse_model_args(a.model, a.set)
    except SetupError as e:
        p.error(str(e))
    s = RayTrainSettings(
        dataset=a.dataset, data_dir=a.data_dir, prepared_dir=a.prepared_dir, model=a.model, model_args=model_args,
        protocol=a.protocol, epochs=a.epochs, patience=a.patience, seed=a.seed, lr=a.lr, batch_size=a.batch_size,
        ema_decay=a.ema_decay,
        time_budget_s=a.time_budget, num_workers=a.num_workers, cpus_per_worker=a.cpus_per_worker,
        use_gpu=a.use_gpu, gpus_per_worker=a.gpus_per_worker, bf16=a.bf16, storage_path=a.storage_path,
        name=a.name, max_failures=a.max_failures, num_to_keep=a.keep,
        check_resources=not a.skip_resource_check, fail_at_epoch=a.fail_at_epoch, verbose=a.verbose)
    return s, a


def main(argv=None) -> int:
    s, a = parse_args(argv)
    try:
        run(s, num_cpus=a.num_cpus)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
