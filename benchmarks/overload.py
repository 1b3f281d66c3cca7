"""Overload: the app at its capacity and at four times it, under wrk, with the shipped load shedding.

    python benchmarks/overload.py                      # 20 s at capacity, 20 s at 4x, one round
    python benchmarks/overload.py --rounds 2 --duration 30
    python benchmarks/overload.py --rounds 2 --honour-retry-after   # clients that wait Retry-After

Capacity is the concurrency the app admits without queueing: the Ingress's `max_ongoing_requests`
(the shipped default, one Ingress replica). wrk (closed loop, `benchmarks/wrk_recommend.lua`: POST
/recommend for known users) runs with that many connections, then with four times as many. Beyond
what the Ingress admits and its `max_queued_requests` queue, Serve answers 503 with `Retry-After` at
once (the Ingress replica itself in the shipped throughput-optimized mode, the proxy otherwise).
wrk's own latencies mix the accepted requests with the shed ones, so a probe beside it (eight
threads of one connection each, sequential requests, the same route and users; wrk gets eight
connections fewer, so the totals are the capacity and four times it) times every request it sends and keeps the status: the p99 of its accepted requests at 4x
over the p99 at capacity is `p99_ratio` (target <= 2), the p99 of its 503s at 4x is `shed_ms`
(target <= 100). wrk's throughput and non-2xx counts are recorded beside them. One replica per
stage, fractional CPUs, wrk and the probe on the same cores as Serve, in Serve's mode as shipped
(`ray_app/serve/mode.py`: throughput-optimized unless RAY_SERVE_THROUGHPUT_OPTIMIZED=0; recorded).
Result: benchmarks/results/overload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TARGETS = {"p99_ratio": 2.0, "shed_ms": 100.0}
PROBE_THREADS = 8  # the probe's connections, counted in each level's total


def _p99(ms: list[float]) -> float | None:
    return float(np.percentile(ms, 99)) if ms else None


class Probe:
    """Threads that send POST /recommend one after another and time each answer, by status."""

    def __init__(self, url: str, users: list[str], headers: dict, threads: int = PROBE_THREADS, honour: bool = False):
        self.url, self.users, self.headers, self.n = url, users, headers, threads
        self.honour = honour  # after a 503, wait its Retry-After before the next request (not timed)
        self.ok: list[float] = []  # ms of 200s
        self.shed: list[float] = []  # ms of 503s
        self.other: dict[int, int] = {}
        self.retry_after: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, seed: int) -> None:
        import httpx

        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as c:
            while not self._stop.is_set():
                body = {"user_id": rng.choice(self.users), "k": 10}
                t0 = time.perf_counter()
                try:
                    r = c.post("/recommend", json=body)
                except httpx.HTTPError:
                    self.other[0] = self.other.get(0, 0) + 1
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                if r.status_code == 200:
                    self.ok.append(ms)
                elif r.status_code == 503:
                    self.shed.append(ms)
                    self.retry_after.add(r.headers.get("retry-after", "missing"))
                    if self.honour:
                        self._stop.wait(float(r.headers.get("retry-after", "1")))
                else:
                    self.other[r.status_code] = self.other.get(r.status_code, 0) + 1

    def __enter__(self) -> Probe:
        self._threads = [threading.Thread(target=self._run, args=(j,), daemon=True) for j in range(self.n)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def summary(self) -> dict:
        return {
            "accepted": len(self.ok),
            "accepted_p50_ms": float(np.percentile(self.ok, 50)) if self.ok else None,
            "accepted_p99_ms": _p99(self.ok),
            "shed": len(self.shed),
            "shed_p50_ms": float(np.percentile(self.shed, 50)) if self.shed else None,
            "shed_p99_ms": _p99(self.shed),
            "shed_retry_after": sorted(self.retry_after),
            "other_statuses": {str(k): v for k, v in sorted(self.other.items())},
        }


def run_level(
    url: str, connections: int, duration_s: float, users_file: Path, users: list[str], headers: dict, honour: bool
):
    from serve_floor import run_wrk

    with Probe(url, users, headers, honour=honour) as probe:
        n = connections - PROBE_THREADS
        # A wrk thread's script state is shared by its connections: a wait after a 503 is only the
        # connection's own with one thread per connection.
        wrk = run_wrk(url, n, duration_s, users_file, threads=n if honour else 2, honour_retry_after=honour)
    return {"wrk": wrk, "probe": probe.summary()}


def main(argv=None) -> int:
    from serve_common import DEFAULT_CHECKPOINT, DEFAULT_DATA, RESULTS, api_access, command_line, ensure_checkpoint
    from serve_common import machine, wait_healthy
    from serve_load_app import make_spec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of one wrk run")
    p.add_argument("--rounds", type=int, default=1, help="capacity then 4x, this many times")
    p.add_argument("--port", type=int, default=8035)
    p.add_argument("--users", type=int, default=200, help="known users the requests pick from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--honour-retry-after",
        action="store_true",
        help="clients wait a 503's Retry-After before their next request (default: they send it at once, as wrk does)",
    )
    p.add_argument("--out", type=Path, help="default: results/overload.json (overload_retry_after.json with the flag)")
    a = p.parse_args(argv)
    a.out = a.out or RESULTS / ("overload_retry_after.json" if a.honour_retry_after else "overload.json")

    headers = api_access()  # before Ray starts: its replicas inherit the signing key
    ensure_checkpoint(a.checkpoint, a.data)
    users = make_spec(a.data, a.users, a.seed)["users"]

    from ray_app.serve import mode as serve_mode

    throughput_optimized = serve_mode.use()  # the shipped mode unless the environment says otherwise
    import ray
    from ray import serve

    from ray_app.serve.app import REQUEST_TIMEOUT_S, AppArgs, DeploymentSettings, build_app
    from ray_app.serve.load_users import load_training_users

    shipped = AppArgs.model_fields["ingress"].default
    capacity = shipped.max_ongoing_requests
    url = f"http://127.0.0.1:{a.port}"
    with tempfile.TemporaryDirectory() as tmp:
        store_url = f"sqlite:///{tmp}/state.db"
        load_training_users(a.data, store_url)
        users_file = Path(tmp) / "users.txt"
        users_file.write_text("\n".join(users) + "\n")
        one = dict(num_cpus=0.2, min_replicas=1, max_replicas=1, access_log=False)
        app_args = AppArgs(
            checkpoint=str(a.checkpoint.resolve()),
            data_dir=str(a.data.resolve()),
            store_url=store_url,
            load_users=False,  # loaded above
            # Far above what wrk sends: the load shedding is measured, not the rate limit.
            service_rate_per_minute=10**9,
            encoder=DeploymentSettings(**one),
            decomposer=DeploymentSettings(**one),
            combiner=DeploymentSettings(**one),
            ingress=shipped.model_copy(update={**one, "access_log": True}),
        )
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": a.port, "request_timeout_s": REQUEST_TIMEOUT_S})
        try:
            serve.run(build_app(app_args), name="overload", route_prefix="/")
            wait_healthy(url)
            run_level(url, capacity, 5, users_file, users, headers, a.honour_retry_after)  # warm-up, not recorded
            rounds = []
            for r in range(a.rounds):
                at = run_level(url, capacity, a.duration, users_file, users, headers, a.honour_retry_after)
                over = run_level(url, 4 * capacity, a.duration, users_file, users, headers, a.honour_retry_after)
                rounds.append({"at_capacity": at, "at_4x": over})
                print(
                    f"round {r + 1}: capacity ({capacity} conns) {at['wrk']['throughput_rps']:.0f} req/s, "
                    f"probe p99 {at['probe']['accepted_p99_ms']:.1f} ms; 4x ({4 * capacity} conns) "
                    f"{over['wrk']['throughput_rps']:.0f} req/s, probe accepted p99 "
                    f"{over['probe']['accepted_p99_ms']:.1f} ms, shed {over['probe']['shed']} "
                    f"(p99 {over['probe']['shed_p99_ms'] or 0:.1f} ms)",
                    flush=True,
                )
        finally:
            serve.shutdown()
            ray.shutdown()

    at_p99 = [r["at_capacity"]["probe"]["accepted_p99_ms"] for r in rounds]
    over_p99 = [r["at_4x"]["probe"]["accepted_p99_ms"] for r in rounds]
    shed_p99 = [r["at_4x"]["probe"]["shed_p99_ms"] for r in rounds if r["at_4x"]["probe"]["shed_p99_ms"] is not None]
    p99_ratio = float(np.median([o / c for o, c in zip(over_p99, at_p99)]))
    shed_ms = float(np.median(shed_p99)) if shed_p99 else None
    record = {
        "benchmark": "overload",
        "command": command_line(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine("wrk and the probe run on the same cores as Serve"),
        "throughput_optimized": throughput_optimized,
        "clients": "wait a 503's Retry-After"
        if a.honour_retry_after
        else "send the next request at once (closed loop)",
        "capacity_connections": capacity,
        "ingress": {
            "max_ongoing_requests": shipped.max_ongoing_requests,
            "max_queued_requests": shipped.max_queued_requests,
        },
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "p99_ratio": p99_ratio,
        "shed_ms": shed_ms,
        "targets": TARGETS,
        "met": {"p99_ratio": p99_ratio <= TARGETS["p99_ratio"], "shed_ms": shed_ms is not None and shed_ms <= 100},
        "rounds": rounds,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    from models.files import write_json

    write_json(a.out, record)
    print(json.dumps({k: record[k] for k in ("p99_ratio", "shed_ms", "met")}))
    print(f"recorded in {a.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
