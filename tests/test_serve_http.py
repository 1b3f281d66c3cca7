"""Ray Serve app over real HTTP: the API, freshness, bad input, reconfigure, restart.

The app is deployed from `ray_app/serve/config.yaml` (paths swapped for a tiny model and
dataset) the way `serve deploy` does it, so the checked-in config is what is tested; the config's
own schema, which needs no Ray, is checked in tests/test_serve_config.py. The dataset names its
items as IMDb does ("0000101"): ids that only survive as strings, end to end.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from models.nn import checkpoint
from models.data.batching import make_split
from models.training.loop import TrainConfig, fit, new_model
from conftest import local_serve, service_auth, user_auth
from ray_app.serve.load_users import load_training_users
from ray_app.serve.pin import pin_config_text
from ray_app.serve.served_model import file_sha256, file_version
from ray_app.store.opener import open_store
from serve_helpers import BAD, CALLERS, CONFIG, EV, ROUTES
from store_helpers import RedisServer, needs_redis

APP = "recommender"


def train_checkpoint(data, path: Path, combine: str, seed: int) -> Path:
    """A small decomposer trained for one epoch: seconds, and enough to rank."""
    split = make_split(data.user_offsets, 1)
    torch.manual_seed(seed)
    m = new_model("decomposer", data, split, lstm_units=32, item_dim=32, dim_size=16, combine=combine)
    fit(m, data, split, TrainConfig(epochs=1, patience=1, seed=seed), progress=False)
    return checkpoint.save(path, m, {"item_source_ids": data.item_source_ids.tolist()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(port: int, ckpt: Path, data_dir: Path, store_url: str) -> ServeDeploySchema:
    """The checked-in config pinned to `ckpt` (its pin rewritten as `python -m ray_app.serve.pin` does)."""
    return ServeDeploySchema.model_validate(config_dict(port, ckpt, data_dir, store_url))


def config_dict(port: int, ckpt: Path, data_dir: Path, store_url: str) -> dict:
    """`config_for`'s config before validation."""
    cfg = yaml.safe_load(pin_config_text(CONFIG.read_text(), str(ckpt), file_sha256(ckpt)))
    cfg["http_options"].update(host="127.0.0.1", port=port)
    app = cfg["applications"][0]
    # Every request of the suite comes from 127.0.0.1: the failed-authentication limit per address
    # is raised here so that the probes of bad tokens get their 401s (tests/test_attacks.py checks it).
    app["args"].update(data_dir=str(data_dir), store_url=store_url, failed_auth_per_minute=100_000)
    for d in app["deployments"]:
        d["autoscaling_config"]["max_replicas"] = 1  # 2 cores shared by the whole test run
    return cfg


def deploy(config: ServeDeploySchema, timeout_s: float = 180) -> None:
    # What `serve deploy` asks the controller to do, without needing the dashboard's REST API.
    serve.context._get_global_client().deploy_apps(config)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(app.message)
        time.sleep(0.5)
    raise TimeoutError(f"{APP} not running after {timeout_s}s")


@pytest.fixture(scope="module")
def env(imdb_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt_a = train_checkpoint(imdb_data, root / "a" / "model.pt", "mixture", seed=0)
    ckpt_b = train_checkpoint(imdb_data, root / "b" / "model.pt", "concat", seed=1)
    port = free_port()
    store_url = f"sqlite:///{root / 'state.db'}"
    env = {
        "data": imdb_data,
        "ckpt_a": ckpt_a,
        "ckpt_b": ckpt_b,
        "port": port,
        "store": root / "state.db",
        "store_url": store_url,
        "config": lambda ckpt: config_for(port, ckpt, imdb_data.path, store_url),
    }
    load_training_users(imdb_data.path, store_url)  # the one-off step before serving
    with local_serve(port):
        deploy(env["config"](ckpt_a))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=service_auth()) as client:
            env["client"] = client
            yield env


@pytest.fixture()
def client(env) -> httpx.Client:
    return env["client"]


def events_of(client, user_id: str, limit: int = 1000) -> list[dict]:
    r = client.get(f"/users/{user_id}/events", params={"limit": limit})
    assert r.status_code == 200, r.text
    return r.json()["events"]


