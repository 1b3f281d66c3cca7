"""Train on a Ray cluster: a `TorchTrainer` over the epoch code shared with the local run.

    python -m ray_app.train                                         # synthetic data, local Ray
    python -m ray_app.train --dataset ml-latest-small --num-workers 2 --epochs 30
    python -m ray_app.train --dataset runs/data/ml-1m --use-gpu --bf16 --storage-path s3://bucket/runs
    ray job submit --working-dir . -- python -m ray_app.train --storage-path /shared/runs ...

Each worker gets a Ray Data shard of users (see `ray_app/train/data.py`), trains on it with
`models.training.loop.run_epoch` (DDP through `prepare_model`) and evaluates its own users'
validation targets with `models.evaluation.evaluate.evaluate`; the per-target values are all-gathered, so
validation NDCG@10 is over all users and every worker takes the same early-stopping decision.
Rank 0 reports one checkpoint per epoch (model + config, item vocabulary, metrics, optimizer
state); a restarted worker group, or a second run with the same `--name`, resumes from the
latest one. The best checkpoint (by validation NDCG@10) is written to
`<storage>/<name>/best_checkpoint.json` for tuning and serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from models.nn import checkpoint
from ray_app.train.data import SetupError
from ray_app.train.preflight import Plan, _run_path, plan, storage_location
from ray_app.train.settings import METRIC, RayTrainSettings, parse_args
from ray_app.train.worker import train_loop_per_worker


def build_trainer(p: Plan, callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    s = p.settings
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=p.loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=p.name,
            storage_path=_run_path(s.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=s.num_to_keep, checkpoint_score_attribute=METRIC, checkpoint_score_order="max"
            ),
            callbacks=callbacks or None,
        ),
        datasets=p.datasets,
        # Worker r reads only "users_r": the shards are cut at user boundaries, none is split again.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def epoch_line(m: dict, epochs: int) -> str:
    """One epoch's reported metrics -> the line the driver prints."""
    return (
        f"epoch {m['epoch']:3d}/{epochs}  loss {m.get('loss_next_item', 0.0):.4f}  "
        f"valid ndcg@10 {m[METRIC]:.4f} over {m['valid_targets']} targets  "
        f"best {m[f'best_{METRIC}']:.4f} @ {m['best_epoch']}  {m['sequences_per_s']:.0f} seq/s  "
        f"{m['train_seconds']:.1f}s"
    )


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


_END = {"end": True}  # the driver's last item: every report was put before fit() returned


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
        last, warned, failed = None, False, False
        while True:
            try:
                m = queue.get()
            except Exception:  # noqa: BLE001  the queue (or Ray) is gone: nothing more to print
                return
            if m == _END:
                return
            if "failed_rank" in m:
                say(
                    f"worker {m['failed_rank']} failed ({m['error']}); Ray Train restarts the workers from the "
                    "latest checkpoint while --max-failures allows"
                )
                failed = True
                continue
            if m.get("precision", "").startswith("float32 (") and not warned:
                say(f"warning: --bf16 ignored, training in {m['precision']}")
                warned = True
            if m["epoch"] != (last or 0) + 1 or failed:  # a resumed run, or a restarted worker group
                say(f"resumed from the checkpoint of epoch {m['epoch'] - 1}")
                failed = False
            last = m["epoch"]
            say(epoch_line(m, epochs))

    thread = threading.Thread(target=pump, name="epoch-lines", daemon=True)
    thread.start()
    try:
        yield [_epoch_lines_callback(queue)]
    finally:
        with contextlib.suppress(Exception):  # never hide fit()'s own error behind the queue's
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
    with result.checkpoint.as_directory() as d:  # the latest holds the whole history
        history = json.loads((Path(d) / "train_state.json").read_text())["history"]
    return checkpoint.BestCheckpoint(
        run=p.name,
        path=path,
        model=f"{path}/model.pt",
        epoch=metrics["epoch"],
        valid_ndcg10=metrics[METRIC],
        metrics=metrics,
        model_type=p.settings.model,
        dataset=str(p.prepared),
        protocol=p.settings.protocol,
        history=history,
    )


def write_best(best: checkpoint.BestCheckpoint, p: Plan) -> str:
    """The record serving reads, replaced whole: written beside the old one, then moved over it
    (a rename on a local or shared file system; on object stores a PUT is whole anyway), so a
    reader or a crash never meets half a file."""
    fs, root = storage_location(p.settings.storage_path)
    target = f"{root.rstrip('/')}/{p.name}/{checkpoint.BEST_FILE}"
    tmp = f"{target}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(best.to_json().encode())
    fs.move(tmp, target)
    return _run_path(p.settings.storage_path, p.name, checkpoint.BEST_FILE)


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
    print(
        f"best checkpoint: {best.path} (epoch {best.epoch}, {METRIC} {best.valid_ndcg10:.4f}); "
        f"recorded in {where}; resume with --name {p.name}",
        flush=True,
    )
    return best


def exit_status(run_fn, settings, num_cpus: int | None) -> int:
    """A command line's run: `run_fn(settings, num_cpus=num_cpus)` -> the exit status (0, or 2 after
    printing a SetupError as one line). `python -m ray_app.train` and `python -m tuning.search` share it."""
    try:
        run_fn(settings, num_cpus=num_cpus)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """`python -m ray_app.train` -> its exit status."""
    s, a = parse_args(argv, __doc__)
    return exit_status(run, s, a.num_cpus)


if __name__ == "__main__":
    sys.exit(main())
