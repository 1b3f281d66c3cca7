"""FastAPI ingress of the Serve app: validation, the state store, and the calls down the graph.

Every client error is a JSON `{"detail", "field"}` with a 4xx status (401 no or bad token, 403
another user's token, 422 validation, 404 unknown user or item, 409 a user's event cap reached, an
item id taken or the added items' cap reached, 413 body
too large, 429 a limit, `ray_app.serve.quotas`), never a 500; a store that cannot answer is 503
(`field: "store"`, with Retry-After, the details only in the log), a model stage that does not
answer within `call_timeout_s` is 504. An event is committed to the store before the response
that acknowledges it. Every route but /healthz and /readyz needs a bearer token
(`ray_app.serve.auth`). Store calls run in threads, never on the replica's event loop.

Liveness does not depend on the store: no replica is restarted, and none fails to start, while
the store is down; /readyz and the requests that need the store say it is.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations of the class
# methods that serve.ingress re-binds, and string annotations would not resolve there.
import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated
from collections.abc import Sequence

import numpy as np
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_app.serve.auth import FIELD as AUTH_FIELD
from ray_app.serve.auth import AuthError, Keys, Principal, TokenCheck, decode, mint
from ray_app.serve.quotas import QuotaExceeded, Quotas, QuotaSettings
from ray_app.serve.schemas import (
    IDEMPOTENCY_KEY,
    MAX_ITEM_ID_CHARS,
    MAX_K,
    MAX_USER_ID_CHARS,
    ErasedResponse,
    ErrorResponse,
    Ready,
    Text,
    TokenRequest,
    TokenResponse,
    EventIn,
    EventsRequest,
    EventsResponse,
    Health,
    InterestsResponse,
    ItemIn,
    ItemOut,
    ItemsResponse,
    RecommendRequest,
    RecommendResponse,
    UserEventsResponse,
    UsersResponse,
)
from ray_app.serve.item_catalogue import Catalogue, added_item_text, catalogue_added, dataset_record, extend_catalogue
from ray_app.serve.metrics import AppMetrics
from ray_app.store.base import (
    AddedItem,
    Event,
    EventCapReached,
    IdempotencyConflict,
    ItemCapReached,
    ItemExists,
    StoreUnavailable,
)
from ray_app.store.opener import open_store

log = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 1,000 events are about 70 kB of JSON
ERRORS = {status: {"model": ErrorResponse} for status in (401, 403, 404, 409, 413, 422, 429, 503, 504)}
STORE_FIELD = "store"
CALL_TIMEOUT_S = 10.0  # a model stage that takes longer is answered 504
REVOCATION_REFRESH_S = 5.0  # how often a replica reads the revocation list from the store


class ApiError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None, retry_after_s: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.field, self.retry_after_s = status, detail, field, retry_after_s


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
    resp = _error(exc.status, exc.detail, exc.field)
    if exc.retry_after_s is not None:
        resp.headers["Retry-After"] = str(exc.retry_after_s)
    return resp


def _unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable behind `exc`: itself, or the cause of a failed call down the graph."""
    for e in (exc, getattr(exc, "cause", None), exc.__cause__):
        if isinstance(e, StoreUnavailable):
            return e
    return None


STORE_DOWN = "the event store is unavailable, try again shortly"


@app.exception_handler(StoreUnavailable)
async def _store_error(request: Request, exc: StoreUnavailable) -> JSONResponse:
    # The details (which store, its address, the driver's error) go to the replica's log, whose
    # lines Serve tags with the request id that the response's X-Request-ID carries; the caller
    # learns only what failed.
    log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc)
    resp = _error(503, STORE_DOWN, STORE_FIELD)
    resp.headers["Retry-After"] = "1"
    return resp


@app.exception_handler(QuotaExceeded)
async def _quota_error(request: Request, exc: QuotaExceeded) -> JSONResponse:
    resp = _error(429, exc.detail, exc.field)
    resp.headers["Retry-After"] = str(exc.retry_after_s)
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
# header itself, so that a missing token and a malformed header get messages of their own. The
# token is checked by the Ingress (`_allow`), which holds the keys and the revocation list.
_bearer = HTTPBearer(auto_error=False, description="a user or service token (python -m ray_app.serve.auth)")


@dataclass(frozen=True)
class Credentials:
    """What a request presents: its Authorization header and the client's address."""

    authorization: str | None
    address: str | None


