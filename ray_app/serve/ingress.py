"""FastAPI ingress of the Serve app: validation, the state store, and the calls down the graph.

Every client error is a JSON `{"detail", "field"}` with a 4xx status (401 no or bad token, 403
another user's token, 422 validation, 404 unknown user, 413 body too large), never a 500; a
store that cannot answer is 503 (`field: "store"`, with Retry-After), a model stage that does not
answer within `call_timeout_s` is 504. An event is committed to the store before the response
that acknowledges it. Every route but /healthz needs a bearer token (`ray_app.serve.auth`). Store
calls run in threads, never on the replica's event loop.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations of the class
# methods that serve.ingress re-binds, and string annotations would not resolve there.
import asyncio
import json
import logging
from typing import Annotated
from collections.abc import Sequence

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_app.serve.auth import FIELD as AUTH_FIELD
from ray_app.serve.auth import AuthError, Principal, RateLimit, TokenCheck, secret_from_env
from ray_app.serve.schemas import (
    IDEMPOTENCY_KEY,
    MAX_K,
    MAX_USER_ID_CHARS,
    ErrorResponse,
    Text,
    EventIn,
    EventsRequest,
    EventsResponse,
    Health,
    InterestsResponse,
    ItemsResponse,
    RecommendRequest,
    RecommendResponse,
    UserEventsResponse,
    UsersResponse,
)
from ray_app.serve.metrics import AppMetrics
from ray_app.serve.served_model import Catalogue, training_user_events
from ray_app.store.base import Event, IdempotencyConflict, StoreUnavailable
from ray_app.store.opener import open_store

log = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 1,000 events are about 70 kB of JSON
ERRORS = {status: {"model": ErrorResponse} for status in (401, 403, 404, 413, 422, 429, 503, 504)}
STORE_FIELD = "store"
CALL_TIMEOUT_S = 10.0  # a model stage that takes longer is answered 504


class ApiError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None):
        super().__init__(detail)
        self.status, self.detail, self.field = status, detail, field


def _error(status: int, detail: str, field: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail, "field": field})


def _field_path(loc: Sequence) -> str | None:
    """('body', 'history', 3, 'item_id') -> 'history.3.item_id'; a whole-body error -> 'body'."""
    source = bool(loc) and loc[0] in ("body", "query", "path", "header")
    parts = [str(p) for p in (loc[1:] if source else loc)]
    if loc and loc[0] == "body" and (not parts or (len(parts) == 1 and parts[0].isdigit())):
        return "body"  # a JSON syntax error's location is a character offset, not a field
    return ".".join(parts) or None


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before anything parses it."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        # No (or a lying) Content-Length: read up to the limit, then replay what was read.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        resp = _error(413, f"request body larger than {self.max_bytes} bytes", "body")
        await resp(scope, receive, send)


app = FastAPI(
    title="Dynamic interest recommender",
    version="1",
    description="Recommendations from a user's decomposed, context-weighted interests.",
)
app.add_middleware(BodyLimit)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    field = _field_path(err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "json_invalid":
        msg = f"malformed JSON ({err.get('ctx', {}).get('error', msg)})"
    return _error(422, f"{field}: {msg}" if field else msg, field)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    # FastAPI's 400 for an unparseable body (e.g. bytes that are not UTF-8) is about the body.
    return _error(exc.status_code, detail, "body" if exc.status_code == 400 else None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.detail, exc.field)


def _unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable behind `exc`: itself, or the cause of a failed call down the graph."""
    for e in (exc, getattr(exc, "cause", None), exc.__cause__):
        if isinstance(e, StoreUnavailable):
            return e
    return None


@app.exception_handler(StoreUnavailable)
async def _store_error(request: Request, exc: StoreUnavailable) -> JSONResponse:
    log.warning("store unavailable on %s: %s", request.url.path, exc)
    resp = _error(503, f"the event store is unavailable, try again shortly ({exc})", STORE_FIELD)
    resp.headers["Retry-After"] = "1"
    return resp


@app.exception_handler(AuthError)
async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
    resp = _error(exc.status, exc.detail, AUTH_FIELD)
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    if exc.status == 429:
        resp.headers["Retry-After"] = str(exc.retry_after_s or 1)
    return resp


# The scheme is declared for the OpenAPI description (Swagger's "Authorize"); `caller` reads the
# header itself, so that a missing token and a malformed header get messages of their own.
_bearer = HTTPBearer(auto_error=False, description="a user or service token (python -m ray_app.serve.auth)")
_tokens = TokenCheck()  # each replica process remembers the tokens it checked (bounded, a minute each)


