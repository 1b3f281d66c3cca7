"""Checks a newcomer benefits from, before anything starts: free ports, enough memory, no stray Ray."""

from __future__ import annotations

import os
import socket
import time

from main_job.settings import MainSettings, NewcomerError

# Peak RSS of each stage as the scale benchmark measured it (benchmarks/results/scale.json,
# "memory_model", fitted over its sizes; "train-ray", the driver and one Ray Train worker together as
# the main job runs them, from benchmarks/results/scale_ray_train.json; tests/test_main.py checks
# that these agree with them): bytes ≈ base + per_event · events + per_item · items.
MEMORY_MODEL = {
    "prepare": (705_100_000, 125.3, 8_980),
    "train-sampled": (1_659_000_000, 89.54, 18_320),
    "train-full": (954_500_000, 105.6, 156_800),
    "serve": (531_800_000, 62.32, 10_580),
    "train-ray": (960_900_000, 660.3, 18_320),
}
KNOWN_SIZES = {  # events, items
    "ml-100k": (100_000, 1_682),
    "ml-latest-small": (100_836, 9_742),
    "ml-1m": (1_000_209, 3_706),
    "ml-10m": (10_000_054, 10_677),
    "ml-25m": (25_000_095, 62_423),
    "ml-32m": (32_000_204, 87_585),
}
KNOWN_EVENTS = {name: events for name, (events, _) in KNOWN_SIZES.items()}


def memory_need(events: int, items: int) -> tuple[str, int]:
    """The stage that needs the most memory for a dataset of this size, and its bytes: preparation,
    the training loop with the softmax `models.training.loop.default_loss` picks for the catalogue,
    the same as the main job runs it (Ray Train's driver and one worker), and serving."""
    from models.training.loop import default_loss

    train = "train-sampled" if default_loss("decomposer", items) == "sampled" else "train-full"
    needs = {
        st: int(base + per_event * events + per_item * items)
        for st, (base, per_event, per_item) in MEMORY_MODEL.items()
        if st in ("prepare", train, "train-ray", "serve")
    }
    worst = max(needs, key=needs.get)
    return worst, needs[worst]


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
    """A known dataset that needs more memory than is free -> a NewcomerError naming the stage, a
    smaller dataset and the ways to bring the run within the machine."""
    import psutil

    if dataset not in KNOWN_SIZES:
        return
    stage, need = memory_need(*KNOWN_SIZES[dataset])
    free = psutil.virtual_memory().available if free_bytes is None else free_bytes
    if need > free:
        ways = {
            "prepare": "prepare it on a larger machine once (the prepared folder is reused)",
            "train-full": "train with the sampled softmax (--set loss=sampled)",
            "train-sampled": "train on a cluster, where each worker holds its shard (see k8s/README.md)",
            "train-ray": "train on a cluster, where each worker holds its shard (see k8s/README.md)",
            "serve": "serve it on a cluster (see k8s/README.md)",
        }
        raise NewcomerError(
            f"{dataset} needs about {need / 2**30:.1f} GiB of memory (its {stage} stage, measured by "
            f"benchmarks/scale.py), this machine has {free / 2**30:.1f} GiB free: {ways[stage]}, "
            f"or use --dataset ml-latest-small (or ml-1m)"
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


def check_index(index: str, model_args: dict) -> None:
    """An index the model to be trained cannot be served with, refused now rather than at deploy."""
    if index != "exact" and model_args.get("combine") == "mixture":
        raise NewcomerError(
            f"--index {index} searches by the inner product, which a 'combine=mixture' model does not "
            "score by; use --index exact with it"
        )


def preflight(s: MainSettings) -> None:
    """Every check above for the job's settings, the API's port first."""
    check_port(s.host, s.port, "the API", "--port")
    if s.demo:
        check_port(s.host, s.demo_port, "the demo", "--demo-port")
    check_memory(s.dataset)
    check_ray()
