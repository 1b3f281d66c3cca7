"""What the Serve app's tests share: the checked-in config's path, and the requests they send:
bad inputs with the status and field each must get, and every route against every kind of caller."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import imdb_id, service_auth, user_auth
from ray_app.serve.auth import mint


def untrained_checkpoint(data, path: Path) -> Path:
    """A small decomposer as initialised (seed 0), with the dataset's vocabulary: serves at once."""
    import torch

    from models.data.batching import make_split
    from models.nn import checkpoint
    from models.training.loop import new_model

    torch.manual_seed(0)
    model = new_model("decomposer", data, make_split(data.user_offsets, 1), lstm_units=16, dim_size=8)
    return checkpoint.save(path, model, {"item_source_ids": data.item_source_ids.tolist()})


def one_replica_each(**args) -> dict:
    """AppArgs' fields for one small replica of every deployment, plus `args`."""
    from ray_app.serve.app import DeploymentSettings

    one = DeploymentSettings(num_cpus=0.2, min_replicas=1, max_replicas=1)
    return {"encoder": one, "decomposer": one, "combiner": one, "ingress": one, **args}


CONFIG = Path(__file__).resolve().parents[1] / "ray_app" / "serve" / "config.yaml"
EV = {"item_id": imdb_id("1"), "rating": 4.0, "timestamp": 1.6e9}  # tests/test_serve_http.py's dataset
JSON = {"content-type": "application/json"}
BAD = [  # (id, method, path, httpx arguments, status, field named in the error)
    ("malformed JSON", "POST", "/recommend", {"content": b'{"k": 3,', "headers": JSON}, 422, "body"),
    ("not an object", "POST", "/recommend", {"json": [1, 2]}, 422, "body"),
    ("k wrong type", "POST", "/recommend", {"json": {"k": "many"}}, 422, "k"),
    ("k zero", "POST", "/recommend", {"json": {"k": 0}}, 422, "k"),
    ("k negative", "POST", "/recommend", {"json": {"k": -5}}, 422, "k"),
    ("k huge", "POST", "/recommend", {"json": {"k": 10**9}}, 422, "k"),
    (
        "rating out of range",
        "POST",
        "/recommend",
        {"json": {"history": [{**EV, "rating": 9}]}},
        422,
        "history.0.rating",
    ),
    (
        "unknown item",
        "POST",
        "/recommend",
        {"json": {"history": [EV, {**EV, "item_id": 10**8}]}},
        422,
        "history.1.item_id",
    ),
    (
        "item id without its zeros",
        "POST",
        "/recommend",
        {"json": {"history": [{**EV, "item_id": EV["item_id"].lstrip("0")}]}},
        422,
        "history.0.item_id",
    ),
    ("empty item id", "POST", "/recommend", {"json": {"history": [{**EV, "item_id": ""}]}}, 422, "history.0.item_id"),
    (
        "item id too long",
        "POST",
        "/users/x/events",
        {"json": {"events": [{**EV, "item_id": "0" * 129}]}},
        422,
        "events.0.item_id",
    ),
    (
        "item id not a whole number",
        "POST",
        "/users/x/events",
        {"json": {"events": [{**EV, "item_id": 101.5}]}},
        422,
        "events.0.item_id",
    ),
    ("oversized history", "POST", "/recommend", {"json": {"history": [EV] * 1001}}, 422, "history"),
    ("user and history", "POST", "/recommend", {"json": {"user_id": "1", "history": [EV]}}, 422, "history"),
    ("unknown field", "POST", "/recommend", {"json": {"userid": "1"}}, 422, "userid"),
    ("intent wrong type", "POST", "/recommend", {"json": {"context": {"intent": 5}}}, 422, "context.intent"),
    ("unknown user", "POST", "/recommend", {"json": {"user_id": "no-such-user"}}, 404, "user_id"),
    ("non-UTF-8 body", "POST", "/recommend", {"content": b'{"user_id": "\xff\xfe"}', "headers": JSON}, 400, "body"),
    ("lone surrogate", "POST", "/recommend", {"content": b'{"user_id": "\\ud800"}', "headers": JSON}, 422, "user_id"),
    (
        "control characters in intent",
        "POST",
        "/recommend",
        {"json": {"context": {"intent": "fun\u0000ny"}}},
        422,
        "context.intent",
    ),
    ("undecodable user id in URL", "POST", "/users/%FF%FE/events", {"json": {"events": [EV]}}, 422, "user_id"),
    ("undecodable prefix in query", "GET", "/users?q=%FF", {}, 422, "q"),
    ("oversized body", "POST", "/recommend", {"content": b" " * (2 << 20), "headers": JSON}, 413, "body"),
    ("empty events", "POST", "/users/x/events", {"json": {"events": []}}, 422, "events"),
    ("too many events", "POST", "/users/x/events", {"json": {"events": [EV] * 1001}}, 422, "events"),
    (
        "event unknown item",
        "POST",
        "/users/x/events",
        {"json": {"events": [{**EV, "item_id": -3}]}},
        422,
        "events.0.item_id",
    ),
    (
        "event missing field",
        "POST",
        "/users/x/events",
        {"json": {"events": [{"item_id": EV["item_id"], "rating": 4}]}},
        422,
        "events.0.timestamp",
    ),
    (
        "timestamp far future",
        "POST",
        "/recommend",
        {"json": {"context": {"timestamp": 1e300}}},
        422,
        "context.timestamp",
    ),
    (
        "timestamp not a number",
        "POST",
        "/users/x/events",
        {"json": {"events": [{**EV, "timestamp": "noon"}]}},
        422,
        "events.0.timestamp",
    ),
    (
        "event in the future",
        "POST",
        "/users/x/events",
        {"json": {"events": [{**EV, "timestamp": time.time() + 3600}]}},
        422,
        "events.0.timestamp",
    ),
    (
        "inline event in the future",
        "POST",
        "/recommend",
        {"json": {"history": [{**EV, "timestamp": time.time() + 3600}]}},
        422,
        "history.0.timestamp",
    ),
    (
        "malformed idempotency key",
        "POST",
        "/users/x/events",
        {"json": {"events": [EV]}, "headers": {"Idempotency-Key": "two words"}},
        422,
        "Idempotency-Key",
    ),
    ("events of unknown user", "GET", "/users/no-such-user/events", {}, 404, "user_id"),
    ("interests of unknown user", "GET", "/users/no-such-user/interests", {}, 404, "user_id"),
    ("interests last zero", "GET", "/users/1/interests", {"params": {"last": 0}}, 422, "last"),
    ("users limit huge", "GET", "/users", {"params": {"limit": 10**6}}, 422, "limit"),
    ("empty query", "GET", "/items", {"params": {"q": ""}}, 422, "q"),
    ("blank query", "GET", "/items", {"params": {"q": "   "}}, 422, "q"),
    ("items k huge", "GET", "/items", {"params": {"q": "drama", "k": 1000}}, 422, "k"),
    ("added item without a title", "POST", "/items", {"json": {"item_id": "n1"}}, 422, "title"),
    ("added item with a blank title", "POST", "/items", {"json": {"item_id": "n1", "title": "  "}}, 422, "title"),
    ("added item title too long", "POST", "/items", {"json": {"item_id": "n1", "title": "x" * 301}}, 422, "title"),
    (
        "added item of an unknown genre",
        "POST",
        "/items",
        {"json": {"item_id": "n1", "title": "t", "genres": ["comedy", "western"]}},
        422,
        "genres.1",
    ),
    (
        "added item tags too many",
        "POST",
        "/items",
        {"json": {"item_id": "n1", "title": "t", "tags": ["a"] * 21}},
        422,
        "tags",
    ),
    (
        "added item tag too long",
        "POST",
        "/items",
        {"json": {"item_id": "n1", "title": "t", "tags": ["x" * 65]}},
        422,
        "tags.0",
    ),
    (
        "added item description too long",
        "POST",
        "/items",
        {"json": {"item_id": "n1", "title": "t", "description": "x" * 2001}},
        422,
        "description",
    ),
    (
        "added item unknown field",
        "POST",
        "/items",
        {"json": {"item_id": "n1", "title": "t", "year": 1999}},
        422,
        "year",
    ),
    ("added item id too long", "POST", "/items", {"json": {"item_id": "0" * 129, "title": "t"}}, 422, "item_id"),
    (
        "added item id of a trained item",
        "POST",
        "/items",
        {"json": {"item_id": EV["item_id"], "title": "t"}},
        409,
        "item_id",
    ),
    ("read an unknown item", "GET", "/items/no-such-item", {}, 404, "item_id"),
]