async def caller(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    # Read from the environment on each call (a dict lookup): Serve ships the app's functions to the
    # replica apart from this module's globals, so nothing set at start-up would be seen here.
    return _tokens(secret_from_env(), request.headers.get("authorization"))


Caller = Annotated[Principal, Depends(caller)]


UserId = Annotated[
    Text, Path(min_length=1, max_length=MAX_USER_ID_CHARS, description="user id (str of the source user id)")
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY,
        description="any unique string per batch of events (a UUID): a retry with the same key and events "
        "appends nothing and gets the first answer again, for 24 h",
    ),
]
QueryText = Annotated[Text, Query(min_length=1, max_length=500, description="free text")]


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        encoder: DeploymentHandle,
        decomposer: DeploymentHandle,
        combiner: DeploymentHandle,
        store_url: str,
        data_dir: str,
        load_users: bool = True,
        rate_per_minute: int = 600,
        service_rate_per_minute: int = 60_000,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ):
        secret_from_env()  # from the environment only; no secret, no start
        self.rate = RateLimit(rate_per_minute, service_rate_per_minute)
        self.call_timeout_s = call_timeout_s
        self.metrics = AppMetrics()
        self.encoder, self.decomposer, self.combiner = encoder, decomposer, combiner
        self.catalogue, data = Catalogue.load(data_dir)
        self.n_training_users = data.n_users
        self.store = open_store(store_url)
        if load_users:  # idempotent: users already in the store keep their (possibly longer) logs
            for users in training_user_events(data):
                self.store.bulk_load(users)

    def check_health(self) -> None:
        """Serve's health check: the store answers (StoreUnavailable marks the replica unhealthy)."""
        self.store.ping()

    # ---- helpers ---------------------------------------------------------------------------
    async def _store(self, operation: str, fn, *args):
        """A store call in a thread, timed and counted; its StoreUnavailable becomes the 503."""
        with self.metrics.store_call(operation):
            return await asyncio.to_thread(fn, *args)

    async def _call(self, response, stage: str):
        """Await a call down the graph for at most `call_timeout_s` (504 past it); a store fault
        behind it is the 503."""
        try:
            return await asyncio.wait_for(response, self.call_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, f"the {stage} did not answer within {self.call_timeout_s:g} s", None) from None
        except Exception as e:
            cause = _unavailable(e)
            if cause is not None:
                raise StoreUnavailable(str(cause)) from None
            raise

    def _allow(self, who: Principal, user_id: str | None = None, service_only: str | None = None) -> None:
        """The caller's rate (429), then whether its token may act for `user_id` or do
        `service_only` (403)."""
        self.rate.admit(who)
        if user_id is not None:
            who.require_user(user_id)
        if service_only is not None:
            who.require_service(service_only)

    def _check_items(self, events: Sequence[EventIn], field: str) -> None:
        bad = self.catalogue.unknown(e.item_id for e in events)
        if bad:
            j = bad[0]
            raise ApiError(
                422,
                f"{field}.{j}.item_id: unknown item id {events[j].item_id} ({len(bad)} unknown in all)",
                f"{field}.{j}.item_id",
            )

    async def _require_user(self, user_id: str, field: str = "user_id") -> int:
        n = await self._store("count_events", self.store.count_events, user_id)
        if n == 0:
            raise ApiError(404, f"{field}: unknown user {user_id!r}", field)
        return n

    def _describe(self, item_id: int) -> dict:
        idx = self.catalogue.index_of.get(int(item_id))
        if idx is None:
            return {"item_id": int(item_id), "title": "", "genres": []}
        return self.catalogue.describe(idx)

    # ---- endpoints -------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        info = await self._call(self.decomposer.info.remote(), "decomposer")
        return Health(
            status="ok",
            model_version=info["model_version"],
            n_items=self.catalogue.n_items,
            n_users=self.n_training_users,
            dimensions=info["dimensions"],
        )

    @app.post("/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(self, req: RecommendRequest, who: Caller) -> Response:
        self._allow(who, req.user_id)
        intent = self.encoder.encode.remote(req.context.intent) if req.context.intent else None
        if req.user_id is not None:  # an unknown user comes back with no events: the 404 below
            state = self.decomposer.user_state.remote((req.user_id, req.exclude_seen))
        else:
            history = req.history or []
            self._check_items(history, "history")
            state = self.decomposer.history_state.remote([(e.item_id, e.rating, e.timestamp) for e in history])
        # The responses are passed on unresolved: Serve hands their values to the Combiner.
        res = await self._call(
            self.combiner.rank.remote(state, intent, req.k, req.exclude_seen, req.explain, req.context.timestamp),
            "ranking",
        )
        if req.user_id is not None and res.n_events == 0:
            raise ApiError(404, f"user_id: unknown user {req.user_id!r}", "user_id")
        cat = self.catalogue
        explanation = None
        if res.explanation is not None:
            explanation = {dim: [cat.describe(i, s) for i, s in items] for dim, items in res.explanation.items()}
        body = RecommendResponse(
            user_id=req.user_id,
            model_version=res.model_version,
            n_events=res.n_events,
            items=[cat.describe(i, s) for i, s in res.items],
            gates=res.gates,
            explanation=explanation,
        )
        # Validated once, here, and serialized by pydantic: FastAPI would validate it again against
        # the response model before serializing it.
        return Response(body.model_dump_json(), media_type="application/json")

    @app.post("/users/{user_id}/events", response_model=EventsResponse, responses=ERRORS)
    async def add_events(
        self, body: EventsRequest, user_id: UserId, who: Caller, idempotency_key: IdempotencyKey = None
    ) -> EventsResponse:
        self._allow(who, user_id)
        self._check_items(body.events, "events")
        events = [Event(e.item_id, e.rating, e.timestamp) for e in body.events]
        replayed = False
        if idempotency_key is None:
            n = await self._store("append", self.store.append_events, user_id, events)  # durable from here on
        else:
            try:
                n, replayed = await self._store("append", self.store.append_once, user_id, idempotency_key, events)
            except IdempotencyConflict as e:
                raise ApiError(422, str(e), "Idempotency-Key") from None
        if not replayed:
            self.metrics.events_appended.inc(len(events))
            try:
                await self._call(self.decomposer.advance.remote(user_id), "decomposer")
            except Exception:  # the events are committed; the state is a cache the next request catches up
                log.exception("advancing the state of user %r failed", user_id)
        return EventsResponse(user_id=user_id, accepted=len(events), n_events=n, replayed=replayed)

    @app.get("/users", response_model=UsersResponse, responses=ERRORS)
    async def users(
        self,
        who: Caller,
        q: Annotated[Text, Query(max_length=MAX_USER_ID_CHARS, description="user id prefix")] = "",
        limit: int = Query(50, ge=1, le=1000),
    ) -> UsersResponse:
        self._allow(who, service_only="listing users")
        found = await self._store("users", self.store.users, q, limit)
        return UsersResponse(users=[{"user_id": u, "n_events": n} for u, n in found])

    @app.get("/users/{user_id}/events", response_model=UserEventsResponse, responses=ERRORS)
    async def user_events(
        self, user_id: UserId, who: Caller, limit: int = Query(20, ge=1, le=1000)
    ) -> UserEventsResponse:
        self._allow(who, user_id)
        n = await self._require_user(user_id)
        events = await self._store("events", self.store.events, user_id, max(n - limit, 0), limit)
        return UserEventsResponse(
            user_id=user_id,
            events=[{**self._describe(e.item_id), "rating": e.rating, "timestamp": e.timestamp} for e in events],
        )

    @app.get("/users/{user_id}/interests", response_model=InterestsResponse, responses=ERRORS)
    async def interests(self, user_id: UserId, who: Caller, last: int = Query(50, ge=1, le=1000)) -> InterestsResponse:
        self._allow(who, user_id)
        await self._require_user(user_id)
        res = await self._call(self.decomposer.interests.remote(user_id, last), "decomposer")
        steps = [{**step, "title": self._describe(step["item_id"])["title"]} for step in res["steps"]]
        return InterestsResponse(user_id=user_id, dimensions=res["dimensions"], steps=steps)

    @app.get("/items", response_model=ItemsResponse, responses=ERRORS)
    async def items(self, q: QueryText, who: Caller, k: int = Query(10, ge=1, le=MAX_K)) -> ItemsResponse:
        self._allow(who)
        if not q.strip():
            raise ApiError(422, "q: empty query", "q")
        found = await self._call(self.combiner.search.remote(self.encoder.encode.remote(q), k), "search")
        return ItemsResponse(items=[self.catalogue.describe(i, s) for i, s in found])
