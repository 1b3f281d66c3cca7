"""Closed-loop HTTP load generator: N concurrent clients for a fixed time (a separate process from Serve).

    python benchmarks/load_client.py --url http://127.0.0.1:8000 --spec spec.json --concurrency 8 --duration 60

Each client sends its next request as soon as the previous one is answered, picking one of
  recommend         POST /recommend for a known user, no intent text
  recommend_intent  POST /recommend for a known user with intent text (runs the encoder)
  post_event        POST /users/{id}/events with one event
by the weights in the spec. The spec (JSON) holds "users" (known user ids), "item_ids" (source ids
of the catalogue), "intents" (phrases) and optionally "weights". Prints one JSON record to stdout
(or --out): per-operation latency percentiles, throughput, errors with a few samples; with --details
also every acknowledged event (so a test can check the store holds each of them) and every request.
The API's bearer token comes from $DYNAMIC_INTEREST_TOKEN (a service token: the load acts for many users).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

OPS = ("recommend", "recommend_intent", "post_event")
DEFAULT_WEIGHTS = {"recommend": 0.4, "recommend_intent": 0.3, "post_event": 0.3}


def summarize(latencies: list[float]) -> dict:
    a = np.asarray(latencies, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"count": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "count": int(a.size),
        "mean_ms": float(a.mean()),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(a.max()),
    }


class Load:
    def __init__(self, spec: dict, seed: int):
        self.users = [str(u) for u in spec["users"]]
        self.item_ids = [str(i) for i in spec["item_ids"]]
        self.intents = list(spec.get("intents") or ["something light and funny"])
        w = {**DEFAULT_WEIGHTS, **(spec.get("weights") or {})}
        self.ops = [op for op in OPS if w.get(op, 0) > 0]
        self.p = np.array([w[op] for op in self.ops], dtype=np.float64)
        self.p /= self.p.sum()
        self.rng = np.random.default_rng(seed)
        self.records: list[tuple[str, float, float, int]] = []  # (op, start offset s, latency s, status; 0 = no reply)
        self.errors: list[str] = []
        self.acked: list[dict] = []  # every acknowledged event: user, event, n_events

    def request(self) -> tuple[str, str, str, dict, dict | None]:
        op = self.ops[int(self.rng.choice(len(self.ops), p=self.p))]
        user = self.users[int(self.rng.integers(len(self.users)))]
        if op == "post_event":
            # time.time() plus a counter keeps each acknowledged event distinguishable in the store.
            ev = {
                "item_id": self.item_ids[int(self.rng.integers(len(self.item_ids)))],
                "rating": float(self.rng.integers(1, 11)) / 2.0,
                "timestamp": round(time.time(), 6),
            }
            return op, "POST", f"/users/{user}/events", {"events": [ev]}, {"user_id": user, **ev}
        body = {"user_id": user, "k": 10}
        if op == "recommend_intent":
            body["context"] = {"intent": self.intents[int(self.rng.integers(len(self.intents)))]}
        return op, "POST", "/recommend", body, None

    async def client(self, http: httpx.AsyncClient, t0: float, deadline: float) -> None:
        while time.perf_counter() < deadline:
            op, method, path, body, event = self.request()
            start = time.perf_counter()
            try:
                r = await http.request(method, path, json=body)
                status = r.status_code
            except httpx.HTTPError as e:
                status, r = 0, None
                self._error(f"{op}: {type(e).__name__}: {e}")
            lat = time.perf_counter() - start
            if r is not None and status != 200:
                self._error(f"{op}: HTTP {status}: {r.text[:200]}")
            if status == 200 and event is not None:
                self.acked.append({**event, "n_events": r.json()["n_events"]})
            self.records.append((op, start - t0, lat, status))

    def _error(self, msg: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(msg)


async def run(
    url: str, spec: dict, concurrency: int, duration: float, seed: int, timeout: float, keep_details: bool = False
) -> dict:
    load = Load(spec, seed)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    token = os.environ.get("DYNAMIC_INTEREST_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as http:
        t0 = time.perf_counter()
        wall0 = time.time()
        deadline = t0 + duration
        await asyncio.gather(*(load.client(http, t0, deadline) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ok = [r for r in load.records if r[3] == 200]
    per_op = {}
    for op in load.ops:
        rows = [r for r in load.records if r[0] == op]
        good = [r[2] for r in rows if r[3] == 200]
        per_op[op] = {
            **summarize(good),
            "requests": len(rows),
            "errors": len(rows) - len(good),
            "throughput_rps": len(good) / elapsed,
        }
    # Requests finished per second over the run, to see warm-up, scaling and stalls.
    seconds = np.floor([r[1] + r[2] for r in ok]).astype(int) if ok else np.zeros(0, int)
    timeline = np.bincount(seconds, minlength=int(np.ceil(elapsed))).tolist()
    return {
        "url": url,
        "concurrency": concurrency,
        "duration_s": duration,
        "elapsed_s": elapsed,
        "started_at": wall0,
        "requests": len(load.records),
        "ok": len(ok),
        "errors": len(load.records) - len(ok),
        "throughput_rps": len(ok) / elapsed,
        "latency_all": summarize([r[2] for r in ok]),
        "per_op": per_op,
        "completed_per_second": timeline,
        "error_samples": load.errors,
        "acknowledged_events": load.acked if keep_details else len(load.acked),
        **({"records": load.records} if keep_details else {}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--spec", type=Path, required=True, help="JSON with users, item_ids, intents, weights")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    p.add_argument(
        "--details",
        action="store_true",
        help="also list every acknowledged event and every request (op, start s, latency s, status)",
    )
    args = p.parse_args(argv)
    try:
        spec = json.loads(args.spec.read_text())
    except (OSError, ValueError) as e:
        p.error(f"--spec {args.spec}: {e}")
    for key in ("users", "item_ids"):
        if not spec.get(key):
            p.error(f"--spec {args.spec}: {key!r} is missing or empty")
    if args.concurrency < 1 or args.duration <= 0:
        p.error("--concurrency must be >= 1 and --duration > 0")
    result = asyncio.run(run(args.url, spec, args.concurrency, args.duration, args.seed, args.timeout, args.details))
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