OWNER, OTHER = "1", "2"
ROUTES = [  # (id, method, path, httpx arguments, whose data it touches: OWNER, or None for nobody's)
    ("recommend for a user", "POST", "/recommend", {"json": {"user_id": OWNER, "k": 3}}, OWNER),
    ("recommend an inline history", "POST", "/recommend", {"json": {"history": [EV], "k": 3}}, None),
    ("append events", "POST", f"/users/{OWNER}/events", {"json": {"events": [EV]}}, OWNER),
    ("read events", "GET", f"/users/{OWNER}/events", {}, OWNER),
    ("read interests", "GET", f"/users/{OWNER}/interests", {"params": {"last": 3}}, OWNER),
    ("search items", "GET", "/items", {"params": {"q": "comedy", "k": 3}}, None),
    ("read an item", "GET", f"/items/{EV['item_id']}", {}, None),
    ("list users", "GET", "/users", {"params": {"limit": 3}}, "service"),
    ("mint a user token", "POST", "/tokens", {"json": {"user_id": OWNER, "ttl_s": 60}}, "service"),
]
CALLERS = {  # (id, headers) -> the status expected for (route owner kind)
    "no token": ({}, {OWNER: 401, None: 401, "service": 401}),
    "not a bearer header": ({"Authorization": "Basic dXNlcjpwYXNz"}, {OWNER: 401, None: 401, "service": 401}),
    "garbage token": ({"Authorization": "Bearer not-a-jwt"}, {OWNER: 401, None: 401, "service": 401}),
    "token of another secret": (
        {"Authorization": f"Bearer {mint('x' * 40, 'service')}"},
        {OWNER: 401, None: 401, "service": 401},
    ),
    "expired token": (
        {"Authorization": f"Bearer {mint(os.environ['DYNAMIC_INTEREST_AUTH_SECRET'], 'service', ttl_s=-1)}"},
        {OWNER: 401, None: 401, "service": 401},
    ),
    "another user's token": (user_auth(OTHER), {OWNER: 403, None: 200, "service": 403}),
    "the user's own token": (user_auth(OWNER), {OWNER: 200, None: 200, "service": 403}),
    "a service token": (service_auth(), {OWNER: 200, None: 200, "service": 200}),
}
