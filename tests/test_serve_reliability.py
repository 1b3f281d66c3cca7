"""Serve reliability: a Decomposer replica killed under load, and a schemathesis pass over the API.

One app for the module on a 2-CPU Ray: the Decomposer runs two replicas so that one can die while
the other answers. Load comes from `benchmarks/load_client.py` in a separate process, as in the
load benchmark; acknowledged events are counted in the store afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import ray
import schemathesis
from schemathesis import GenerationMode
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from ray import serve

from models.nn import checkpoint
from models.data.batching import make_split
from models.training.loop import new_model
from conftest import local_serve, service_auth
from ray_app.serve.auth import TOKEN_ENV
from ray_app.serve.app import AppArgs, DeploymentSettings, build_app
from ray_app.store.opener import open_store

APP = "reliability"
LOAD_CLIENT = Path(__file__).resolve().parents[1] / "benchmarks" / "load_client.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s}s")


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-reliability")
    # Untrained weights are enough: what is under test is the serving path, not ranking quality.
    torch.manual_seed(0)
    model = new_model("decomposer", tiny_data, make_split(tiny_data.user_offsets, 1), lstm_units=16, dim_size=8)
    ckpt = checkpoint.save(tmp / "model.pt", model, {"item_source_ids": tiny_data.item_source_ids.tolist()})
    store_url = f"sqlite:///{tmp}/state.db"
    one = DeploymentSettings(num_cpus=0.2, min_replicas=1, max_replicas=1)
    two = DeploymentSettings(num_cpus=0.2, min_replicas=2, max_replicas=2)
    ingress = one.model_copy(update={"max_ongoing_requests": 100})
    args = AppArgs(
        checkpoint=str(ckpt),
        data_dir=str(tiny_data.path),
        store_url=store_url,
        load_users=True,  # once, while the app is built
        encoder=one,
        decomposer=two,
        combiner=one,
        ingress=ingress,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with local_serve(port):
        serve.run(build_app(args), name=APP, route_prefix="/")
        wait_healthy(url)
        yield SimpleNamespace(url=url, store_url=store_url, data=tiny_data, tmp=tmp)


def decomposer_replicas() -> set[str]:
    """Actor names of the live Decomposer replicas (Serve names them SERVE_REPLICA::APP#Deployment#id)."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in names if a["namespace"] == "serve" and f"::{APP}#Decomposer#" in a["name"]}


def running(deployment: str) -> int:
    dep = serve.status().applications[APP].deployments[deployment]
    return sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def start_load(served, name: str, duration: float, concurrency: int = 4) -> tuple[subprocess.Popen, Path]:
    data = served.data
    spec = {
        "users": [str(int(u)) for u in data.user_source_ids[1:]],
        "item_ids": [str(i) for i in data.item_source_ids[1:]],
        "intents": ["something light and funny"],
        "weights": {"recommend": 0.5, "recommend_intent": 0.0, "post_event": 0.5},
    }
    spec_path = served.tmp / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    out = served.tmp / f"{name}.json"
    token = service_auth()["Authorization"].removeprefix("Bearer ")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(LOAD_CLIENT),
            "--url",
            served.url,
            "--spec",
            str(spec_path),
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--details",
            "--timeout",
            "20",
            "--out",
            str(out),
        ],
        env={**os.environ, TOKEN_ENV: token},
    )
    return proc, out


def finish_load(proc: subprocess.Popen, out: Path) -> dict:
    assert proc.wait(timeout=120) == 0, "the load client failed"
    return json.loads(out.read_text())


def test_killing_a_decomposer_replica_under_load_loses_no_acknowledged_event(served):
    store = open_store(served.store_url)
    users = [str(int(u)) for u in served.data.user_source_ids[1:]]
    before = {u: store.count_events(u) for u in users}
    replicas = decomposer_replicas()
    assert len(replicas) == 2, replicas

    proc, out = start_load(served, "kill", duration=10)
    time.sleep(3)
    victim = sorted(replicas)[0]
    killed_at = time.time()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # Serve notices the dead actor and starts a replacement: two live replicas again, the victim not among them.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = decomposer_replicas()
        if victim not in now and len(now) == 2 and running("Decomposer") == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the killed Decomposer replica was not replaced within 60 s ({decomposer_replicas()})")
    replaced_at = time.time()
    during = finish_load(proc, out)

    # After the replacement, a fresh load is answered in full.
    proc, out = start_load(served, "after", duration=4)
    after = finish_load(proc, out)
    assert after["ok"] > 0 and after["errors"] == 0, after["error_samples"]
    # While the replica was down, the other one kept answering.
    t_kill = killed_at - during["started_at"]
    answered_after_kill = [r for r in during["records"] if r[1] > t_kill and r[3] == 200]
    assert answered_after_kill, f"no request was answered after the kill ({during['error_samples']})"

    # Every acknowledged event is in the store, and the counts add up.
    acked = during["acknowledged_events"] + after["acknowledged_events"]
    assert len(acked) > 10
    stored = {}
    for u in {a["user_id"] for a in acked}:
        stored[u] = {(e.item_id, e.rating, e.timestamp) for e in store.events(u)}
    missing = [a for a in acked if (a["item_id"], a["rating"], a["timestamp"]) not in stored[a["user_id"]]]
    assert not missing, f"{len(missing)} acknowledged events are not in the store, e.g. {missing[:3]}"
    for u in stored:
        mine = [a for a in acked if a["user_id"] == u]
        assert store.count_events(u) >= before.get(u, 0) + len(mine)
        assert len({a["n_events"] for a in mine}) == len(mine), f"user {u}: two acks report the same n_events"
    store.close()
    print(
        f"\nkill: replaced after {replaced_at - killed_at:.1f}s; during: {during['ok']} ok, {during['errors']} "
        f"errors {during['error_samples'][:2]}; after: {after['ok']} ok; {len(acked)} acknowledged events kept"
    )


# ---- schemathesis: generated requests from /openapi.json never get a 500 -------------------------
# One test walks every operation itself: schemathesis' pytest fixture loader (`from_fixture`) sets
# `node._nodeid`, which pytest 9 no longer has.

EXAMPLES = 10  # per operation and mode: valid requests and requests that break the schema


def test_generated_requests_never_get_a_server_error(served):
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/recommend", "/users/{user_id}/events", "/items", "/healthz"}
    failures, calls = [], []

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                phases=[Phase.generate],
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case):
                response = case.call(base_url=served.url, timeout=30, headers=service_auth())
                calls.append(response.status_code)
                where = f"{case.method} {case.formatted_path} query={case.query} body={str(case.body)[:200]}"
                if response.status_code >= 500:
                    failures.append(f"{where} -> {response.status_code}: {response.text[:200]}")
                elif response.status_code >= 400:
                    body = response.json()
                    if not (isinstance(body.get("detail"), str) and "field" in body):
                        failures.append(f"{where} -> {response.status_code} without the error shape: {body}")

            try:
                check()
            except Unsatisfiable:
                # An operation without parameters or body (GET /healthz) has nothing to break.
                assert mode == GenerationMode.NEGATIVE, f"{operation.label}: no valid request can be generated"
    assert not failures, "\n".join(failures[:10])
    assert len(calls) >= len(operations) * 2, calls  # something was really sent for every operation
    assert httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200  # and the service still serves
