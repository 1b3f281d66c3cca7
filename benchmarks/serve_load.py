"""Serve load benchmark: throughput, latency percentiles, errors and replica counts against concurrency.

    python benchmarks/serve_load.py                                   # ml-latest-small, trains a checkpoint if needed
    python benchmarks/serve_load.py --duration 60 --short-duration 30 --concurrency 1,8,32
    python benchmarks/serve_load.py --checkpoint runs/ray/NAME --data runs/data/NAME

Steps, all in one run so every ratio compares figures from the same machine state:
  1. in-process: the deployments' own model code (the bodies of the batched methods, a batch of one)
     called sequentially without Serve or HTTP, with the same operation mix: the baseline of the
     Serve overhead.
  2. autoscaled app (`ray_app.serve.app.build_app`, @serve.batch on): a separate client process
     (`load_client.py`, async httpx, closed loop) at each concurrency for a fixed time
     (`--duration` at 8 clients, `--short-duration` at the others); the mix is POST /recommend for
     known users without and with intent text and POST /users/{id}/events. `serve.status()` is
     sampled every second throughout, and after the last load until every deployment is back at
     its minimum replicas, so scaling up and back down is on record.
  3. batched against unbatched app at 32 clients, both with one replica per deployment (autoscaling
     off), so the ratio is batching's alone.
  4. the floor (`serve_floor.py`): POST /recommend under wrk against a no-op chain of the same three
     hops, in Serve's default and throughput-optimized modes, each in a Ray of its own; the app's
     req/s and p99 over the floor's are `vs_floor`.
Steps 1-3 run in the mode this process chooses (`ray_app.serve.mode`: throughput-optimized unless
RAY_SERVE_THROUGHPUT_OPTIMIZED=0). Records benchmarks/results/serve_load.json and serve_load.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from models.files import write_json
from serve_common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    RESULTS,
    checkpoint_config,
    command_line,  # sibling script
    api_access,
    ensure_checkpoint,
    machine,
    percentiles,
    replica_counts,
    running_replicas,
    wait_healthy,
)

HERE = Path(__file__).resolve().parent
OPS = ("recommend", "recommend_intent", "post_event")
WEIGHTS = {"recommend": 0.4, "recommend_intent": 0.3, "post_event": 0.3}
APP = "bench"


# ---- the app's settings ---------------------------------------------------------------------


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
    from ray_app.serve.app import DeploymentSettings

    one = dict(num_cpus=0.2, min_replicas=1, max_replicas=1, access_log=False)  # as the app's defaults
    return {
        "encoder": DeploymentSettings(**one),
        "decomposer": DeploymentSettings(**one),
        "combiner": DeploymentSettings(**one),
        "ingress": DeploymentSettings(**{**one, "access_log": True}, max_ongoing_requests=100),
    }


def deploy(args, store_url: str, batching: bool, settings: dict) -> dict:
    from ray import serve

    from ray_app.serve.app import AppArgs, build_app

    app_args = AppArgs(
        checkpoint=str(args.checkpoint), data_dir=str(args.data), store_url=store_url, batching=batching, **settings
    )
    serve.run(build_app(app_args), name=APP, route_prefix="/")
    wait_healthy(args.url)
    return json.loads(app_args.model_dump_json())


# ---- in-process baseline ----------------------------------------------------------------------


def in_process(args, spec: dict, store_url: str) -> dict:
    """The deployments' model code without Serve or HTTP: same store, same checkpoint, one thread."""
    import torch

    from ray_app.serve.deployments import Combiner, Decomposer, Encoder
    from ray_app.serve.served_model import RankJob
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
            ev = Event(int(rng.choice(spec["item_ids"])), float(rng.integers(1, 11)) / 2.0, time.time())
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


# ---- load and monitoring ----------------------------------------------------------------------


