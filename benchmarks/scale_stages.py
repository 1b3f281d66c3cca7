"""The stages the scale benchmark measures, each run in a process of its own so that its peak RSS is
its own: `python benchmarks/scale_stages.py STAGE --raw DIR --prepared DIR [...]` prints one JSON
record (seconds of each step, peak RSS bytes) as its last line.

    prepare   read the MovieLens files (or, --reader events, an event log) and prepare them (text
              encoding timed apart; it is cached)
    load      load the prepared folder, make the leave-one-out split and the training windows
    train     steps of the decomposer's training loop with the full and the sampled softmax
    serve     load a checkpoint and rank the catalogue in-process as the Combiner does (batch of one)
    store     bulk-load every user's events into SQLite and into Redis
    ray       Ray Train (`ray_app.train`) with --workers workers for one epoch of --train-steps steps
              per worker, and the validation of every user: the driver's and each worker's peak RSS
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_rss() -> int:
    """This process's peak resident set so far, bytes: VmHWM, the peak of its own address space.
    (getrusage's ru_maxrss is kept across exec, so a stage started by a large parent would report
    the parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


class TimedEncoder:
    """The text encoder with the seconds spent in it counted (what `prepare` calls)."""

    def __init__(self, inner):
        self.inner, self.seconds, self.texts = inner, 0.0, 0
        self.model_name, self.dim = inner.model_name, inner.dim

    def encode(self, texts, progress=False):
        t0 = time.perf_counter()
        try:
            return self.inner.encode(texts, progress=progress)
        finally:
            self.seconds += time.perf_counter() - t0
            self.texts += len(texts)


def stage_prepare(a) -> dict:
    from models.data import prepare, read_event_log, read_movielens
    from models.data.encoder import TextEncoder

    t0 = time.perf_counter()
    raw = read_event_log(a.raw, name="scale") if a.reader == "events" else read_movielens(a.raw, name="scale")
    read_s = time.perf_counter() - t0
    enc = TimedEncoder(TextEncoder(cache_path=a.encoder_cache))
    t1 = time.perf_counter()
    prepare(raw, a.prepared, encoder=enc, overwrite=True, progress=False)
    total = time.perf_counter() - t1
    return {"read_s": read_s, "prepare_s": total - enc.seconds, "encode_s": enc.seconds, "texts": enc.texts}


def load(a):
    from models.data import load_prepared
    from models.data.batching import make_split, training_windows

    t0 = time.perf_counter()
    data = load_prepared(a.prepared)
    t1 = time.perf_counter()
    split = make_split(data.user_offsets, 1)
    windows = training_windows(split, a.max_len)
    return data, split, windows, {"load_s": t1 - t0, "split_s": time.perf_counter() - t1, "windows": len(windows[0])}


def stage_load(a) -> dict:
    return load(a)[3]


def train_steps(data, split, windows, loss: str, a) -> dict:
    """`a.train_steps` batches of one epoch's loop (after one warm-up batch) -> sequences/s."""
    import torch

    from models.data.batching import batch_builder
    from models.training.defaults import train_config
    from models.training.loop import new_model, run_epoch

    torch.manual_seed(0)
    model = new_model("decomposer", data, split, loss=loss)
    cfg = train_config("decomposer", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    builder, rng = batch_builder(data), np.random.default_rng(0)
    pick = rng.choice(len(windows[0]), size=min(len(windows[0]), cfg.batch_size * (a.train_steps + 1)), replace=False)
    warm, timed = pick[: cfg.batch_size], pick[cfg.batch_size :]
    run_epoch(model, opt, builder, tuple(w[warm] for w in windows), cfg, rng)
    t0 = time.perf_counter()
    run_epoch(model, opt, builder, tuple(w[timed] for w in windows), cfg, rng)
    seconds = time.perf_counter() - t0
    per_s = len(timed) / seconds
    return {"sequences": len(timed), "seconds": seconds, "sequences_per_s": per_s, "epoch_s": len(windows[0]) / per_s}


def stage_train(a) -> dict:
    data, split, windows, rec = load(a)
    rec["rss_after_load"] = peak_rss()
    rec[a.loss] = train_steps(data, split, windows, a.loss, a)
    return rec


def stage_serve(a) -> dict:
    import torch

    from models.nn import checkpoint
    from models.training.loop import new_model
    from ray_app.serve.deployments import Combiner, Decomposer
    from ray_app.serve.records import RankJob

    data, split, _, rec = load(a)
    torch.set_num_threads(1)  # what a replica with a fractional CPU gets
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.save(Path(tmp) / "model.pt", new_model("decomposer", data, split, loss="sampled"), {})
        del data, split
        t0 = time.perf_counter()
        comb = Combiner.func_or_class(str(a.prepared), max_batch_size=1)  # the plain class under @serve.deployment
        comb.reconfigure({"checkpoint": str(ckpt)})
        rec["model_load_s"] = time.perf_counter() - t0
        dec = Decomposer.func_or_class(f"sqlite:///{tmp}/state.db", str(a.prepared), max_batch_size=1)
        dec.reconfigure({"checkpoint": str(ckpt)})
        ids = comb.catalogue_ids[1:]
        rng = np.random.default_rng(0)
        events = [(str(i), 4.0, 1.6e9 + 60.0 * j) for j, i in enumerate(rng.choice(ids, 50))]
        state = dec.history_state(events)
        lat = []
        for _ in range(a.serve_requests):
            t = time.perf_counter()
            comb._rank(comb.current, [RankJob(state, None, 10, True, False, 1.6e9 + 4000.0)])  # Combiner.rank's work
            lat.append(time.perf_counter() - t)
        dec.store.close()
    lat = np.array(lat[5:])  # the first calls warm the allocator
    rec.update(items=len(ids), p50_ms=float(np.median(lat) * 1e3), p99_ms=float(np.quantile(lat, 0.99) * 1e3))
    return rec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_store(a) -> dict:
    from store import start_redis  # benchmarks/store.py

    from models.data import load_prepared
    from ray_app.serve.item_catalogue import training_user_events
    from ray_app.store.opener import open_store

    data = load_prepared(a.prepared)
    rec = {"events": data.n_events, "users": data.n_users}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        redis = start_redis(Path(tmp), port, "everysec")
        try:
            for name, url in (("sqlite", f"sqlite:///{tmp}/state.db"), ("redis", f"redis://127.0.0.1:{port}/0")):
                store = open_store(url)
                t0 = time.perf_counter()
                for chunk in training_user_events(data):
                    store.bulk_load(chunk)
                rec[f"{name}_s"] = time.perf_counter() - t0
                if name == "redis":
                    import redis as redis_client

                    info = redis_client.Redis(host="127.0.0.1", port=port).info("memory")
                    rec["redis_used_memory"] = int(info["used_memory"])
                store.close()
            rec["sqlite_bytes"] = (Path(tmp) / "state.db").stat().st_size
        finally:
            redis.terminate()
            redis.wait(10)
    return rec


def stage_ray(a) -> dict:
    import os

    import ray.train.torch  # noqa: F401  what the driver imports for TorchTrainer, counted in the fixed part

    from ray_app.train.driver import run
    from ray_app.train.settings import RayTrainSettings

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    before = peak_rss()  # the interpreter and the imports: what any driver holds, whatever the data
    with tempfile.TemporaryDirectory() as tmp:
        s = RayTrainSettings(
            dataset=str(a.prepared),
            num_workers=a.workers,
            epochs=1,
            max_steps=a.train_steps,
            storage_path=str(a.storage or tmp),
            name="scale",
            model_args={"max_len": a.max_len},
        )
        t0 = time.perf_counter()
        best = run(s, num_cpus=2)
        total = time.perf_counter() - t0
    m = best.metrics
    return {
        "rss_before_run": before,
        "checkpoint": best.model if a.storage else None,
        "workers": a.workers,
        "run_s": total,
        "train_s": m["train_seconds"],
        "sequences_per_s": m["sequences_per_s"],
        "worker_peak_rss_max": m["worker_peak_rss_max"],
        "worker_peak_rss_min": m["worker_peak_rss_min"],
        "worker_events_max": m["worker_events_max"],
        "valid_targets": m["valid_targets"],
    }


STAGES = {
    "prepare": stage_prepare,
    "load": stage_load,
    "train": stage_train,
    "serve": stage_serve,
    "store": stage_store,
    "ray": stage_ray,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--raw", type=Path, help="the MovieLens-format folder (prepare)")
    p.add_argument("--prepared", type=Path, required=True)
    p.add_argument("--encoder-cache", type=Path, help="the text encoder's cache file (prepare)")
    p.add_argument("--loss", choices=("full", "sampled"), default="sampled", help="softmax of the train stage")
    p.add_argument("--train-steps", type=int, default=10, help="timed batches of the train stage")
    p.add_argument("--serve-requests", type=int, default=105, help="rankings timed by the serve stage")
    p.add_argument("--max-len", type=int, default=200, help="training window length")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers of the ray stage")
    p.add_argument("--reader", choices=("movielens", "events"), default="movielens", help="the prepare stage's input")
    p.add_argument("--storage", type=Path, help="the ray stage's run folder, kept (default: a temporary one)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rec = STAGES[a.stage](a)
    rec.update(stage=a.stage, seconds=time.perf_counter() - t0, peak_rss=peak_rss())
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
