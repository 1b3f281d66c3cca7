"""The per-process CPU accounting of the serving floor benchmark (benchmarks/replica_cpu.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from replica_cpu import per_request, process_name  # noqa: E402


def test_process_names():
    assert process_name("ray::ServeReplica:app:Combiner") == "app:Combiner"
    assert process_name("ray::ServeReplica:floor:FloorIngress.handle_request_with_rejection") == "floor:FloorIngress"
    assert process_name("ray::ProxyActor.receive_asgi_messages") == "ProxyActor"
    assert process_name("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --x") == "gcs_server"
    assert process_name("wrk -t2 -c8 http://127.0.0.1:8000") is None


def test_per_request_sums_a_name_and_counts_new_processes():
    before = {1: ("app:Ingress", 1.0), 2: ("app:Combiner", 2.0)}
    after = {1: ("app:Ingress", 1.5), 2: ("app:Combiner", 2.1), 3: ("app:Combiner", 0.1), 4: ("raylet", 0.00001)}
    got = per_request(before, after, requests=100)
    assert list(got) == ["app:Ingress", "app:Combiner"]  # largest first; the raylet's 0.0001 ms left out
    assert got["app:Ingress"] == pytest.approx(5.0) and got["app:Combiner"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="requests must be positive"):
        per_request(before, after, requests=0)
