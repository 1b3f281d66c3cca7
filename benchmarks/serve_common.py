"""Helpers shared by the serving benchmarks: machine record, synthetic event histories, the app's
lifecycle on a local Ray cluster, and latency summaries.

The app itself is `ray_app.serve.app.build_app`; this module only starts and stops it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine_info import machine  # noqa: F401  (sibling script; re-exported to the serving benchmarks)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CHECKPOINT = Path("runs/serve-bench/ml-latest-small/decomposer.pt")
DEFAULT_DATA = Path("runs/data/ml-latest-small")


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def percentiles(seconds: list[float] | np.ndarray) -> dict:
    """Latencies in seconds -> milliseconds summary (empty input -> zeros, count 0)."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"count": 0, "mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "count": int(a.size),
        "mean_ms": float(a.mean()),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(a.max()),
    }


def random_events(item_source_ids: np.ndarray, n: int, rng: np.random.Generator, start: float = 1.6e9) -> list[dict]:
    """`n` plausible events as API JSON: real catalogue ids, half-star ratings, increasing timestamps."""
    ids = rng.choice(item_source_ids[1:], size=n)  # [0] is the padding row
    ratings = rng.integers(1, 11, size=n) / 2.0  # 0.5 .. 5.0
    ts = start + np.cumsum(rng.exponential(3 * 3600.0, size=n)).round()
    return [{"item_id": str(i), "rating": float(r), "timestamp": float(t)} for i, r, t in zip(ids, ratings, ts)]


def ensure_checkpoint(checkpoint: Path, data: Path, time_budget_s: float = 90.0) -> Path:
    """Train a quick decomposer on `data` unless `checkpoint` exists (a few epochs: serving cost, not quality)."""
    if checkpoint.is_file():
        return checkpoint
    dataset = "ml-latest-small" if "ml-latest-small" in str(data) else "synthetic"
    cmd = [
        sys.executable,
        "-m",
        "models.training.run",
        "--dataset",
        dataset,
        "--prepared-dir",
        str(data),
        "--models",
        "decomposer",
        "--epochs",
        "3",
        "--time-budget",
        str(time_budget_s),
        "--out",
        str(checkpoint.parent),
    ]
    print("training a checkpoint:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    add_vocabulary(checkpoint, data)
    return checkpoint


def checkpoint_config(checkpoint: Path) -> dict:
    """The model type and settings of a checkpoint, recorded beside the figures measured with it."""
    from models.nn import checkpoint as ckpt

    model, _ = ckpt.load(checkpoint)
    return {"model_type": ckpt.model_type(model), **model.cfg.to_dict()}


def add_vocabulary(checkpoint: Path, data: Path) -> None:
    """Store the item vocabulary in the checkpoint's meta, as Ray Train checkpoints do (`models.training.run`
    leaves it out), so every serving stage can map source ids without the dataset."""
    from models.nn import checkpoint as ckpt
    from models.data import load_prepared

    model, meta = ckpt.load(checkpoint)
    if "item_source_ids" not in meta:
        ids = load_prepared(data).item_source_ids.tolist()
        ckpt.save(checkpoint, model, {**meta, "item_source_ids": ids})


def api_access() -> dict[str, str]:
    """Before ray.init: the API's signing secret in this process's environment (a fresh one unless
    set; the replicas inherit it) and a service token in $DYNAMIC_INTEREST_TOKEN (the load client
    processes inherit that) -> the headers of that token."""
    from ray_app.serve.auth import SECRET_ENV, TOKEN_ENV, mint, new_secret

    os.environ.setdefault(SECRET_ENV, new_secret())
    os.environ[TOKEN_ENV] = mint(os.environ[SECRET_ENV], "service")
    return {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}


def wait_healthy(base_url: str, timeout_s: float = 180.0) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/healthz", timeout=5.0)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/healthz not ready after {timeout_s:.0f}s ({last})")


def replica_counts() -> dict[str, dict[str, int]]:
    """{deployment: {replica state: count}} of every running app, from `serve.status()`."""
    from ray import serve

    out = {}
    for app in serve.status().applications.values():
        for name, dep in app.deployments.items():
            out[name] = {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}
    return out


def running_replicas(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    return {name: states.get("RUNNING", 0) for name, states in counts.items()}