def as_events(rows: list[dict]) -> list[dict]:
    return [{"item_id": e["item_id"], "rating": e["rating"], "timestamp": e["timestamp"]} for e in rows]


# ---- the API ------------------------------------------------------------------------------


def test_healthz(client, env):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model_version"] == file_version(env["ckpt_a"])
    assert h["n_items"] == env["data"].n_items and h["n_users"] == env["data"].n_users
    assert h["dimensions"] == ["topic", "sentiment", "time", "latent_1"]
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/recommend", "/users/{user_id}/events", "/items"}


def test_recommend_known_user_excludes_seen_and_explains(client, env):
    users = client.get("/users", params={"limit": 3}).json()["users"]
    assert len(users) == 3 and users == sorted(users, key=lambda u: u["user_id"])
    uid = users[0]["user_id"]
    seen = {e["item_id"] for e in events_of(client, uid)}
    r = client.post(
        "/recommend",
        json={"user_id": uid, "k": 7, "explain": True, "context": {"timestamp": 1.7e9, "intent": "something funny"}},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == uid and body["n_events"] == users[0]["n_events"]
    ids = [it["item_id"] for it in body["items"]]
    assert len(ids) == 7 and not seen & set(ids) and len(set(ids)) == 7
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert set(body["gates"]) == {"topic", "sentiment", "time", "latent_1"}
    assert abs(sum(body["gates"].values()) - 1) < 1e-4
    assert set(body["explanation"]) == set(body["gates"])
    assert all(len(v) == 7 and v[0]["title"] for v in body["explanation"].values())
    assert not seen & {it["item_id"] for v in body["explanation"].values() for it in v}
    again = client.post(
        "/recommend", json={"user_id": uid, "k": 7, "exclude_seen": False, "context": {"timestamp": 1.7e9}}
    ).json()
    assert again["explanation"] is None


def test_inline_history_and_new_user(client, env):
    data = env["data"]
    uid = client.get("/users", params={"limit": 1}).json()["users"][0]["user_id"]
    history = as_events(events_of(client, uid))
    ctx = {"timestamp": history[-1]["timestamp"] + 3600}
    by_id = client.post("/recommend", json={"user_id": uid, "k": 10, "context": ctx}).json()
    inline = client.post("/recommend", json={"history": history[::-1], "k": 10, "context": ctx}).json()
    # The stored, incrementally advanced state and a rebuild from the (unsorted) history agree.
    assert [i["item_id"] for i in inline["items"]] == [i["item_id"] for i in by_id["items"]]
    np.testing.assert_allclose([i["score"] for i in inline["items"]], [i["score"] for i in by_id["items"]], rtol=1e-4)
    fresh = client.post("/recommend", json={"k": 5, "context": ctx}).json()
    empty = client.post("/recommend", json={"history": [], "k": 5, "context": ctx}).json()
    assert fresh["n_events"] == 0 and fresh["user_id"] is None and len(fresh["items"]) == 5
    assert fresh["items"] == empty["items"]
    assert {i["item_id"] for i in fresh["items"]} <= set(data.item_source_ids[1:].tolist())
    assert all(i["item_id"].startswith("0") for i in fresh["items"])  # as the catalogue writes them


def test_items_text_search(client, env):
    r = client.get("/items", params={"q": "comedy", "k": 5})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 5 and "comedy" in items[0]["genres"]
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)


def test_user_events_and_interests(client):
    user = client.get("/users", params={"limit": 1}).json()["users"][0]
    uid, n = user["user_id"], user["n_events"]
    last3 = events_of(client, uid, limit=3)
    assert len(last3) == 3 and last3 == events_of(client, uid)[-3:]
    assert [e["timestamp"] for e in last3] == sorted(e["timestamp"] for e in last3)
    steps = client.get(f"/users/{uid}/interests", params={"last": 5}).json()
    assert steps["dimensions"] == ["topic", "sentiment", "time", "latent_1"]
    assert [s["index"] for s in steps["steps"]] == list(range(n - 5, n))
    assert [s["item_id"] for s in steps["steps"][-3:]] == [e["item_id"] for e in last3]
    for s in steps["steps"]:
        assert abs(sum(s["gates"].values()) - 1) < 1e-4 and s["title"]


