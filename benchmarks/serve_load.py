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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from models.cli import add_settings, setting, settings_from
from models.files import write_json
from serve_common import (  # sibling scripts
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    RESULTS,
    checkpoint_config,
    command_line,
    ensure_checkpoint,
    machine,
)
from serve_load_app import WEIGHTS, in_process, make_spec
from serve_load_report import figures, plot
from serve_load_runs import serve_runs


@dataclass
class LoadSettings:
    """The checkpoint and its data, the load levels and their lengths, autoscaling, the floor step."""

    checkpoint: Path = setting(DEFAULT_CHECKPOINT, "decomposer checkpoint (trained if missing)")
    data: Path = setting(DEFAULT_DATA, "prepared dataset folder of the checkpoint")
    concurrency: str = setting("1,8,32")
    duration: float = setting(60.0, "seconds of load at 8 clients")
    short_duration: float = setting(30.0, "seconds of load at the other levels")
    inprocess_duration: float = setting(15.0)
    target_ongoing: float = setting(2.0, "autoscaling target_ongoing_requests")
    downscale_delay: float = setting(10.0, "autoscaling downscale_delay_s")
    downscale_wait: float = setting(120.0, "seconds to wait for the scale-down")
    users: int = setting(200, "known users the clients pick from")
    port: int = setting(8032)
    seed: int = setting(0)
    floor_duration: float = setting(10.0, "seconds of one wrk run against the floor")
    floor_rounds: int = setting(3, "turns app and floor take at each wrk level")
    floor_levels: str = setting("8,32", "wrk connection counts")
    no_floor: bool = setting(False, "skip step 4")
    out: Path = setting(RESULTS / "serve_load.json")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def parse(argv) -> LoadSettings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, LoadSettings)
    return settings_from(LoadSettings, p.parse_args(argv))


def header(s: LoadSettings, throughput_optimized: bool) -> dict:
    """The record's first fields: what was measured, on what, in which mode."""
    return {
        "benchmark": "serve_load",
        "checkpoint": str(s.checkpoint),
        "checkpoint_config": checkpoint_config(s.checkpoint),
        "data": str(s.data),
        "machine": machine(
            "2 cores shared with other engineers' jobs (tests, training) during the run; "
            "the load client runs on the same 2 cores as Serve"
        ),
        "command": command_line(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "weights": WEIGHTS,
        "throughput_optimized": throughput_optimized,
    }


def run_in_process(s: LoadSettings, spec: dict, tmp: str) -> dict:
    """Step 1 on a store loaded with the training users' events (printed too)."""
    from ray_app.serve.item_catalogue import Catalogue, training_user_events
    from ray_app.store.opener import open_store

    base_store = f"sqlite:///{tmp}/inprocess.db"
    store = open_store(base_store)
    for users in training_user_events(Catalogue.load(s.data)[1]):
        store.bulk_load(users)
    store.close()
    result = in_process(s, spec, base_store)
    print(
        f"{'in-process':>22}: {result['throughput_rps']:6.1f} req/s, /recommend p50 "
        f"{result['per_op']['recommend']['p50_ms']:.1f} ms",
        flush=True,
    )
    return result


def run_floor(s: LoadSettings, users: list[str]) -> dict:
    """Step 4: the floor in every mode -> its runs and the app over the floor."""
    from serve_floor import MODES, floor_runs, summary

    floor = floor_runs(
        s.checkpoint,
        s.data,
        users,
        list(MODES),
        [int(c) for c in s.floor_levels.split(",")],
        s.floor_duration,
        s.port + 1,
        s.floor_rounds,
    )
    return {"floor": floor, "vs_floor": summary(floor)}


def write_report(s: LoadSettings, record: dict, levels: list[int]) -> None:
    """The figures added, the record and its plot written, the figures printed."""
    record["figures"] = figures(record, levels)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(s.out, record)
    plot(record, s.out.with_suffix(".png"))
    for k, v in record["figures"].items():
        print(f"{k}: {v}")
    print(f"recorded in {s.out} and {s.out.with_suffix('.png')}")


def main(argv=None) -> int:
    s = parse(argv)
    from ray_app.serve import mode as serve_mode

    throughput_optimized = serve_mode.use()  # before ray.init: the replicas inherit it
    levels = [int(c) for c in s.concurrency.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_checkpoint(s.checkpoint, s.data)
    record = header(s, throughput_optimized)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        spec = make_spec(s.data, s.users, s.seed)
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        record["in_process"] = run_in_process(s, spec, tmp)
        record.update(serve_runs(s, levels, spec_path, f"sqlite:///{tmp}/served.db"))
    if not s.no_floor:
        record.update(run_floor(s, spec["users"]))
    write_report(s, record, levels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
