"""Authorised probes of an attacker against the local app (loopback only): the Serve app on a real
Redis store, and the demo process in front of it. Each probe gets its expected status, and not one
acknowledged event is lost: every event a 200 acknowledged is in the store, in order, at the end.

The probes: no token, an expired token, a revoked token, a token naming an unknown key (and one
naming ours with a forged signature), another user's token, the demo without a login, a user
filling the store (the cap, then the write budget), a client guessing tokens (its address is
refused), oversized bodies, and Redis stopped under the running app.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
from ray import serve

from conftest import local_serve, service_auth, user_auth
from ray_app.serve.app import AppArgs, build_app
from ray_app.serve.auth import SECRET_ENV, TOKEN_ENV, key_id, main as auth_main, mint, new_secret
from serve_helpers import one_replica_each, untrained_checkpoint
from store_helpers import RedisServer, needs_redis
from test_serve_reliability import free_port, wait_healthy

pytestmark = needs_redis
ROOT = Path(__file__).resolve().parents[1]
CAP, BUDGET, FAILED_AUTH = 60, 150, 20  # events a user may hold, write an hour; bad tokens an address a minute
ACKED: dict[str, list[dict]] = {}  # every event a 200 acknowledged, per user, in order


def post_events(client: httpx.Client, user: str, events: list[dict], **kw) -> httpx.Response:
    r = client.post(f"/users/{user}/events", json={"events": events}, **kw)
    if r.status_code == 200 and not r.json()["replayed"]:
        ACKED.setdefault(user, []).extend(events)
    return r


def events(item: str, n: int, t0: float = 1.7e9) -> list[dict]:
    return [{"item_id": item, "rating": 4.0, "timestamp": t0 + j} for j in range(n)]


@pytest.fixture(scope="module")
def target(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    redis = RedisServer(tmp)
    redis.start()
    args = AppArgs(
        **one_replica_each(
            checkpoint=str(untrained_checkpoint(tiny_data, tmp / "model.pt")),
            data_dir=str(tiny_data.path),
            store_url=redis.url,
            load_users=True,
            max_events_per_user=CAP,
            events_per_hour=BUDGET,
            failed_auth_per_minute=FAILED_AUTH,
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with local_serve(port):
        serve.run(build_app(args), name="attacked", route_prefix="/")
        wait_healthy(url, 180)
        yield {"url": url, "redis": redis, "data": tiny_data, "item": tiny_data.item_source_ids[1]}
    redis.stop()


@pytest.fixture(scope="module")
def api(target):
    with httpx.Client(base_url=target["url"], timeout=60) as client:
        yield client


def from_address(target, address: str) -> httpx.Client:
    """A client whose requests come from `address` (loopback): the failed authentications of one
    probe count against its own address, not the others'."""
    return httpx.Client(base_url=target["url"], timeout=60, transport=httpx.HTTPTransport(local_address=address))


@pytest.fixture(scope="module")
def demo(target, tmp_path_factory):
    from gradio_demo.accounts import add_account

    root = tmp_path_factory.mktemp("attacks-demo")
    accounts, log = root / "accounts.yaml", root / "demo.log"
    add_account(accounts, "ops", "ops-password-1", None, admin=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    env.update(GRADIO_ANALYTICS_ENABLED="False", **{TOKEN_ENV: service_auth()["Authorization"][7:]})
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gradio_demo",
                "--api",
                target["url"],
                "--port",
                str(port),
                "--accounts",
                str(accounts),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)


STORED = [  # routes that touch user "victim"'s data, and one that needs a service token
    ("GET", "/users/victim/events", None),
    ("POST", "/users/victim/events", {"events": events(1, 1)}),
    ("GET", "/users/victim/interests", None),
    ("POST", "/recommend", {"user_id": "victim", "k": 3}),
    ("DELETE", "/users/victim", None),
    ("GET", "/users", None),
    ("POST", "/tokens", {"user_id": "victim"}),
]


def probe(api: httpx.Client, headers: dict, status: int, why: str) -> None:
    for method, path, body in STORED:
        r = api.request(method, path, json=body, headers=headers)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        assert r.json()["field"] == "authorization" and why in r.json()["detail"], r.text


