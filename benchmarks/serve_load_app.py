"""The app under load in `serve_load.py`: the operation mix and the spec the load clients draw
from, the deployments' settings (autoscaled, or one replica each), deploying the app, and the
in-process baseline (the deployments' model code called without Serve or HTTP).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from serve_common import percentiles, wait_healthy  # sibling script

OPS = ("recommend", "recommend_intent", "post_event")
WEIGHTS = {"recommend": 0.4, "recommend_intent": 0.3, "post_event": 0.3}
APP = "bench"


def make_spec(data_dir: Path, n_users: int, seed: int) -> dict:
    """What the load clients draw from: up to `n_users` known users, the catalogue's ids, up to 20
    intent phrases, and the mix."""
    from models.data import load_prepared

    data = load_prepared(data_dir)
    rng = np.random.default_rng(seed)
    users = rng.choice(data.user_source_ids[1:], size=min(n_users, data.n_users), replace=False)
    intents = list(rng.choice(data.intent_phrases, size=min(20, len(data.intent_phrases)), replace=False))
    return {
        "users": [str(u) for u in users],
        "item_ids": [str(i) for i in data.item_source_ids[1:]],
        "intents": [str(t) for t in intents],
        "weights": WEIGHTS,
    }


def autoscaled(args):
    """Model stages that scale 1 -> 3 under load and back after `downscale_delay_s`; 2 cores in all."""
    from ray_app.serve.app import DeploymentSettings

    scale = dict(
        num_cpus=0.2,
        min_replicas=1,
        max_replicas=3,
        target_ongoing_requests=args.target_ongoing,
        upscale_delay_s=1.0,
        downscale_delay_s=args.downscale_delay,
        access_log=False,
    )
    return {
        "encoder": DeploymentSettings(**{**scale, "max_replicas": 2}),
        "decomposer": DeploymentSettings(**scale),
        "combiner": DeploymentSettings(**scale),
        "ingress": DeploymentSettings(**{**scale, "max_replicas": 2, "max_ongoing_requests": 100, "access_log": True}),
    }


def fixed():
    """One replica per deployment (autoscaling off), as the app's defaults."""
    from ray_app.serve.app import DeploymentSettings

    one = dict(num_cpus=0.2, min_replicas=1, max_replicas=1, access_log=False)  # as the app's defaults
    return {
        "encoder": DeploymentSettings(**one),
        "decomposer": DeploymentSettings(**one),
        "combiner": DeploymentSettings(**one),
        "ingress": DeploymentSettings(**{**one, "access_log": True}, max_ongoing_requests=100),
    }


def deploy(args, store_url: str, batching: bool, settings: dict) -> dict:
    """The app deployed (replacing one deployed before) and healthy -> its settings as JSON."""
    from ray import serve

    from ray_app.serve.app import AppArgs, build_app

    app_args = AppArgs(
        checkpoint=str(args.checkpoint), data_dir=str(args.data), store_url=store_url, batching=batching, **settings
    )
    serve.run(build_app(app_args), name=APP, route_prefix="/")
    wait_healthy(args.url)
    return json.loads(app_args.model_dump_json())


def in_process(args, spec: dict, store_url: str) -> dict:
    """The deployments' model code without Serve or HTTP: same store, same checkpoint, one thread."""
    import torch

    from ray_app.serve.deployments import Combiner, Decomposer, Encoder
    from ray_app.serve.records import RankJob
    from ray_app.store.base import Event

    torch.set_num_threads(1)  # what a replica with a fractional CPU gets (OMP_NUM_THREADS=1)
    ckpt = {"checkpoint": str(args.checkpoint.resolve())}
    # `.func_or_class` is the plain class under @serve.deployment; batch size 1 = no batching wait.
    dec = Decomposer.func_or_class(store_url, str(args.data.resolve()), max_batch_size=1)
    dec.reconfigure(ckpt)
    comb = Combiner.func_or_class(str(args.data.resolve()), max_batch_size=1)
    comb.reconfigure(ckpt)
    enc = Encoder.func_or_class(max_batch_size=1)
    rng = np.random.default_rng(args.seed)
    p = np.array([WEIGHTS[op] for op in OPS])
    lat = {op: [] for op in OPS}
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.inprocess_duration:
        op = OPS[int(rng.choice(len(OPS), p=p))]
        user = spec["users"][int(rng.integers(len(spec["users"])))]
        start = time.perf_counter()
        if op == "post_event":
            ev = Event(str(rng.choice(spec["item_ids"])), float(rng.integers(1, 11)) / 2.0, time.time())
            dec.store.append_events(user, [ev])
            dec._advance_users([(user, False)])  # Decomposer.advance's work
        else:
            intent = enc.encoder.encode([str(rng.choice(spec["intents"]))])[0] if op == "recommend_intent" else None
            state = dec._advance_users([(user, True)])[0]  # Decomposer.user_state's work
            comb._rank(comb.current, [RankJob(state, intent, 10, True, False, time.time())])  # Combiner.rank's work
        lat[op].append(time.perf_counter() - start)
    elapsed = time.perf_counter() - t0
    dec.store.close()
    n = sum(len(v) for v in lat.values())
    return {
        "elapsed_s": elapsed,
        "throughput_rps": n / elapsed,
        "latency_all": percentiles(sum(lat.values(), [])),
        "per_op": {op: {**percentiles(v), "throughput_rps": len(v) / elapsed} for op, v in lat.items()},
    }
