"""The demo's HTTP client against a live stand-in of the API (uvicorn on a free port), a closed
port, and servers that answer 4xx / 5xx / the wrong shape; plus the demo's pure view helpers."""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timezone

import gradio as gr
import pandas as pd
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from gradio_demo import views
from gradio_demo.__main__ import parse_args
from gradio_demo.accounts import Account, Accounts, hash_password
from gradio_demo.app import N_VIEW, Access, Handlers, guarded
from gradio_demo.client import ApiClient, ApiError, EndpointDown, NotFound
from ray_app.serve import schemas
from ray_app.serve.schemas import EventIn, UserEvent

# Ids as IMDb writes them: a leading zero that must survive every hop.
A, B, C = "0000001", "0000002", "0000003"
TITLES = {A: ("Alpha", ["Comedy"]), B: ("Beta", ["Drama"]), C: ("Gamma", ["Comedy", "Romance"])}
SERVICE_TOKEN = "the-demo-service-token"
ACCOUNTS = Accounts(
    {
        "ops": Account("ops", hash_password("admin-password"), None, admin=True),
        "ann": Account("ann", hash_password("ann-password"), "new-ann"),
    }
)


class Login:
    """What Gradio hands a handler: the logged-in account's name."""

    def __init__(self, username: str):
        self.username = username


def stand_in_api() -> FastAPI:
    """The contract's endpoints over an in-memory event log; answers go through the API's own response
    models, so the stand-in cannot drift from the contract the real endpoint follows."""
    app = FastAPI()
    log: dict[str, list[dict]] = {"u1": [{"item_id": A, "rating": 4.0, "timestamp": 1000.0}]}
    app.state.writers = []  # the Authorization header of each post of events

    def item(i: str, score: float = 0.0) -> dict:
        return {"item_id": i, "title": TITLES[i][0], "genres": TITLES[i][1], "score": score}

    def missing(user_id: str):
        return JSONResponse({"detail": f"unknown user_id '{user_id}'", "field": "user_id"}, status_code=404)

    @app.get("/healthz", response_model=schemas.Health)
    def healthz():
        return {
            "status": "ok",
            "model_version": "v-test",
            "n_items": 3,
            "n_users": len(log),
            "dimensions": ["topic", "time"],
        }

    @app.get("/users", response_model=schemas.UsersResponse)
    def users(q: str = "", limit: int = 50):
        return {
            "users": [{"user_id": u, "n_events": len(ev)} for u, ev in sorted(log.items()) if u.startswith(q)][:limit]
        }

    @app.get("/users/{user_id}/events", response_model=schemas.UserEventsResponse)
    def events(user_id: str, limit: int = 20):
        if user_id not in log:
            return missing(user_id)
        return {"user_id": user_id, "events": [{**item(e["item_id"]), **e} for e in log[user_id][-limit:]]}

    @app.post("/users/{user_id}/events", response_model=schemas.EventsResponse)
    async def post_events(user_id: str, request: Request):
        body = await request.json()
        if not body.get("events"):
            return JSONResponse({"detail": "events: at least 1 event is required", "field": "events"}, 422)
        log.setdefault(user_id, []).extend(body["events"])
        app.state.writers.append(request.headers.get("authorization"))
        return {"user_id": user_id, "accepted": len(body["events"]), "n_events": len(log[user_id])}

    @app.post("/tokens", response_model=schemas.TokenResponse)
    async def tokens(request: Request):
        body = await request.json()
        if request.headers.get("authorization") != f"Bearer {SERVICE_TOKEN}":
            return JSONResponse({"detail": "minting needs a service token", "field": "authorization"}, 403)
        return {"token": f"user-token-of-{body['user_id']}", "jti": "j", "expires_at": time.time() + body["ttl_s"]}

    @app.get("/users/{user_id}/interests", response_model=schemas.InterestsResponse)
    def interests(user_id: str, last: int = 50):
        if user_id not in log:
            return missing(user_id)
        steps = [
            {
                "index": i,
                "item_id": e["item_id"],
                "title": TITLES[e["item_id"]][0],
                "timestamp": e["timestamp"],
                "gates": {"topic": 0.7, "time": 0.3},
            }
            for i, e in enumerate(log[user_id])
        ][-last:]
        return {"user_id": user_id, "dimensions": ["topic", "time"], "steps": steps}

    @app.post("/recommend", response_model=schemas.RecommendResponse)
    async def recommend(request: Request):
        body = await request.json()
        user_id = body.get("user_id")
        if user_id is not None and user_id not in log:
            return missing(user_id)
        seen = {e["item_id"] for e in log.get(user_id, [])} if body.get("exclude_seen", True) else set()
        ranked = [item(i, 1.0 / int(i)) for i in TITLES if i not in seen][: body.get("k", 10)]
        intent = (body.get("context") or {}).get("intent")
        gates = {"topic": 0.9, "time": 0.1} if intent else {"topic": 0.5, "time": 0.5}
        return {
            "user_id": user_id,
            "model_version": "v-test",
            "n_events": len(log.get(user_id, [])),
            "items": ranked,
            "gates": gates,
            "explanation": {"topic": ranked[:1], "time": ranked[-1:]} if body.get("explain") else None,
        }

    @app.get("/items", response_model=schemas.ItemsResponse)
    def items(q: str = "", k: int = 10):
        if not q:
            return JSONResponse({"detail": "q: must not be empty", "field": "q"}, status_code=422)
        return {"items": [item(i, 0.5) for i in TITLES if q.lower() in TITLES[i][0].lower()][:k]}

    # Misbehaving routes, for the error paths.
    @app.get("/broken/healthz")
    def broken():
        raise RuntimeError("boom")

    @app.get("/plain/healthz")
    def plain():
        return PlainTextResponse("upstream connect error", status_code=503)

    @app.get("/wrong/healthz")
    def wrong():
        return {"status": "ok", "model_version": "v", "n_items": "many", "n_users": 1, "dimensions": []}

    @app.get("/slow/healthz")
    def slow():
        time.sleep(1.0)
        return {}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