def test_victim_has_events(api, target):
    r = post_events(api, "victim", events(target["item"], 5), headers=service_auth())
    assert r.status_code == 200, r.text


def test_no_token(target):
    with from_address(target, "127.0.0.3") as api:
        probe(api, {}, 401, "missing bearer token")
        probe(api, {"Authorization": "Basic dmljdGltOnB3"}, 401, "must be `Bearer <token>`")


def test_an_expired_token(target):
    with from_address(target, "127.0.0.4") as api:
        probe(api, {"Authorization": f"Bearer {mint(os.environ[SECRET_ENV], 'service', ttl_s=-1)}"}, 401, "expired")


def test_a_token_of_an_unknown_key_or_with_a_forged_signature(target):
    with from_address(target, "127.0.0.5") as api:
        probe(api, {"Authorization": f"Bearer {mint(new_secret(), 'service')}"}, 401, "is not one of the API's keys")
    with from_address(target, "127.0.0.7") as api:
        forged_tokens(api)


def forged_tokens(api: httpx.Client) -> None:
    now = int(time.time())
    claims = {"iss": "dynamic-interest", "role": "service", "iat": now, "exp": now + 60, "jti": "forged"}
    ours = {"kid": key_id(os.environ[SECRET_ENV])}
    forged = jwt.encode(claims, new_secret(), "HS256", headers=ours)
    probe(api, {"Authorization": f"Bearer {forged}"}, 401, "Signature verification failed")
    unsigned = jwt.encode(claims, None, "none", headers=ours)
    probe(api, {"Authorization": f"Bearer {unsigned}"}, 401, "invalid token")


def test_a_revoked_token(target):
    token = mint(os.environ[SECRET_ENV], "service", ttl_s=600)
    headers = {"Authorization": f"Bearer {token}"}
    with from_address(target, "127.0.0.6") as api:
        assert api.get("/users", headers=headers).status_code == 200  # remembered by the replica from here on
        assert auth_main(["revoke", token, "--store-url", target["redis"].url]) == 0
        deadline = time.monotonic() + 20
        while api.get("/users", headers=headers).status_code == 200:
            assert time.monotonic() < deadline, "a revoked token was still accepted 20 s later"
            time.sleep(0.5)
        probe(api, headers, 401, "revoked")


def test_another_users_token(api, target):
    mallory = user_auth("mallory")
    for method, path, body in STORED:
        r = api.request(method, path, json=body, headers=mallory)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
    assert api.post("/recommend", json={"user_id": "victim"}, headers=mallory).json()["field"] == "authorization"
    # Its own user and an inline history, it may.
    assert post_events(api, "mallory", events(target["item"], 2), headers=mallory).status_code == 200
    assert (
        api.post("/recommend", json={"history": events(target["item"], 2), "k": 3}, headers=mallory).status_code == 200
    )


def test_the_demo_without_a_login(demo):
    assert httpx.get(f"{demo}/config", timeout=10).status_code == 401
    assert httpx.get(f"{demo}/gradio_api/info", timeout=10).status_code == 401
    r = httpx.post(f"{demo}/gradio_api/run/predict", json={"data": [""]}, timeout=10)
    assert r.status_code in (401, 404) and "victim" not in r.text
    bad = httpx.post(f"{demo}/login", data={"username": "ops", "password": "guess"}, timeout=10)
    assert bad.status_code == 400
    good = httpx.post(f"{demo}/login", data={"username": "ops", "password": "ops-password-1"}, timeout=10)
    assert good.status_code == 200 and good.cookies  # the same door opens with the account's password


