"""The Serve app when its store fails: a stopped Redis is a 503 saying the store is unavailable
(its address only in the log), within seconds, not a hang or a 500, for as long as Redis stays
down; an inline history and the liveness check are still answered, the readiness check is a 503;
when Redis is back, so is the API, without a restart, with every acknowledged event. Also: the
application metrics reach Ray's Prometheus endpoint, and a client's X-Request-ID comes back on
the response.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from conftest import local_serve, service_auth
from ray_app.serve.app import AppArgs, build_app
from test_serve_reliability import free_port, wait_healthy
from serve_helpers import one_replica_each, untrained_checkpoint
from store_helpers import RedisServer, needs_redis

pytestmark = needs_redis
APP = "faults"


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-faults")
    redis = RedisServer(tmp)
    redis.start()
    # Serve's health checks every 2 s with a 4 s limit (10 s and 30 s by default), so that the
    # test below can wait past them in seconds.
    one = one_replica_each()["ingress"].model_copy(update={"health_check_period_s": 2, "health_check_timeout_s": 4})
    args = AppArgs(
        **one_replica_each(
            encoder=one,
            decomposer=one,
            combiner=one,
            ingress=one,
            checkpoint=str(untrained_checkpoint(tiny_data, tmp / "model.pt")),
            data_dir=str(tiny_data.path),
            store_url=redis.url,
            load_users=True,  # once, while the app is built
        )
    )
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    with local_serve(port, _metrics_export_port=metrics_port):
        serve.run(build_app(args), name=APP, route_prefix="/")
        wait_healthy(url)
        with httpx.Client(base_url=url, timeout=60, headers=service_auth()) as client:
            yield client, redis, metrics_port, tiny_data
        redis.stop()


def test_a_stopped_store_is_a_503_and_the_api_comes_back_with_it(served):
    client, redis, _, data = served
    user = str(int(data.user_source_ids[1]))
    item = int(data.item_source_ids[1])  # a whole number: still taken, as its decimal string
    ok = client.post(
        f"/users/{user}/events",
        json={"events": [{"item_id": item, "rating": 4, "timestamp": 1.7e9}]},
        headers={"Idempotency-Key": "before-the-fault"},
    )
    assert ok.status_code == 200, ok.text
    acked = ok.json()["n_events"]
    redis.stop()
    stored = [
        ("GET", f"/users/{user}/events", None),
        ("POST", f"/users/{user}/events", {"events": [{"item_id": item, "rating": 3, "timestamp": 1.7e9 + 60}]}),
        ("POST", "/recommend", {"user_id": user, "k": 3}),
        ("GET", "/users", None),
        ("GET", "/readyz", None),
    ]
    inline = {"history": [{"item_id": item, "rating": 5, "timestamp": 1.7e9}], "k": 3}
    request_ids = []
    try:
        # Twice, the second time past Serve's health-check period and timeout (2 s + 4 s here):
        # no replica is replaced while Redis is down, so every answer still comes within seconds.
        for round_ in range(2):
            for method, path, body in stored:
                t0 = time.monotonic()
                r = client.request(method, path, json=body, timeout=20)
                assert r.status_code == 503, (round_, path, r.status_code, r.text)
                assert r.json() == {"detail": "the event store is unavailable, try again shortly", "field": "store"}
                assert r.headers["retry-after"] == "1" and r.headers.get("x-request-id")
                request_ids.append(r.headers["x-request-id"])
                assert time.monotonic() - t0 < 15, f"{path} took {time.monotonic() - t0:.1f} s to give up"
            r = client.post("/recommend", json=inline, timeout=20)
            assert r.status_code == 200, r.text  # a request that needs no store is still served
            assert client.get("/healthz", timeout=20).status_code == 200  # liveness does not need the store
            if round_ == 0:
                time.sleep(10)
    finally:
        redis.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        back = client.get(f"/users/{user}/events", params={"limit": 1000})
        if back.status_code == 200:
            break
        time.sleep(1)
    assert back.status_code == 200, back.text
    assert len(back.json()["events"]) == acked  # nothing acknowledged was lost
    assert client.post("/recommend", json={"user_id": user, "k": 3}).status_code == 200
    assert client.get("/readyz").status_code == 200
    # What the caller was not told is in the Ingress's log, on a line with the request's id.
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    text = "".join(f.read_text() for f in logs.glob(f"replica_{APP}_Ingress_*.log"))
    line = next(line for line in text.splitlines() if request_ids[0] in line and "store unavailable" in line)
    assert redis.url.split("//")[1].split("/")[0] in line  # the store's address, for whoever runs it


def test_application_metrics_reach_prometheus(served):
    client, _, metrics_port, data = served
    user = str(int(data.user_source_ids[2]))
    r = client.post(
        f"/users/{user}/events",
        json={"events": [{"item_id": int(data.item_source_ids[2]), "rating": 4, "timestamp": 1.7e9 + 600}]},
    )
    assert r.status_code == 200, r.text
    wanted = ("dynamic_interest_events_appended_total", "dynamic_interest_store_latency_ms_bucket")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    seen = sorted(set(re.findall(r"^(dynamic_interest_\w+)", text, re.M)))
    for w in wanted:
        assert w in text, f"{w} not exported; metrics seen: {seen}"


def test_a_request_id_comes_back(served):
    client = served[0]
    r = client.get("/healthz", headers={"X-Request-ID": "trace-me-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-42"
    assert client.get("/healthz").headers.get("x-request-id")  # one is made when none is sent