async def caller(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Credentials:
    return Credentials(request.headers.get("authorization"), request.client.host if request.client else None)


Caller = Annotated[Credentials, Depends(caller)]


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
ItemIdPath = Annotated[
    Text, Path(min_length=1, max_length=MAX_ITEM_ID_CHARS, description="the item's source id, as a string")
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
        quotas: QuotaSettings = QuotaSettings(),
        max_events_per_user: int = 20_000,
        call_timeout_s: float = CALL_TIMEOUT_S,
        max_added_items: int = 10_000,
    ):
        self.keys = Keys.from_env()  # from the environment only; no signing key, no start
        self.tokens = TokenCheck()  # the tokens this replica checked (bounded, a minute each)
        self.quotas = Quotas(quotas, store_url)  # shared by the replicas on a Redis store
        self.max_events_per_user = max_events_per_user
        self.max_added_items = max_added_items
        self._reading_items = threading.Lock()  # one read of the added items at a time: their order is the indices'
        self.call_timeout_s = call_timeout_s
        self.metrics = AppMetrics()
        self.encoder, self.decomposer, self.combiner = encoder, decomposer, combiner
        self.catalogue, data = Catalogue.load(data_dir)
        self.n_training_users = data.n_users
        self.dataset = dataset_record(data)  # what /readyz expects the store to record
        self.store = open_store(store_url)
        self.revoked: set[str] = set()
        self._revoked_read_at = time.monotonic()
        self._reading_revoked: asyncio.Future | None = None
        try:
            self.revoked = self.store.revoked_tokens()
        except StoreUnavailable as e:  # a replica starts while the store is down; the list is read later
            log.warning("reading the revoked tokens failed, trying again in %g s: %s", REVOCATION_REFRESH_S, e)

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
        except BackPressureError:  # a stage's queue at this replica is full: shed, as the proxy does
            raise ApiError(503, f"the {stage} is at capacity, try again shortly", None, retry_after_s=1) from None
        except Exception as e:
            cause = _unavailable(e)
            if cause is not None:
                raise StoreUnavailable(str(cause)) from None
            raise

    async def _allow(self, cred: Credentials, user_id: str | None = None, service_only: str | None = None) -> Principal:
        """The caller's address (429 past its failed authentications), its token (401: none, bad,
        expired or revoked), its rate (429), then whether it may act for `user_id` or do
        `service_only` (403) -> who calls."""
        self._read_revoked()
        await self.quotas.check_address(cred.address)
        try:
            who = self.tokens(self.keys, cred.authorization, self.revoked)
        except AuthError:
            await self.quotas.failed(cred.address)
            raise
        await self.quotas.admit(who)
        if user_id is not None:
            who.require_user(user_id)
        if service_only is not None:
            who.require_service(service_only)
        return who

    def _read_revoked(self) -> None:
        """Start a read of the revocation list when the last is `REVOCATION_REFRESH_S` old: in the
        background, so that no request waits for the store (a revocation takes effect within
        seconds); while the store cannot answer, the last list read stays in force."""
        if self._reading_revoked is None and time.monotonic() - self._revoked_read_at >= REVOCATION_REFRESH_S:
            self._reading_revoked = asyncio.ensure_future(self._load_revoked())

    async def _load_revoked(self) -> None:
        try:
            self.revoked = await asyncio.to_thread(self.store.revoked_tokens)
        except StoreUnavailable as e:
            log.warning("reading the revoked tokens failed, the last list read stays in force: %s", e)
        finally:
            self._revoked_read_at = time.monotonic()
            self._reading_revoked = None

    def _read_added(self) -> None:
        """In a thread: the items added since this replica's last read, appended to its catalogue."""
        with self._reading_items:
            extend_catalogue(self.catalogue, self.store.items_since(catalogue_added(self.catalogue)))

    async def _knows(self, ids: Sequence[str] = (), indices: Sequence[int] = ()) -> None:
        """Catch up with the added items when a request names an item id, or an answer an index,
        that this replica does not know yet (nothing is read otherwise). A store that cannot
        answer leaves the ids unknown (a 422 naming them) rather than failing the request."""
        cat = self.catalogue
        if any(i not in cat.index_of for i in ids) or any(i > cat.n_items for i in indices):
            try:
                await self._store("items_since", self._read_added)
            except StoreUnavailable as e:
                log.warning("reading the added items failed: %s", e)

    async def _check_items(self, events: Sequence[EventIn], field: str) -> None:
        await self._knows(ids=[e.item_id for e in events])
        bad = self.catalogue.unknown(e.item_id for e in events)
        if bad:
            j = bad[0]
            raise ApiError(
                422,
                f"{field}.{j}.item_id: unknown item id {events[j].item_id!r} ({len(bad)} unknown in all)",
                f"{field}.{j}.item_id",
            )

    async def _require_user(self, user_id: str, field: str = "user_id") -> int:
        n = await self._store("count_events", self.store.count_events, user_id)
        if n == 0:
            raise ApiError(404, f"{field}: unknown user {user_id!r}", field)
        return n

    def _describe(self, item_id: str) -> dict:
        idx = self.catalogue.index_of.get(item_id)
        if idx is None:
            return {"item_id": item_id, "title": "", "genres": []}
        return self.catalogue.describe(idx)

    # ---- endpoints -------------------------------------------------------------------------
    @app.get("/readyz", response_model=Ready, responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> Ready:
        """Whether every route can answer: the model stages and the store, which must hold this app's
        dataset (503 naming what does not). No token needed."""
        await self._call(self.decomposer.info.remote(), "decomposer")
        held = await self._store("dataset", self.store.dataset)
        if held is not None and held != self.dataset:  # its users' histories are another catalogue's
            raise ApiError(
                503,
                f"the event store was loaded for dataset {held.name!r}, not this app's {self.dataset.name!r}",
                STORE_FIELD,
            )
        return Ready(status="ready", store="ok")

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Liveness: the model stages answer (the store is not asked). No token needed."""
        info = await self._call(self.decomposer.info.remote(), "decomposer")
        return Health(
            status="ok",
            model_version=info["model_version"],
            n_items=self.catalogue.n_items,
            n_users=self.n_training_users,
            dimensions=info["dimensions"],
            genres=self.catalogue.genre_names,
        )

    @app.post("/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(self, req: RecommendRequest, who: Caller) -> Response:
        await self._allow(who, req.user_id)
        intent = self.encoder.encode.remote(req.context.intent) if req.context.intent else None
        if req.user_id is not None:  # an unknown user comes back with no events: the 404 below
            state = self.decomposer.user_state.remote((req.user_id, req.exclude_seen))
        else:
            history = req.history or []
            await self._check_items(history, "history")
            state = self.decomposer.history_state.remote([(e.item_id, e.rating, e.timestamp) for e in history])
        # The responses are passed on unresolved: Serve hands their values to the Combiner.
        res = await self._call(
            self.combiner.rank.remote(state, intent, req.k, req.exclude_seen, req.explain, req.context.timestamp),
            "ranking",
        )
        if req.user_id is not None and res.n_events == 0:
            raise ApiError(404, f"user_id: unknown user {req.user_id!r}", "user_id")
        shown = [i for i, _ in res.items] + [i for rows in (res.explanation or {}).values() for i, _ in rows]
        await self._knows(indices=shown)  # an item added since this replica last read them
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
        await self._allow(who, user_id)
        await self._check_items(body.events, "events")
        await self.quotas.admit_events(user_id, len(body.events))  # 429 past the user's events an hour
        events = [Event(e.item_id, e.rating, e.timestamp) for e in body.events]
        replayed, cap = False, self.max_events_per_user
        try:
            if idempotency_key is None:
                n = await self._store("append", self.store.append_events, user_id, events, cap)  # durable from here
            else:
                n, replayed = await self._store("append", self.store.append_once, user_id, idempotency_key, events, cap)
        except IdempotencyConflict as e:
            raise ApiError(422, str(e), "Idempotency-Key") from None
        except EventCapReached as e:
            raise ApiError(409, f"events: {e}", "events") from None
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
        await self._allow(who, service_only="listing users")
        found = await self._store("users", self.store.users, q, limit)
        return UsersResponse(users=[{"user_id": u, "n_events": n} for u, n in found])

    @app.delete("/users/{user_id}", response_model=ErasedResponse, responses=ERRORS)
    async def erase_user(self, user_id: UserId, who: Caller) -> ErasedResponse:
        """Erase a user: events, seen set, cached state and idempotency records (service tokens only)."""
        actor = await self._allow(who, service_only="erasing a user")
        n = await self._store("erase", self.store.erase_user, user_id)
        log.info("user %r erased (%d events) by a service token (jti %s)", user_id, n, actor.jti)
        return ErasedResponse(user_id=user_id, erased_events=n)

    @app.post("/tokens", response_model=TokenResponse, responses=ERRORS)
    async def tokens(self, body: TokenRequest, who: Caller) -> TokenResponse:
        """A short-lived token for one user, minted with the API's key for a service token's holder
        (the demo: its service credential stays on its server, each person's calls carry this)."""
        actor = await self._allow(who, service_only="minting a user token")
        token = mint(self.keys, "user", body.user_id, ttl_s=body.ttl_s)
        minted = decode(self.keys, f"Bearer {token}")
        log.info("a token for user %r (jti %s) minted by a service token (jti %s)", body.user_id, minted.jti, actor.jti)
        return TokenResponse(token=token, jti=minted.jti, expires_at=minted.expires_at)

    @app.get("/users/{user_id}/events", response_model=UserEventsResponse, responses=ERRORS)
    async def user_events(
        self, user_id: UserId, who: Caller, limit: int = Query(20, ge=1, le=1000)
    ) -> UserEventsResponse:
        await self._allow(who, user_id)
        n = await self._require_user(user_id)
        events = await self._store("events", self.store.events, user_id, max(n - limit, 0), limit)
        await self._knows(ids=[e.item_id for e in events])
        return UserEventsResponse(
            user_id=user_id,
            events=[{**self._describe(e.item_id), "rating": e.rating, "timestamp": e.timestamp} for e in events],
        )

    @app.get("/users/{user_id}/interests", response_model=InterestsResponse, responses=ERRORS)
    async def interests(self, user_id: UserId, who: Caller, last: int = Query(50, ge=1, le=1000)) -> InterestsResponse:
        await self._allow(who, user_id)
        await self._require_user(user_id)
        res = await self._call(self.decomposer.interests.remote(user_id, last), "decomposer")
        await self._knows(ids=[step["item_id"] for step in res["steps"]])
        steps = [{**step, "title": self._describe(step["item_id"])["title"]} for step in res["steps"]]
        return InterestsResponse(user_id=user_id, dimensions=res["dimensions"], steps=steps)

    @app.get("/items", response_model=ItemsResponse, responses=ERRORS)
    async def items(self, q: QueryText, who: Caller, k: int = Query(10, ge=1, le=MAX_K)) -> ItemsResponse:
        await self._allow(who)
        if not q.strip():
            raise ApiError(422, "q: empty query", "q")
        found = await self._call(self.combiner.search.remote(self.encoder.encode.remote(q), k), "search")
        await self._knows(indices=[i for i, _ in found])
        return ItemsResponse(items=[self.catalogue.describe(i, s) for i, s in found])

    @app.post("/items", response_model=ItemOut, status_code=201, responses=ERRORS)
    async def add_item(self, body: ItemIn, who: Caller) -> ItemOut:
        """Add an item to the catalogue (service tokens only): the encoder embeds its text, the store
        keeps it, and every replica places it by that text on its next request. An id the catalogue
        holds, trained or added, is a 409; so is an add past the app's `max_added_items`, and any add
        while the served model was trained without item text (it could not place the item)."""
        actor = await self._allow(who, service_only="adding an item")
        cat = self.catalogue
        await self._knows(ids=[body.item_id])
        if body.item_id in cat.index_of:
            kind = "a trained item" if cat.index_of[body.item_id] <= cat.n_trained else "an added item"
            raise ApiError(409, f"item_id: {body.item_id!r} is {kind} already", "item_id")
        unknown = [j for j, g in enumerate(body.genres) if g not in cat.genre_names]
        if unknown:
            j = unknown[0]
            raise ApiError(
                422,
                f"genres.{j}: unknown genre {body.genres[j]!r}; the catalogue's: {', '.join(cat.genre_names)}",
                f"genres.{j}",
            )
        if not (await self._call(self.decomposer.info.remote(), "decomposer"))["places_by_text"]:
            raise ApiError(
                409,
                "items: the served model was trained without item text (use_text off), so an added item "
                "would have no vector to be ranked by; serve a model trained with text to add items",
                "items",
            )
        text = added_item_text(body.title, body.genres, body.tags, body.description)
        emb = await self._call(self.encoder.encode.remote(text), "encoder")  # (384,)
        item = AddedItem(
            body.item_id,
            body.title,
            tuple(body.genres),
            tuple(body.tags),
            body.description,
            np.asarray(emb, np.float32).tobytes(),
            time.time(),
        )
        try:
            seq = await self._store("add_item", self.store.add_item, item, self.max_added_items)
        except ItemExists:
            raise ApiError(409, f"item_id: {body.item_id!r} is an added item already", "item_id") from None
        except ItemCapReached as e:
            raise ApiError(409, f"items: {e}", "items") from None
        log.info("item %r added (number %d) by a service token (jti %s)", body.item_id, seq, actor.jti)
        return self._item_out(item)

    @app.get("/items/{item_id}", response_model=ItemOut, responses=ERRORS)
    async def item(self, item_id: ItemIdPath, who: Caller) -> ItemOut:
        """An item of the catalogue, trained or added (404 for an id it does not hold)."""
        await self._allow(who)
        cat = self.catalogue
        idx = cat.index_of.get(item_id)
        if idx is not None and idx <= cat.n_trained:
            return ItemOut(
                item_id=item_id, title=cat.titles[idx], genres=cat.genres[idx], tags=[], description="", added=False
            )
        found = await self._store("get_item", self.store.get_item, item_id)
        if found is None:
            raise ApiError(404, f"item_id: unknown item {item_id!r}", "item_id")
        return self._item_out(found)

    @staticmethod
    def _item_out(item: AddedItem) -> ItemOut:
        return ItemOut(
            item_id=item.item_id,
            title=item.title,
            genres=list(item.genres),
            tags=list(item.tags),
            description=item.description,
            added=True,
        )