class ReplicaMonitor(threading.Thread):
    """Samples the RUNNING replicas of every deployment once a second, tagged with the current phase."""

    def __init__(self, t0: float, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.t0, self.period_s = t0, period_s
        self.phase = "start"
        self.samples: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(
                    {"t": time.time() - self.t0, "phase": self.phase, "replicas": running_replicas(replica_counts())}
                )
            except Exception as e:  # a controller hiccup must not end the benchmark; it is recorded
                self.samples.append({"t": time.time() - self.t0, "phase": self.phase, "error": repr(e)})
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def latest(self) -> dict[str, int]:
        for s in reversed(self.samples):
            if "replicas" in s:
                return s["replicas"]
        return {}


def drive(args, spec_path: Path, concurrency: int, duration: float, tag: str) -> dict:
    """One load level from a separate client process."""
    out = Path(tempfile.mkstemp(prefix=f"load-{tag}-", suffix=".json")[1])
    cmd = [
        sys.executable,
        str(HERE / "load_client.py"),
        "--url",
        args.url,
        "--spec",
        str(spec_path),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--seed",
        str(args.seed + concurrency),
        "--out",
        str(out),
    ]
    load_before = os.getloadavg()[0]
    subprocess.run(cmd, check=True, timeout=duration + 120)
    result = json.loads(out.read_text())
    out.unlink()
    result["load_avg_1min"] = [load_before, os.getloadavg()[0]]
    rec = result["per_op"].get("recommend", {})
    print(
        f"{tag:>22}: {result['throughput_rps']:6.1f} req/s, errors {result['errors']}, /recommend p50 "
        f"{rec.get('p50_ms', 0):.1f} p95 {rec.get('p95_ms', 0):.1f} p99 {rec.get('p99_ms', 0):.1f} ms",
        flush=True,
    )
    return result


def wait_for_downscale(monitor: ReplicaMonitor, minimum: dict[str, int], timeout_s: float) -> float | None:
    """Seconds until every deployment is back at its minimum (None if it did not happen in time)."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        now = monitor.latest()
        if now and all(now.get(name, 0) <= m for name, m in minimum.items()):
            return time.time() - t0
        time.sleep(1.0)
    return None


def scaling_summary(samples: list[dict], minimum: dict[str, int]) -> dict:
    out = {}
    for name, m in minimum.items():
        series = [(s["t"], s["phase"], s["replicas"].get(name, 0)) for s in samples if "replicas" in s]
        peak = max((r for _, _, r in series), default=0)
        above = [t for t, _, r in series if r > m]
        after_peak = [t for t, _, r in series if above and t > above[-1]]
        out[name] = {
            "min": m,
            "max_seen": peak,
            "scaled_up": peak > m,
            "first_above_min_s": above[0] if above else None,
            "back_at_min_s": after_peak[0] if after_peak else None,
            "peak_by_phase": {
                ph: max((r for _, p, r in series if p == ph), default=0)
                for ph in dict.fromkeys(p for _, p, _ in series)
            },
        }
    return out


# ---- report -----------------------------------------------------------------------------------


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    runs = record["autoscaled"]
    levels = sorted(int(c) for c in runs)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.5))
    a1.plot(levels, [runs[str(c)]["throughput_rps"] for c in levels], marker="o", label="Serve, batched, autoscaled")
    a1.axhline(record["in_process"]["throughput_rps"], color="grey", ls="--", label="in-process, sequential")
    for key, marker in (("batched", "s"), ("unbatched", "x")):
        run = record["batching"][key]
        a1.scatter(
            [run["concurrency"]],
            [run["throughput_rps"]],
            marker=marker,
            s=60,
            zorder=3,
            label=f"Serve, {key}, 1 replica each",
        )
    a1.set(
        xscale="log",
        xticks=levels,
        xticklabels=levels,
        xlabel="concurrent clients",
        ylabel="requests/s",
        title="throughput",
    )
    a1.legend(fontsize=7)
    for q, ls in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
        for op, color in (("recommend", "C0"), ("recommend_intent", "C1"), ("post_event", "C2")):
            a2.plot(
                levels,
                [runs[str(c)]["per_op"][op].get(q, np.nan) for c in levels],
                ls=ls,
                color=color,
                marker="o",
                ms=3,
                label=f"{op} {q[:-3]}",
            )
    a2.set(
        xscale="log",
        yscale="log",
        xticks=levels,
        xticklabels=levels,
        xlabel="concurrent clients",
        ylabel="latency (ms)",
        title="latency percentiles",
    )
    a2.legend(fontsize=6, ncol=3)
    samples = [s for s in record["replicas_over_time"] if "replicas" in s]
    names = sorted({n for s in samples for n in s["replicas"]})
    for name in names:
        a3.step([s["t"] for s in samples], [s["replicas"].get(name, 0) for s in samples], where="post", label=name)
    spans: dict[str, list[float]] = {}
    for s in samples:
        spans.setdefault(s["phase"], []).append(s["t"])
    for j, (phase, ts) in enumerate(spans.items()):
        if phase.startswith("load"):
            a3.axvspan(min(ts), max(ts), color=f"C{j % 10}", alpha=0.08)
            a3.text(min(ts), 0.2, phase.replace("load ", ""), fontsize=7)
    a3.set(xlabel="seconds since the app started", ylabel="RUNNING replicas", title="replicas over time")
    a3.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (a1, a2):
        ax.xaxis.set_minor_formatter(NullFormatter())
    a3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_spec(data_dir: Path, n_users: int, seed: int) -> dict:
    from models.data import load_prepared

    data = load_prepared(data_dir)
    rng = np.random.default_rng(seed)
    users = rng.choice(data.user_source_ids[1:], size=min(n_users, data.n_users), replace=False)
    intents = list(rng.choice(data.intent_phrases, size=min(20, len(data.intent_phrases)), replace=False))
    return {
        "users": [str(int(u)) for u in users],
        "item_ids": [int(i) for i in data.item_source_ids[1:]],
        "intents": [str(t) for t in intents],
        "weights": WEIGHTS,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="decomposer checkpoint (trained if missing)"
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prepared dataset folder of the checkpoint")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load at 8 clients")
    p.add_argument("--short-duration", type=float, default=30.0, help="seconds of load at the other levels")
    p.add_argument("--inprocess-duration", type=float, default=15.0)
    p.add_argument("--target-ongoing", type=float, default=2.0, help="autoscaling target_ongoing_requests")
    p.add_argument("--downscale-delay", type=float, default=10.0, help="autoscaling downscale_delay_s")
    p.add_argument("--downscale-wait", type=float, default=120.0, help="seconds to wait for the scale-down")
    p.add_argument("--users", type=int, default=200, help="known users the clients pick from")
    p.add_argument("--port", type=int, default=8032)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor-duration", type=float, default=10.0, help="seconds of one wrk run against the floor")
    p.add_argument("--floor-rounds", type=int, default=3, help="turns app and floor take at each wrk level")
    p.add_argument("--floor-levels", default="8,32", help="wrk connection counts")
    p.add_argument("--no-floor", action="store_true", help="skip step 4")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = p.parse_args(argv)
    from ray_app.serve import mode as serve_mode

    throughput_optimized = serve_mode.use()  # before ray.init: the replicas inherit it
    levels = [int(c) for c in args.concurrency.split(",")]
    args.url = f"http://127.0.0.1:{args.port}"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_checkpoint(args.checkpoint, args.data)
    record = {
        "benchmark": "serve_load",
        "checkpoint": str(args.checkpoint),
        "checkpoint_config": checkpoint_config(args.checkpoint),
        "data": str(args.data),
        "machine": machine(
            "2 cores shared with other engineers' jobs (tests, training) during the run; "
            "the load client runs on the same 2 cores as Serve"
        ),
        "command": command_line(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "weights": WEIGHTS,
        "throughput_optimized": throughput_optimized,
    }
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        spec = make_spec(args.data, args.users, args.seed)
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        from ray_app.serve.served_model import Catalogue, training_user_events
        from ray_app.store.opener import open_store

        base_store = f"sqlite:///{tmp}/inprocess.db"
        store = open_store(base_store)
        for users in training_user_events(Catalogue.load(args.data)[1]):
            store.bulk_load(users)
        store.close()
        record["in_process"] = in_process(args, spec, base_store)
        print(
            f"{'in-process':>22}: {record['in_process']['throughput_rps']:6.1f} req/s, /recommend p50 "
            f"{record['in_process']['per_op']['recommend']['p50_ms']:.1f} ms",
            flush=True,
        )
        record.update(serve_runs(args, levels, spec_path, f"sqlite:///{tmp}/served.db"))
    if not args.no_floor:
        from serve_floor import MODES, floor_runs, summary

        floor_levels = [int(c) for c in args.floor_levels.split(",")]
        record["floor"] = floor_runs(
            args.checkpoint,
            args.data,
            spec["users"],
            list(MODES),
            floor_levels,
            args.floor_duration,
            args.port + 1,
            args.floor_rounds,
        )
        record["vs_floor"] = summary(record["floor"])
    record["figures"] = figures(record, levels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    plot(record, args.out.with_suffix(".png"))
    for k, v in record["figures"].items():
        print(f"{k}: {v}")
    print(f"recorded in {args.out} and {args.out.with_suffix('.png')}")
    return 0


def serve_runs(args, levels: list[int], spec_path: Path, store_url: str) -> dict:
    import ray
    from ray import serve

    api_access()  # with authentication on, as it is deployed
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    out = {"autoscaled": {}}
    monitor = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        t0 = time.time()
        monitor = ReplicaMonitor(t0)
        out["app_args_autoscaled"] = deploy(args, store_url, True, autoscaled(args))
        out["startup_s"] = time.time() - t0
        monitor.start()
        minimum = {name: 1 for name in ("Ingress", "Encoder", "Decomposer", "Combiner")}
        for c in levels:
            monitor.phase = f"load {c}"
            out["autoscaled"][str(c)] = drive(
                args, spec_path, c, args.duration if c == 8 else args.short_duration, f"{c} clients, autoscaled"
            )
        monitor.phase = "after load"
        out["downscale_after_s"] = wait_for_downscale(monitor, minimum, args.downscale_wait)
        out["scaling"] = scaling_summary(monitor.samples, minimum)
        out["batching"] = {}
        top = max(levels)
        for key, batching in (("batched", True), ("unbatched", False)):
            monitor.phase = f"redeploy {key}"
            out[f"app_args_{key}"] = deploy(args, store_url, batching, fixed())
            monitor.phase = f"load {top} {key}"
            out["batching"][key] = drive(args, spec_path, top, args.short_duration, f"{top} clients, {key}, fixed")
        monitor.phase = "end"
    finally:
        if monitor is not None:
            monitor.stop()
            out["replicas_over_time"] = monitor.samples
        serve.shutdown()
        ray.shutdown()
    return out


def figures(record: dict, levels: list[int]) -> dict:
    runs, base = record["autoscaled"], record["in_process"]
    one = runs[str(min(levels))]
    f = {f"throughput_rps_{c}_clients": runs[str(c)]["throughput_rps"] for c in levels}
    f.update({f"errors_{c}_clients": runs[str(c)]["errors"] for c in levels})
    if "8" in runs:
        f["recommend_p99_ms_8_clients"] = runs["8"]["per_op"]["recommend"].get("p99_ms")
        f["recommend_intent_p99_ms_8_clients"] = runs["8"]["per_op"]["recommend_intent"].get("p99_ms")
    f["in_process_throughput_rps"] = base["throughput_rps"]
    # Serve overhead at one client: same operations, same model code, one request at a time.
    f["serve_overhead_latency_ratio_p50_1_client"] = {
        op: one["per_op"][op]["p50_ms"] / base["per_op"][op]["p50_ms"] for op in OPS if one["per_op"][op].get("count")
    }
    f["in_process_over_serve_throughput_1_client"] = base["throughput_rps"] / one["throughput_rps"]
    b = record["batching"]
    f[f"batched_over_unbatched_throughput_{max(levels)}_clients"] = (
        b["batched"]["throughput_rps"] / b["unbatched"]["throughput_rps"]
    )
    f["autoscaling_max_replicas"] = {n: s["max_seen"] for n, s in record["scaling"].items()}
    f["downscale_back_to_min_after_s"] = record["downscale_after_s"]
    for mode, by_level in record.get("vs_floor", {}).items():
        for c, v in by_level.items():
            f[f"{mode}_{c}_conns_vs_floor"] = {
                "throughput": v["throughput_vs_floor"],
                "p99": v["p99_vs_floor"],
                "app_rps": v["app_rps"],
                "floor_rps": v["floor_rps"],
            }
    return f


if __name__ == "__main__":
    sys.exit(main())
