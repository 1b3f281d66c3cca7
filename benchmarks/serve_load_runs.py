"""The served runs of `serve_load.py`: load levels from a separate client process
(`load_client.py`), the RUNNING replicas sampled once a second throughout, the wait for the
scale-down, and the sequence of them against the autoscaled app and the batched and unbatched ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from serve_common import api_access, replica_counts, running_replicas  # sibling script
from serve_load_app import autoscaled, deploy, fixed

HERE = Path(__file__).resolve().parent


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


def serve_runs(args, levels: list[int], spec_path: Path, store_url: str) -> dict:
    """Steps 2 and 3 on a Ray of their own, the replicas sampled throughout -> their part of the record."""
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
