"""The loop each Ray Train worker runs: its shard, DDP, the weight average, validation over all
workers, one checkpoint per epoch from rank 0, resume from the latest one, and fault injection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs
import torch
import torch.distributed as dist

from models.data import InteractionData, load_prepared
from models.data.batching import batch_builder, training_windows
from models.training.defaults import protocol_split
from models.evaluation.evaluate import HEADLINE, evaluate
from models.evaluation.metrics import summarize
from models.nn import checkpoint
from models.training.loop import TrainConfig, new_model, run_epoch, weight_average
from models.training.precision import bf16_problem
from ray_app.train.data import shard_data
from ray_app.train.preflight import storage_location
from ray_app.train.settings import LSTM_MODELS, METRIC

log = logging.getLogger(__name__)  # in a Train worker, its records reach the driver's console and the run logs


def train_loop_per_worker(config: dict) -> None:
    """One Train worker: its shard of users, the shared epoch and evaluation code, one report per epoch."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()  # [ray]
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()  # [ray] cuda:k with --use-gpu, else cpu
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    items, counts = load_prepared(config["dataset"], events=False), ray.get(config["counts"])  # [ray]
    shard = ray.train.get_dataset_shard(f"users_{rank}")  # [ray]
    data = shard_data(
        list(shard.iter_batches(batch_size=None, batch_format="numpy")), items, tuple(config["users"][rank])
    )
    split = protocol_split(data.user_offsets, config["protocol"])
    cfg = TrainConfig(**config["train"])
    global_batch = cfg.batch_size
    # batch_size is the global batch: with W workers each takes 1/W of it, so a step, and an epoch's
    # number of steps, are the same as one worker's and the results do not drift with W.
    cfg = dataclasses.replace(cfg, batch_size=max(1, -(-cfg.batch_size // ctx.get_world_size())))

    torch.manual_seed(cfg.seed)  # the same initial weights everywhere
    core = new_model(config["model"], data, split, **config["model_args"])
    # popularity and first-seen times of all users' events, not the shard's
    core.set_item_data(data.item_emb, data.item_genres, counts, ray.get(config["first_seen"]))  # [ray]
    ema = weight_average(core, cfg)  # averaged weights (cfg.ema_decay), or None
    judged = ema.module if ema is not None else core  # the weights validated and checkpointed
    state, opt_state = TrainState(), None
    restored = ray.train.get_checkpoint()  # [ray] set after a failure or on resume
    if restored:
        with restored.as_directory() as d:
            state, opt_state = restore(Path(d), core, data, ema)
        if rank == 0:
            log.info("resuming after epoch %d (best %.4f at epoch %d)", state.epoch, state.best, state.best_epoch)
    model = ray.train.torch.prepare_model(  # [ray] DDP when more than one worker
        core,
        parallel_strategy_kwargs={
            "find_unused_parameters": True,  # e.g. aux heads when λ = 0
            "forward_sync_buffers": False,
        },
    )  # buffers are the item tables: equal
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
        rng = epoch_rng(cfg.seed, epoch, rank)  # a resumed run replays the same order
        started_at, t0 = time.time(), time.perf_counter()
        with uneven():  # shards differ by a few batches
            losses = run_epoch(model, optimizer, builder, windows, cfg, rng, device, autocast, ema=ema)
        train_s = time.perf_counter() - t0
        sync_average(ema)
        losses = mean_over_workers(losses, len(starts))
        valid, n_valid = validate(judged, data, split, cfg, device)
        trained = config["windows"] if cfg.max_steps is None else min(config["windows"], cfg.max_steps * global_batch)
        state.update(epoch, losses, valid, train_s, trained, started_at)
        metrics = {
            **{k: v for k, v in state.history[-1].items() if k != "started_at"},
            "valid_targets": n_valid,
            f"best_{METRIC}": state.best,
            "best_epoch": state.best_epoch,
            "world_size": ctx.get_world_size(),
            "precision": precision,
            **memory_metrics(len(data.items)),
        }
        if config["fail_at_epoch"] == epoch and rank == 0:
            inject_fault(config["fault_marker"])
        report(metrics, rank, core, judged, optimizer, state, items, config)  # the driver prints its line


@dataclass
class TrainState:
    epoch: int = 0  # last finished epoch
    best: float = -1.0  # best validation NDCG@10 so far
    best_epoch: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    def update(self, epoch: int, losses: dict, valid: dict, train_s: float, sequences: int, started_at: float) -> None:
        self.epoch, self.train_seconds = epoch, self.train_seconds + train_s
        self.history.append(
            {
                "epoch": epoch,
                **{f"loss_{k}": v for k, v in losses.items()},
                **{f"valid_{k}": v for k, v in valid.items()},
                "train_seconds": train_s,
                "sequences_per_s": sequences / max(train_s, 1e-9),
                "started_at": started_at,
            }
        )
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


def peak_rss() -> int:
    """This process's peak resident memory, bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_metrics(events: int) -> dict:
    """Every worker's peak RSS and the events of its shard, gathered: the largest and the smallest."""
    memory = gather((peak_rss(), events))
    return {
        "worker_peak_rss_max": max(m for m, _ in memory),
        "worker_peak_rss_min": min(m for m, _ in memory),
        "worker_events_max": max(n for _, n in memory),
    }


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
    if len(set(steps)) == 1:  # even shards: already equal
        return
    src = int(np.argmax(steps))
    for t in itertools.chain(ema.module.parameters(), [ema.n_averaged]):  # buffers are not averaged
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


def report(
    metrics: dict, rank: int, core, judged, optimizer, state: TrainState, items: InteractionData, config: dict
) -> None:
    """Rank 0 writes the checkpoint; every rank reports (the call is a barrier).

    model.pt holds the validated weights (`judged`: the averaged ones when the run averages), which
    tuning and serving load; with an average, live.pt holds the weights training goes on from.
    """
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)  # [ray]
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(
            Path(d) / "model.pt",
            judged,
            {
                "epoch": state.epoch,
                "metrics": metrics,
                "dataset": config["dataset"],
                "protocol": config["protocol"],
                "train_config": config["train"],
                "item_source_ids": items.item_source_ids.tolist(),  # item index -> source id (str)
            },
        )
        torch.save(optimizer.state_dict(), Path(d) / "optimizer.pt")
        if judged is not core:
            torch.save(core.state_dict(), Path(d) / "live.pt")
        (Path(d) / "train_state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),  # [ray]
            checkpoint_dir_name=f"epoch_{state.epoch:04d}",
        )


def restore(folder: Path, core, data: InteractionData, ema=None) -> tuple[TrainState, dict]:
    """Weights into `core` (checked against its config and item vocabulary) -> (state, optimizer state).

    With a weight average `ema`, model.pt holds the average and live.pt the training weights.
    """
    saved, meta = checkpoint.load(folder / "model.pt")
    if saved.cfg.to_dict() != core.cfg.to_dict():
        raise RuntimeError(f"{folder}: the run was started with other model settings; use another --name")
    if not np.array_equal(checkpoint.item_vocabulary(meta), data.item_source_ids):
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
        ema.n_averaged.fill_(1)  # the next step blends rather than copies
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