base_url_app = stand_in_api()


@pytest.fixture(scope="module")
def base_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(base_url_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "stand-in API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def api(base_url):
    with ApiClient(base_url) as client:
        yield client


# ---- happy paths ----------------------------------------------------------------------------


def test_health_and_users(api):
    h = api.health()
    assert h.model_version == "v-test" and h.dimensions == ["topic", "time"]
    assert [u.user_id for u in api.users("u")] == ["u1"]
    assert api.users("zzz") == []


def test_post_then_read_back(api):
    got = api.post_events(
        "client-a", [EventIn(item_id=B, rating=4.5, timestamp=2000.0), EventIn(item_id=C, rating=3.0, timestamp=2100.0)]
    )
    assert (got.accepted, got.n_events) == (2, 2)
    history = api.user_events("client-a")
    assert [(e.item_id, e.title, e.rating) for e in history] == [(B, "Beta", 4.5), (C, "Gamma", 3.0)]
    steps = api.interests("client-a").steps
    assert [s.item_id for s in steps] == [B, C] and set(steps[0].gates) == {"topic", "time"}


def test_recommend_sends_the_contract_body(api):
    rec = api.recommend("u1", timestamp=5000.0, intent="  something funny ", k=5, explain=True)
    assert [it.item_id for it in rec.items] == [B, C]  # A was seen by u1
    assert rec.gates == {"topic": 0.9, "time": 0.1}  # the intent reached the server
    assert rec.explanation["topic"][0].title == "Beta"
    assert views.dimension_frame(rec).values.tolist()[0] == ["topic (90%)", "Beta", "", "", "", ""]
    blank = api.recommend(None, intent="   ")  # a blank intent is sent as null
    assert blank.gates == {"topic": 0.5, "time": 0.5} and blank.explanation is None


def test_user_ids_are_one_path_segment(api):
    api.post_events("odd id é", [EventIn(item_id=A, rating=5.0, timestamp=10.0)])
    assert api.user_events("odd id é")[0].item_id == A


def test_item_search(api):
    assert [it.title for it in api.search_items("amm")] == ["Gamma"]


# ---- errors: what a person would read -------------------------------------------------------


def test_unknown_user_is_not_found(api):
    with pytest.raises(NotFound, match="unknown user_id 'nobody'") as e:
        api.user_events("nobody")
    assert e.value.status == 404 and e.value.field == "user_id"


def test_rejected_input_names_the_field(api):
    with pytest.raises(ApiError, match=r"field `q`.*must not be empty") as e:
        api.search_items("")
    assert e.value.status == 422 and not isinstance(e.value, NotFound)


@pytest.mark.parametrize(
    "prefix, pattern, status",
    [
        ("broken", r"HTTP 500", 500),
        ("plain", r"HTTP 503.*upstream connect error", 503),
        ("wrong", r"Unexpected answer from GET /healthz: n_items", 200),
    ],
)
def test_server_failures_become_messages(base_url, prefix, pattern, status):
    with ApiClient(f"{base_url}/{prefix}") as client, pytest.raises(ApiError, match=pattern) as e:
        client.health()
    assert e.value.status == status
    assert "Traceback" not in e.value.message


def test_cli_rejects_a_bad_api_url(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--api", "localhost:8000"])
    assert e.value.code == 2 and "--api: 'localhost:8000' is not an http(s) URL" in capsys.readouterr().err
    assert parse_args(["--api", "https://recs.example:8443/"]).api == "https://recs.example:8443/"


def test_closed_port_is_endpoint_down():
    url = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there
    with ApiClient(url) as client, pytest.raises(EndpointDown, match="not reachable.*connection refused"):
        client.health()


def test_slow_endpoint_times_out(base_url):
    with ApiClient(f"{base_url}/slow", timeout=0.2) as client, pytest.raises(EndpointDown, match="in time"):
        client.health()


# ---- the page's handlers over the stand-in (no browser) -------------------------------------


def test_handlers_show_a_message_not_a_traceback_when_down():
    with ApiClient(f"http://127.0.0.1:{free_port()}") as client:
        h = Handlers(Access(client, ACCOUNTS))
        out = guarded(h.connect, 3)("", Login("ops"))
        assert out[0].startswith("⚠") and "not reachable" in out[0]
        out = guarded(h.refresh, N_VIEW)(None, "", 0, 0, 10, Login("ops"))  # nothing picked: a hint, no request
        assert out[0] == "⚠ Pick a user (or start a new one) first." and len(out) == N_VIEW


def test_an_account_acts_for_its_user_with_a_token_minted_for_it(base_url):
    with ApiClient(base_url, token=SERVICE_TOKEN) as service:
        h = Handlers(Access(service, ACCOUNTS))
        ann = Login("ann")
        status, users, _ = h.connect("", ann)
        assert users["choices"] == [("new-ann (your account's user)", "new-ann")] and users["value"] == "new-ann"
        out = guarded(h.refresh, N_VIEW)("u1", "", 4, 20, 10, ann)  # another user's: refused before any call
        assert out[0] == "⚠ Your account acts for user new-ann only."
        assert guarded(h.find_users, 2)("", ann)[0].startswith("⚠ Your account acts for user new-ann only")
        assert guarded(h.start_new_user, 2)("", ann)[0].startswith("⚠ Your account acts for user new-ann only")
        assert guarded(h.connect, 3)("", Login("mallory"))[0] == "⚠ Log in first."
        added = guarded(h.add_item, N_VIEW)("new-ann", "x1", "A film", [], "", "", "", 4, 20, 10, ann)
        assert added[0].startswith("⚠ Your account acts for user new-ann only; adding an item is for admin")
        fresh = h.refresh("new-ann", "", 4, 20, 10, ann)
        h.post_event("new-ann", B, 4.0, fresh[4], "", 4, 20, 10, ann)
        h.post_event("u1", C, 4.0, fresh[4], "", 4, 20, 10, Login("ops"))  # an admin acts for any user
        assert base_url_app.state.writers[-2:] == ["Bearer user-token-of-new-ann", "Bearer user-token-of-u1"]


def test_accounts_hold_hashes_and_check_passwords(tmp_path):
    from gradio_demo.accounts import AccountsError, add_account

    assert ACCOUNTS.check("ann", "ann-password") and not ACCOUNTS.check("ann", "ops-password")
    assert not ACCOUNTS.check("nobody", "ann-password") and not ACCOUNTS.check("ann", "")
    path = tmp_path / "accounts.yaml"
    add_account(path, "bob", "bob-password", "42", admin=False)
    add_account(path, "root", "root-password", None, admin=True)
    assert "bob-password" not in path.read_text() and path.stat().st_mode & 0o077 == 0
    loaded = Accounts.from_env(path)
    assert loaded.get("bob").user_id == "42" and loaded.get("root").admin and loaded.check("bob", "bob-password")
    with pytest.raises(AccountsError, match="never the password itself"):
        Accounts.parse("eve: {password: plain-text, user_id: '1'}", "inline")
    with pytest.raises(AccountsError, match="either `user_id` or `admin: true`"):
        Accounts.parse(f"eve: {{password: '{hash_password('x' * 8)}'}}", "inline")
    with pytest.raises(AccountsError, match="no demo accounts"):
        Accounts.from_env(None, environ={})


def test_the_demo_refuses_to_start_with_the_signing_key(monkeypatch, capsys, tmp_path):
    from gradio_demo.__main__ import main
    from ray_app.serve.auth import SECRET_ENV

    monkeypatch.setenv(SECRET_ENV, "k" * 40)
    assert main(["--accounts", str(tmp_path / "none.yaml")]) == 2
    assert "must not hold the API's signing keys" in capsys.readouterr().err
    monkeypatch.delenv(SECRET_ENV)
    assert main(["--accounts", str(tmp_path / "none.yaml")]) == 2  # and not without accounts
    assert "cannot be read" in capsys.readouterr().err


def test_new_user_watches_an_item(api):
    h = Handlers(Access(api.with_token(SERVICE_TOKEN), ACCOUNTS))  # the demo's service token
    ops = Login("ops")
    fresh = h.refresh("new-abc", "", 4, 20, 10, ops)  # no events yet: a cold-start request
    assert "no events yet" in fresh[1] and fresh[2].empty and list(fresh[6]["item_id"]) == [A, B, C]
    picked = h.pick_row(fresh[6], gr.SelectData(None, {"index": [0, 1], "value": "Alpha"}))  # a click on row 1
    assert picked == A  # the id as the API wrote it, its zeros kept
    out = h.post_event("new-abc", picked, 5.0, fresh[4], "", 4, 20, 10, ops)
    assert out[0].startswith(f"✓ Posted item {A}")
    assert list(out[6]["item_id"]) == [B, C]  # the watched item left the list
    assert list(out[2]["title"]) == ["Alpha"] and not out[9].empty
    assert out[3]["when"][0] == pd.Timestamp(views.next_moment(fresh[4], 4, 20), unit="s")


# ---- pure helpers ---------------------------------------------------------------------------


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    "after, weekday, hour, expected",
    [
        (utc(2024, 3, 6, 10), 4, 21, utc(2024, 3, 8, 21)),  # Wednesday -> that Friday evening
        (utc(2024, 3, 8, 22), 4, 21, utc(2024, 3, 15, 21)),  # slot already over -> next week
        (utc(2024, 3, 8, 21, 30), 4, 21, utc(2024, 3, 8, 21, 30)),  # inside the slot -> no time passes
        (utc(2024, 3, 10, 23), 0, 0, utc(2024, 3, 11, 0)),  # Sunday night -> Monday 00:00
    ],
)
def test_next_moment(after, weekday, hour, expected):
    got = views.next_moment(after, weekday, hour)
    assert got == expected and got >= after


def test_next_moment_rejects_bad_slots():
    with pytest.raises(ValueError, match="weekday"):
        views.next_moment(0.0, 7, 0)


def test_frames():
    history = [
        UserEvent(item_id=A, title="Alpha", genres=["Comedy"], rating=4.0, timestamp=utc(2024, 1, 1)),
        UserEvent(item_id=B, title="Beta", genres=[], rating=2.0, timestamp=utc(2024, 1, 2)),
    ]
    frame = views.history_frame(history)
    assert list(frame["title"]) == ["Beta", "Alpha"] and frame["when (UTC)"][1] == "Mon 2024-01-01 00:00"
    assert views.anchor(history) == utc(2024, 1, 2) and views.anchor([], now=5.0) == 5.0 - views.WEEK
    assert views.dimension_frame(None).shape == (0, 6)


def test_bad_requests_are_named_before_sending(api):
    with pytest.raises(ApiError, match=r"Invalid request: k: .*less than or equal to 100") as e:
        api.recommend(None, k=1000)
    assert e.value.field == "k" and e.value.status is None
    with pytest.raises(ApiError, match=r"Invalid request: user_id: .*at least 1"):
        api.recommend("")