def test_an_acknowledged_event_shows_in_the_next_recommendation(client, env):
    uid = "fresh-user"
    first = client.post("/recommend", json={"k": 3, "context": {"timestamp": 1.6e9}}).json()["items"][0]["item_id"]
    r = client.post(f"/users/{uid}/events", json={"events": [{"item_id": first, "rating": 5, "timestamp": 1.6e9}]})
    assert r.json() == {"user_id": uid, "accepted": 1, "n_events": 1, "replayed": False}
    # The very next request sees the event: it is excluded, and the scores are those of the
    # full history recomputed from scratch.
    ctx = {"timestamp": 1.6e9 + 600}
    rec = client.post("/recommend", json={"user_id": uid, "k": 10, "context": ctx}).json()
    assert rec["n_events"] == 1 and first not in [i["item_id"] for i in rec["items"]]
    more = [{"item_id": env["data"].item_source_ids[j], "rating": 3.5, "timestamp": 1.6e9 + j} for j in (4, 9)]
    assert client.post(f"/users/{uid}/events", json={"events": more}).json()["n_events"] == 3
    rec = client.post("/recommend", json={"user_id": uid, "k": 10, "exclude_seen": False, "context": ctx}).json()
    full = client.post(
        "/recommend",
        json={"history": as_events(events_of(client, uid)), "k": 10, "exclude_seen": False, "context": ctx},
    ).json()
    assert rec["n_events"] == 3
    assert [i["item_id"] for i in rec["items"]] == [i["item_id"] for i in full["items"]]
    np.testing.assert_allclose([i["score"] for i in rec["items"]], [i["score"] for i in full["items"]], rtol=1e-4)


def test_an_event_without_a_rating_is_an_implicit_one(client, env):
    """A view or a click has no rating: accepted, and scored as the documented IMPLICIT_RATING."""
    from ray_app.serve.schemas import IMPLICIT_RATING

    items = [env["data"].item_source_ids[j] for j in (2, 5, 7)]
    implicit = [{"item_id": i, "timestamp": 1.6e9 + 60 * j} for j, i in enumerate(items)]
    rated = [{**e, "rating": IMPLICIT_RATING} for e in implicit]
    other = [{**e, "rating": 1.0} for e in implicit]
    ctx = {"timestamp": 1.6e9 + 3600}

    def scores(history):
        r = client.post("/recommend", json={"history": history, "k": 10, "exclude_seen": False, "context": ctx})
        assert r.status_code == 200, r.text
        return [(i["item_id"], round(i["score"], 4)) for i in r.json()["items"]]

    assert scores(implicit) == scores(rated) != scores(other)
    r = client.post("/users/implicit-user/events", json={"events": implicit})
    assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
    assert [e["rating"] for e in events_of(client, "implicit-user")] == [IMPLICIT_RATING] * 3


