"""Serve's throughput-optimized mode, on by default.

Ray Serve ≥ 2.56 has a mode for throughput (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: direct ingress,
gRPC between replicas, user code and router on the replica's main loop, a frozen GC). On a
2-core machine it served this app's /recommend 1.4–1.6 times as fast as the default mode in one run
of `benchmarks/serve_floor.py` and level with it in another (docs/results.md). Serve reads
the variable once, when it is imported, in every Ray process (the controller, the proxies, the
replicas); a local Ray's processes inherit it from the process that starts them, so `use` runs
before `ray.init`. The driver only deploys, so what it imported earlier does not matter. On an
existing cluster (RAY_ADDRESS) the cluster's own environment decides: the RayService in `k8s/`
sets it on every pod.
"""

from __future__ import annotations

import os

ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
OFF = ("0", "false", "no", "off")


def use(throughput_optimized: bool | None = None) -> bool:
    """Set the mode for the Ray this process starts -> whether it is on. None: the environment's
    choice if it makes one, else on."""
    if throughput_optimized is None:
        throughput_optimized = os.environ.get(ENV, "1").strip().lower() not in OFF
    os.environ[ENV] = "1" if throughput_optimized else "0"
    return throughput_optimized
