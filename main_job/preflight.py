"""Checks a newcomer benefits from, before anything starts: free ports, enough memory, no stray Ray."""

from __future__ import annotations

import os
import socket
import time

from main_job.settings import MainSettings, NewcomerError

# Rough peak memory of preparation and training per event (arrays, windows, Parquet buffers).
BYTES_PER_EVENT = 600
KNOWN_EVENTS = {
    "ml-100k": 100_000,
    "ml-latest-small": 100_836,
    "ml-1m": 1_000_209,
    "ml-10m": 10_000_054,
    "ml-25m": 25_000_095,
    "ml-32m": 32_000_204,
}


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def wait_port_free(host: str, port: int, timeout_s: float) -> bool:
    """True once `port` can be bound again (False after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not port_free(host, port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def check_port(host: str, port: int, what: str, flag: str) -> None:
    """A port in use -> a NewcomerError that names it and a free one to pick with `flag`."""
    if not port_free(host, port):
        raise NewcomerError(
            f"port {port} ({what}) is already in use — another copy of this job or "
            f"another server is running there: stop it, or pick a free port with {flag} {port + 10}"
        )


def check_memory(dataset: str, free_bytes: int | None = None) -> None:
    """A known dataset that needs more memory than is free -> a NewcomerError that names a smaller one."""
    import psutil

    events = KNOWN_EVENTS.get(dataset)
    if events is None:
        return
    need = events * BYTES_PER_EVENT
    free = psutil.virtual_memory().available if free_bytes is None else free_bytes
    if need > free:
        raise NewcomerError(
            f"{dataset} needs about {need / 2**30:.1f} GiB of memory to prepare and train, "
            f"this machine has {free / 2**30:.1f} GiB free: use --dataset ml-latest-small "
            f"(or ml-1m), or run it on a cluster (see k8s/README.md)"
        )


def check_ray() -> None:
    """Join a cluster only when asked to (RAY_ADDRESS); a stray local one would be joined silently."""
    from ray._private.services import find_bootstrap_address

    if os.environ.get("RAY_ADDRESS"):
        print(f"joining the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}", flush=True)
    elif find_bootstrap_address(None):  # what a plain ray.init() would silently join
        raise NewcomerError(
            "Ray is already running on this machine (a `ray start` cluster): stop it with "
            "`ray stop`, or run on it on purpose with RAY_ADDRESS=auto"
        )


def preflight(s: MainSettings) -> None:
    """Every check above for the job's settings, the API's port first."""
    check_port(s.host, s.port, "the API", "--port")
    if s.demo:
        check_port(s.host, s.demo_port, "the demo", "--demo-port")
    check_memory(s.dataset)
    check_ray()