@pytest.mark.parametrize("method,path,kwargs,status,field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(client, method, path, kwargs, status, field):
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and isinstance(body["detail"], str) and body["detail"]
    if field != "body":
        assert field.split(".")[0] in body["detail"]
    assert client.get("/healthz").status_code == 200  # and the service keeps serving


def test_a_retried_post_with_its_idempotency_key_appends_once(client):
    """The client's first answer is lost (say, a timeout after the commit); it retries with the same
    key: the events are in the store once, and the retry gets the first answer."""
    uid, key = "retrying-user", "3f1c9e2a-retry"
    body = {"events": [{**EV, "timestamp": 1.6e9 + i} for i in range(3)]}
    first = client.post(f"/users/{uid}/events", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 200 and first.json()["replayed"] is False, first.text
    for _ in range(2):
        again = client.post(f"/users/{uid}/events", json=body, headers={"Idempotency-Key": key})
        assert again.status_code == 200 and again.json() == {**first.json(), "replayed": True}
    assert len(events_of(client, uid)) == 3
    other = client.post(f"/users/{uid}/events", json={"events": [EV]}, headers={"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    assert client.post(f"/users/{uid}/events", json={"events": [EV]}).json()["n_events"] == 4  # no key: appends


# ---- items added while serving -------------------------------------------------------------


def prepared_items(data) -> dict[str, dict]:
    """The prepared catalogue's rows by source id: title, genres, tags and the text's embedding."""
    columns = ["source_id", "title", "genres", "tags", "embedding"]
    return {row["source_id"]: row for row in pq.read_table(data.path / "items.parquet", columns=columns).to_pylist()}


def twin(row: dict, item_id: str) -> dict:
    """A POST /items body with the text of a prepared item under a new id."""
    return {"item_id": item_id, "title": row["title"], "genres": row["genres"], "tags": row["tags"]}


def test_an_added_item_is_placed_by_its_text_and_ranked_for_the_user_it_suits(client, env):
    """Two items added with the texts of a user's best and worst trained items (preparation's text
    recipe, so the same vector): both are ranked on the next request, the one that suits the user
    in its top 10, above the other."""
    uid = str(env["data"].user_source_ids[1])
    ranked = client.post("/recommend", json={"user_id": uid, "k": 100}).json()["items"]
    rows = prepared_items(env["data"])
    best, worst = rows[ranked[0]["item_id"]], rows[ranked[-1]["item_id"]]
    for item_id, row in (("added-best", best), ("added-worst", worst)):
        r = client.post("/items", json=twin(row, item_id))
        assert r.status_code == 201, r.text
    assert client.get("/items/added-best").json() == {**twin(best, "added-best"), "description": "", "added": True}
    store = open_store(env["store_url"])
    stored = np.frombuffer(store.get_item("added-best").text_emb, np.float32)
    store.close()
    np.testing.assert_allclose(stored, best["embedding"], atol=1e-4)  # the prepared text's own vector
    top = [i["item_id"] for i in client.post("/recommend", json={"user_id": uid, "k": 100}).json()["items"]]
    assert top.index("added-best") < 10 and top.index("added-best") < top.index("added-worst")
    assert client.get("/healthz").json()["n_items"] == env["data"].n_items + 2


def test_an_event_on_an_added_item_advances_the_state_through_its_text(client, env):
    uid, src = "added-item-fan", env["data"].item_source_ids
    first = [{"item_id": src[i], "rating": 4.0, "timestamp": 1.6e9 + i} for i in (1, 2)]
    ctx = {"timestamp": 1.7e9}
    assert client.post(f"/users/{uid}/events", json={"events": first}).status_code == 200
    before = client.post("/recommend", json={"user_id": uid, "k": 5, "context": ctx}).json()
    event = {"item_id": "added-best", "rating": 5.0, "timestamp": 1.6e9 + 10}
    r = client.post(f"/users/{uid}/events", json={"events": [event]})
    assert r.status_code == 200 and r.json()["n_events"] == 3, r.text
    after = client.post("/recommend", json={"user_id": uid, "k": 5, "context": ctx}).json()
    assert after["n_events"] == 3 and after["items"] != before["items"]
    assert "added-best" not in {i["item_id"] for i in after["items"]}  # seen, so excluded
    # The stored state, advanced by the event, is the state a rebuild from the events gives.
    inline = client.post("/recommend", json={"history": [*first, event], "k": 5, "context": ctx}).json()
    np.testing.assert_allclose([i["score"] for i in inline["items"]], [i["score"] for i in after["items"]], rtol=1e-4)
    assert events_of(client, uid)[-1]["title"] == client.get("/items/added-best").json()["title"]


def test_an_added_id_is_a_409_and_only_a_service_token_adds(client, env):
    taken = client.post("/items", json={"item_id": "added-best", "title": "Another"})
    assert taken.status_code == 409 and taken.json()["field"] == "item_id", taken.text
    assert client.get("/items/added-best").json()["title"] != "Another"  # not overwritten
    body = {"item_id": "by-a-user", "title": "A user's item"}
    with httpx.Client(base_url=f"http://127.0.0.1:{env['port']}", timeout=60) as anonymous:
        assert anonymous.post("/items", json=body, headers=user_auth("1")).status_code == 403
        assert anonymous.post("/items", json=body).status_code == 401
        assert anonymous.get("/items/by-a-user", headers=user_auth("1")).status_code == 404
    trained = client.get(f"/items/{EV['item_id']}").json()
    assert trained["added"] is False and trained["title"] and trained["item_id"] == EV["item_id"]


@needs_redis
def test_on_a_redis_store_every_replica_ranks_an_added_item_on_the_next_request(env, tmp_path_factory):
    """A second app beside the first, on Redis, with two Decomposer and two Combiner replicas and
    the HNSW index: an item added through it is ranked by every request from the next one on. The
    user has seen every trained item, so a request ranks the added items and a few others."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    name, prefix = "items-redis", "/redis"
    main = env["config"](env["ckpt_a"])
    both = config_dict(env["port"], env["ckpt_a"], env["data"].path, env["store_url"])
    second = config_dict(env["port"], env["ckpt_b"], env["data"].path, server.url)["applications"][
        0
    ]  # concat: HNSW serves it
    second.update(name=name, route_prefix=prefix)
    second["args"]["index"] = {"kind": "hnsw"}
    for d in second["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.1
        if d["name"] in ("Decomposer", "Combiner"):
            d["autoscaling_config"].update(min_replicas=2, initial_replicas=2, max_replicas=2)
    both["applications"].append(second)
    both = ServeDeploySchema.model_validate(both)
    try:
        deploy(both)
        deadline = time.time() + 180
        while serve.status().applications.get(name) is None or serve.status().applications[name].status != "RUNNING":
            assert time.time() < deadline, serve.status().applications.get(name)
            time.sleep(0.5)
        running = serve.status().applications[name].deployments
        assert all(running[d].replica_states.get("RUNNING") == 2 for d in ("Decomposer", "Combiner"))
        base = f"http://127.0.0.1:{env['port']}{prefix}"
        with httpx.Client(base_url=base, timeout=60, headers=service_auth()) as c:
            src = env["data"].item_source_ids[1:].tolist()
            events = [{"item_id": i, "rating": 4.0, "timestamp": 1.6e9 + j} for j, i in enumerate(src)]
            assert c.post("/users/seen-it-all/events", json={"events": events}).status_code == 200
            req = {"user_id": "seen-it-all", "k": 10}
            assert c.post("/recommend", json=req).json()["items"] == []  # nothing unseen
            r = c.post("/items", json={"item_id": "redis-new", "title": "A new film", "genres": ["comedy"]})
            assert r.status_code == 201, r.text
            for _ in range(30):  # the two replicas of each stage share these requests
                got = c.post("/recommend", json=req).json()
                assert [i["item_id"] for i in got["items"]] == ["redis-new"], got
            assert c.get("/items/redis-new").json()["title"] == "A new film"
            assert c.post("/items", json={"item_id": "redis-new", "title": "Again"}).status_code == 409
    finally:
        deploy(main)  # the first app alone again: the second is deleted
        server.stop()


# ---- access control: every route but /healthz --------------------------------------------


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("method,path,kwargs,owner", [r[1:] for r in ROUTES], ids=[r[0] for r in ROUTES])
def test_every_route_but_healthz_needs_the_right_token(env, caller, method, path, kwargs, owner):
    headers, expected = CALLERS[caller]
    with httpx.Client(base_url=f"http://127.0.0.1:{env['port']}", timeout=60) as anonymous:
        r = anonymous.request(method, path, headers=headers, **kwargs)
        assert r.status_code == expected[owner], r.text
        if r.status_code in (401, 403):
            body = r.json()
            assert body["field"] == "authorization" and body["detail"], body
            assert r.status_code == 403 or r.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/healthz").status_code == 200  # no token needed, ever


def test_a_token_past_its_rate_gets_429_and_others_do_not(env, client):
    """The checked-in config allows a user token 600 requests a minute (per Ingress replica; one here).

    The rate is counted before anything else, so 600 cheap requests (another user's events: 403)
    fill it well within the minute even on a busy machine. The limiter's sliding window weighs
    the previous minute's count by the part of it still in the window: when the requests straddle
    a minute boundary, it admits a few past the 600th before the 429 (never one before)."""
    mine = user_auth("rate-limited-user")
    with httpx.Client(base_url=f"http://127.0.0.1:{env['port']}", timeout=60, headers=mine) as c:
        t0 = time.monotonic()
        codes = [c.get("/users/someone-else/events").status_code for _ in range(600)]
        assert time.monotonic() - t0 < 55, "too slow to test a per-minute rate"
        assert codes == [403] * 600
        more = []
        while len(more) < 600 and (not more or more[-1] != 429):
            more.append(c.get("/users/someone-else/events").status_code)
        assert more[-1] == 429 and set(more[:-1]) <= {403}, {code: more.count(code) for code in set(more)}
        r = c.get("/items", params={"q": "x", "k": 1})
        assert r.status_code == 429 and r.json()["field"] == "authorization" and int(r.headers["retry-after"]) >= 1
    assert client.get("/items", params={"q": "x", "k": 1}).status_code == 200  # another token is not slowed


def test_a_user_writing_past_its_budget_gets_429_and_other_users_still_write(env, client):
    """The checked-in config lets one user write 5,000 events an hour, whatever token writes them."""
    items = env["data"].item_source_ids[1:].tolist()
    batch = {"events": [{"item_id": items[j % len(items)], "rating": 3, "timestamp": 1.6e9 + j} for j in range(1000)]}
    with httpx.Client(base_url=f"http://127.0.0.1:{env['port']}", timeout=60, headers=user_auth("busy-writer")) as c:
        for j in range(5):
            assert c.post("/users/busy-writer/events", json=batch).json()["n_events"] == 1000 * (j + 1)
        r = c.post("/users/busy-writer/events", json={"events": batch["events"][:1]})
        assert r.status_code == 429 and r.json()["field"] == "events" and int(r.headers["retry-after"]) >= 1, r.text
    assert client.post("/users/busy-writer/events", json={"events": [EV]}).status_code == 429  # any token
    assert client.post("/users/calm-writer/events", json={"events": [EV]}).json()["n_events"] == 1
    assert client.get("/users", params={"q": "busy-writer"}).json()["users"][0]["n_events"] == 5000


def test_a_service_token_erases_a_user_and_a_user_token_may_not(env, client):
    uid = "to-be-erased"
    client.post(f"/users/{uid}/events", json={"events": [EV, EV]}, headers={"Idempotency-Key": "erase-me-1"})
    assert client.post("/recommend", json={"user_id": uid, "k": 3}).status_code == 200  # a state is cached
    with httpx.Client(base_url=f"http://127.0.0.1:{env['port']}", timeout=60) as anonymous:
        r = anonymous.delete(f"/users/{uid}", headers=user_auth(uid))
        assert r.status_code == 403 and r.json()["field"] == "authorization"
    assert client.delete(f"/users/{uid}").json() == {"user_id": uid, "erased_events": 2}
    assert client.get(f"/users/{uid}/events").status_code == 404
    assert client.post("/recommend", json={"user_id": uid, "k": 3}).status_code == 404
    again = client.post(f"/users/{uid}/events", json={"events": [EV, EV]}, headers={"Idempotency-Key": "erase-me-1"})
    assert again.json()["replayed"] is False  # its idempotency records went with it
    assert client.delete(f"/users/{uid}").json()["erased_events"] == 2
    assert client.delete(f"/users/{uid}").json()["erased_events"] == 0


def test_readiness_and_liveness(client):
    assert client.get("/readyz").json() == {"status": "ready", "store": "ok"}
    assert "security" not in client.get("/openapi.json").json()["paths"]["/readyz"]["get"]


def test_item_ids_are_served_as_the_catalogue_writes_them(client, env):
    """An id with leading zeros is posted, stored, read back and recommended as written; the same
    digits sent as a number name another id (unknown here), and the 422 names the field."""
    first = env["data"].item_source_ids[1]
    assert first == "0000101"
    r = client.post("/users/zero-user/events", json={"events": [{**EV, "item_id": first}]})
    assert r.status_code == 200, r.text
    assert [e["item_id"] for e in events_of(client, "zero-user")] == [first]
    steps = client.get("/users/zero-user/interests").json()["steps"]
    assert [s["item_id"] for s in steps] == [first]
    r = client.post("/recommend", json={"history": [{**EV, "item_id": int(first)}], "k": 3})
    assert r.status_code == 422 and r.json()["field"] == "history.0.item_id" and "'101'" in r.json()["detail"]
    found = client.get("/items", params={"q": "comedy", "k": 3}).json()["items"]
    assert all(isinstance(i["item_id"], str) and i["item_id"].startswith("0") for i in found)
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"type": "integer"} in schema["EventIn"]["properties"]["item_id"]["anyOf"]  # a number is accepted


def test_a_store_of_another_dataset_is_not_ready(client, env):
    """/readyz compares the dataset the store records with the app's: another one is a 503 naming both."""
    import sqlite3

    from ray_app.store.base import DatasetRecord

    with sqlite3.connect(env["store"]) as conn:
        (held,) = conn.execute("SELECT value FROM meta WHERE key = 'dataset'").fetchone()
        assert DatasetRecord.from_json(held).name == "synthetic-imdb"
        conn.execute("UPDATE meta SET value = ? WHERE key = 'dataset'", (DatasetRecord("other", "a", "b").to_json(),))
    try:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["field"] == "store", r.text
        assert "'other'" in r.json()["detail"] and "'synthetic-imdb'" in r.json()["detail"]
    finally:
        with sqlite3.connect(env["store"]) as conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'dataset'", (held,))
    assert client.get("/readyz").status_code == 200


def test_the_api_description_declares_the_bearer_scheme(client):
    spec = client.get("/openapi.json").json()
    assert any(v.get("scheme") == "bearer" for v in spec["components"]["securitySchemes"].values())
    assert "security" not in spec["paths"]["/healthz"]["get"] and spec["paths"]["/items"]["get"]["security"]


# ---- model swap and restart -------------------------------------------------------------


def test_a_new_pin_swaps_the_model_and_the_previous_config_rolls_it_back_without_failed_requests(client, env):
    """The config pinned to checkpoint B is deployed while a client keeps asking, then the config
    pinned to A again (a rollback): every request is answered, and each config's model serves."""
    version_a, version_b = file_version(env["ckpt_a"]), file_version(env["ckpt_b"])
    uid = client.get("/users", params={"limit": 1}).json()["users"][0]["user_id"]
    failures, versions, stop = [], [], threading.Event()

    def hammer():
        with httpx.Client(base_url=f"http://127.0.0.1:{env['port']}", timeout=60, headers=service_auth()) as c:
            while not stop.is_set():
                r = c.post("/recommend", json={"user_id": uid, "k": 5})
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                else:
                    versions.append(r.json()["model_version"])

    def serves(version: str) -> None:
        deadline = time.time() + 120
        while client.get("/healthz").json()["model_version"] != version and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.5)
        # Only the pin changes, the model deployments' user_config: their replicas swap it in place.
        deploy(env["config"](env["ckpt_b"]))
        serves(version_b)
        deploy(env["config"](env["ckpt_a"]))  # the previous config: a rollback
        serves(version_a)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert version_b in versions and versions[-1] == version_a
    rec = client.post("/recommend", json={"user_id": uid, "k": 5}).json()
    assert rec["model_version"] == version_a and len(rec["items"]) == 5
    deploy(env["config"](env["ckpt_b"]))  # what the test below restarts
    serves(version_b)


def test_restart_loses_no_acknowledged_event(client, env):
    uid = "restart-user"
    items = env["data"].item_source_ids[1:6].tolist()
    for j, item in enumerate(items):
        event = {"item_id": item, "rating": 4, "timestamp": 1.6e9 + j}
        r = client.post(f"/users/{uid}/events", json={"events": [event]})
        assert r.status_code == 200
    counts = {u["user_id"]: u["n_events"] for u in client.get("/users", params={"limit": 1000}).json()["users"]}
    config = env["config"](env["ckpt_b"])
    serve.delete(APP)
    deploy(copy.deepcopy(config))
    assert [e["item_id"] for e in events_of(client, uid)] == items
    after = {u["user_id"]: u["n_events"] for u in client.get("/users", params={"limit": 1000}).json()["users"]}
    assert after == counts  # no replica loads users: the store is as it was
    rec = client.post("/recommend", json={"user_id": uid, "k": 3}).json()
    assert rec["n_events"] == len(items)


def test_added_items_outlive_the_swap_and_the_restart(client, env):
    """After the swap to checkpoint B and a restart (the tests above), the items added under A are
    still there and ranked, placed by B."""
    assert client.get("/items/added-best").json()["added"] is True
    uid = str(env["data"].user_source_ids[1])
    rec = client.post("/recommend", json={"user_id": uid, "k": 100}).json()
    assert rec["model_version"] == file_version(env["ckpt_b"])
    assert {"added-best", "added-worst"} <= {i["item_id"] for i in rec["items"]}