def test_a_user_filling_the_store_is_stopped_and_others_still_write(api, target):
    hog, item = user_auth("hog"), target["item"]
    assert post_events(api, "hog", events(item, 25), headers=hog).json()["n_events"] == 25
    assert post_events(api, "hog", events(item, 25), headers=hog).json()["n_events"] == 50
    over = post_events(api, "hog", events(item, 25), headers=hog)  # 75 > the cap of 60: refused whole
    assert over.status_code == 409 and over.json()["field"] == "events" and "cap is 60" in over.json()["detail"]
    assert post_events(api, "hog", events(item, 10), headers=hog).json()["n_events"] == 60  # up to the cap
    assert post_events(api, "hog", events(item, 1), headers=hog).status_code == 409
    # The budget: 25 + 25 + 25 (refused by the cap, still counted) + 10 + 1 = 86 of 150 an hour.
    bystander = user_auth("bystander")
    assert post_events(api, "bystander", events(item, 3), headers=bystander).status_code == 200
    spender = user_auth("spender")
    for _ in range(3):
        assert post_events(api, "spender", events(item, 50), headers=spender).status_code in (200, 409)
    budget = post_events(api, "spender", events(item, 1), headers=spender)
    assert budget.status_code == 429 and budget.json()["field"] == "events" and int(budget.headers["retry-after"]) >= 1
    assert post_events(api, "bystander", events(item, 3), headers=bystander).json()["n_events"] == 6
    assert api.get("/users/hog/events", params={"limit": 1000}, headers=hog).json()["events"].__len__() == 60


def test_oversized_bodies(api, target):
    auth = user_auth("big")
    huge = b'{"events": [' + b" " * (2 << 20) + b"]}"
    r = api.post("/users/big/events", content=huge, headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(40):
            yield b" " * 65536

    r = api.post("/recommend", content=chunks(), headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413
    r = api.post("/users/big/events", json={"events": events(target["item"], 1001)}, headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "events"
    r = api.get("/users/" + "x" * 200 + "/events", headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "user_id"
    r = api.post("/recommend", json={"context": {"intent": "y" * 10_000}}, headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "context.intent"
    assert api.get("/users/big/events", headers=service_auth()).status_code == 404  # nothing was written


def test_a_client_guessing_tokens_is_refused_by_address(target):
    """Bad tokens from one address (127.0.0.2 here) past the limit: its requests are refused before
    their token is checked, a good token's too; another address (127.0.0.1) is not."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=target["url"], timeout=60, transport=transport) as guesser:
        codes = [
            guesser.get("/users", headers={"Authorization": f"Bearer guess-{j}"}).status_code
            for j in range(FAILED_AUTH + 5)
        ]
        assert codes[:FAILED_AUTH] == [401] * FAILED_AUTH and set(codes[FAILED_AUTH:]) == {429}, codes
        r = guesser.get("/users", headers=service_auth())
        assert r.status_code == 429 and r.json()["field"] == "authorization" and int(r.headers["retry-after"]) >= 1
    with httpx.Client(base_url=target["url"], timeout=60) as other:
        assert other.get("/users", headers=service_auth()).status_code == 200


def test_redis_down_then_back_loses_no_acknowledged_event(api, target):
    redis, item = target["redis"], target["item"]
    admin = service_auth()
    redis.stop()
    try:
        for method, path, body in STORED[:4]:
            r = api.request(method, path, json=body, headers=admin, timeout=20)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.json() == {"detail": "the event store is unavailable, try again shortly", "field": "store"}
        assert api.get("/readyz", timeout=20).status_code == 503
        assert api.get("/healthz", timeout=20).status_code == 200
        inline = api.post("/recommend", json={"history": events(item, 3), "k": 3}, headers=admin, timeout=20)
        assert inline.status_code == 200, inline.text
    finally:
        redis.start()
    deadline = time.monotonic() + 60
    while api.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the API did not come back with Redis"
        time.sleep(1)
    assert post_events(api, "victim", events(item, 2, 1.75e9), headers=admin).status_code == 200
    # Zero acknowledged events lost: every user's log is exactly what was acknowledged, in order.
    for user, acked in ACKED.items():
        stored = api.get(f"/users/{user}/events", params={"limit": 1000}, headers=admin).json()["events"]
        tail = stored[-len(acked) :]
        assert [(e["item_id"], e["rating"], e["timestamp"]) for e in tail] == [
            (e["item_id"], e["rating"], e["timestamp"]) for e in acked
        ], user
