"""CPU time per request of each Ray process during a load run: where a Serve app's cost goes.

`snapshot()` before and after a wrk run, then `per_request(before, after, requests)`: CPU
milliseconds (user + system) per request of every process that used any, named by its Ray
process title (`ServeReplica:<app>:<deployment>`, `ProxyActor`, ...), processes of the same name
summed. The CPU of wrk itself and of processes outside Ray is left out.
"""

from __future__ import annotations

import re

import psutil

_REPLICA = re.compile(r"ray::ServeReplica:([^:\s]+):([^.\s]+)")
_ACTOR = re.compile(r"ray::([A-Za-z]+)")


def process_name(cmdline: str) -> str | None:
    """A Ray process's title -> 'app:Deployment' for a Serve replica, the actor's class otherwise; None outside Ray."""
    m = _REPLICA.search(cmdline)
    if m:
        return f"{m.group(1)}:{m.group(2)}"
    m = _ACTOR.search(cmdline)
    if m:
        return m.group(1)
    if "/ray/" in cmdline and ("gcs_server" in cmdline or "raylet" in cmdline):
        return "gcs_server" if "gcs_server" in cmdline else "raylet"
    return None


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds so far) of every Ray process."""
    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            name = process_name(" ".join(p.info["cmdline"] or []))
            if name is not None:
                t = p.cpu_times()
                out[p.info["pid"]] = (name, t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def per_request(before: dict, after: dict, requests: int, min_ms: float = 0.05) -> dict[str, float]:
    """CPU ms per request by process name between two snapshots, largest first (those under `min_ms` left out)."""
    if requests <= 0:
        raise ValueError(f"requests must be positive, got {requests}")
    total: dict[str, float] = {}
    for pid, (name, t) in after.items():
        t0 = before.get(pid, (name, 0.0))[1]
        total[name] = total.get(name, 0.0) + (t - t0)
    rows = {name: 1000 * s / requests for name, s in total.items() if 1000 * s / requests >= min_ms}
    return dict(sorted(rows.items(), key=lambda x: -x[1]))
