"""Application metrics of the Serve app, exported with Serve's own through Ray's Prometheus
endpoint (`ray.serve.metrics` adds the deployment, replica, application and route tags).

Each replica makes its own `AppMetrics` in `__init__` (metric objects do not travel with the
deployment class). Names start with `dynamic_interest_`; counters are exported with `_total`.
Latency per route and per deployment is Serve's own (`ray_serve_http_request_latency_ms` with
its `route` tag, `ray_serve_deployment_processing_latency_ms`), so it is not counted twice here.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ray.serve import metrics

from ray_app.store.base import StoreUnavailable

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class AppMetrics:
    def __init__(self):
        self.events_appended = metrics.Counter(
            "dynamic_interest_events_appended", description="events committed to the store"
        )
        self.state_rebuilds = metrics.Counter(
            "dynamic_interest_state_rebuilds",
            description="user states rebuilt from the whole window (missing, or another model version)",
        )
        self.store_errors = metrics.Counter(
            "dynamic_interest_store_errors",
            description="store calls that failed (answered 503)",
            tag_keys=("operation",),
        )
        self.store_latency = metrics.Histogram(
            "dynamic_interest_store_latency_ms",
            description="store call latency",
            boundaries=LATENCY_MS,
            tag_keys=("operation",),
        )
        self.text_cache = metrics.Gauge(
            "dynamic_interest_text_cache_entries", description="text vectors in the Encoder's LRU"
        )

    @contextmanager
    def store_errors_in(self, operation: str):
        """Count a StoreUnavailable raised inside (a step that calls the store among other work)."""
        try:
            yield
        except StoreUnavailable:
            self.store_errors.inc(tags={"operation": operation})
            raise

    @contextmanager
    def store_call(self, operation: str):
        """Time one store call and count it as an error if it raises StoreUnavailable."""
        t0 = time.perf_counter()
        try:
            yield
        except StoreUnavailable:
            self.store_errors.inc(tags={"operation": operation})
            raise
        finally:
            self.store_latency.observe((time.perf_counter() - t0) * 1000, tags={"operation": operation})
