"""A small typed client of the recommender's HTTP API.

The demo is a separate process that knows the API only through HTTP; requests and answers are
the API's own pydantic models (`ray_app.serve.schemas`, plain pydantic, no Ray), so a request is checked
before it leaves and an answer that breaks the contract is caught here. Every failure surfaces
as an `ApiError` whose `message` is fit to show a person: no tracebacks, no httpx internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from ray_app.serve.schemas import (
    Context,
    EventIn,
    EventsRequest,
    EventsResponse,
    Health,
    InterestsResponse,
    Item,
    ItemIn,
    ItemOut,
    ItemsResponse,
    RecommendRequest,
    RecommendResponse,
    TokenRequest,
    TokenResponse,
    UserEvent,
    UserEventsResponse,
    UsersResponse,
    UserSummary,
)

DEFAULT_API = "http://127.0.0.1:8000"


# ---- errors ---------------------------------------------------------------------------------


class ApiError(Exception):
    """A request that did not give a usable answer; `message` is written for the page."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field


class EndpointDown(ApiError):
    """Nothing answered at the base URL (refused, unresolvable, timed out)."""


class NotFound(ApiError):
    """404: an unknown user (or path)."""


M = TypeVar("M", bound=BaseModel)


# ---- client ---------------------------------------------------------------------------------


class ApiClient:
    """Thread-safe (httpx.Client is); one per demo process. `token` is sent as a bearer token on
    every call; `with_token` gives a client that sends another token over the same connections
    (the demo's own is a service token, kept in its process; each person's calls carry a
    short-lived user token minted from it)."""

    def __init__(
        self,
        base_url: str = DEFAULT_API,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def with_token(self, token: str) -> ApiClient:
        """This client with `token` on every call instead of its own."""
        other = object.__new__(ApiClient)
        other.base_url, other._http, other._auth = self.base_url, self._http, {"Authorization": f"Bearer {token}"}
        return other

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- endpoints --

    def health(self) -> Health:
        return self._call("GET", "/healthz", Health)

    def users(self, q: str = "", limit: int = 50) -> list[UserSummary]:
        return self._call("GET", "/users", UsersResponse, params={"q": q, "limit": limit}).users

    def user_events(self, user_id: str, limit: int = 20) -> list[UserEvent]:
        return self._call("GET", f"/users/{_seg(user_id)}/events", UserEventsResponse, params={"limit": limit}).events

    def interests(self, user_id: str, last: int = 50) -> InterestsResponse:
        return self._call("GET", f"/users/{_seg(user_id)}/interests", InterestsResponse, params={"last": last})

    def post_events(self, user_id: str, events: Sequence[EventIn]) -> EventsResponse:
        body = _request(EventsRequest, events=list(events))
        return self._call("POST", f"/users/{_seg(user_id)}/events", EventsResponse, json=body)

    def recommend(
        self,
        user_id: str | None = None,
        history: Sequence[EventIn] | None = None,
        *,
        timestamp: float | None = None,
        intent: str | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        explain: bool = False,
    ) -> RecommendResponse:
        # A blank intent means "no intent", which the API spells null.
        context = _request(Context, timestamp=timestamp, intent=(intent or "").strip() or None)
        body = _request(
            RecommendRequest,
            user_id=user_id,
            history=None if history is None else list(history),
            context=context,
            k=k,
            exclude_seen=exclude_seen,
            explain=explain,
        )
        return self._call("POST", "/recommend", RecommendResponse, json=body)

    def search_items(self, q: str, k: int = 10) -> list[Item]:
        return self._call("GET", "/items", ItemsResponse, params={"q": q, "k": k}).items

    def add_item(
        self, item_id: str, title: str, genres: Sequence[str] = (), tags: Sequence[str] = (), description: str = ""
    ) -> ItemOut:
        """Add an item to the catalogue (this client's token must be a service token)."""
        body = _request(
            ItemIn, item_id=item_id, title=title, genres=list(genres), tags=list(tags), description=description
        )
        return self._call("POST", "/items", ItemOut, json=body)

    def item(self, item_id: str) -> ItemOut:
        return self._call("GET", f"/items/{_seg(item_id)}", ItemOut)

    def mint_user_token(self, user_id: str, ttl_s: int) -> TokenResponse:
        """A token for `user_id` only, minted by the API (this client's token must be a service token)."""
        body = _request(TokenRequest, user_id=user_id, ttl_s=ttl_s)
        return self._call("POST", "/tokens", TokenResponse, json=body)

    # -- plumbing --

    def _call(self, method: str, path: str, model: type[M], **kw) -> M:
        try:
            response = self._http.request(method, path, headers=self._auth, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise EndpointDown(
                f"The recommendation API at {self.base_url} is not reachable ({_reason(e)}). "
                "Is it running? The demo retries on your next action."
            ) from e
        except httpx.TimeoutException as e:
            raise EndpointDown(
                f"The recommendation API at {self.base_url} did not answer {method} {path} "
                "in time. Try again in a moment."
            ) from e
        except httpx.HTTPError as e:
            raise EndpointDown(f"Talking to {self.base_url} failed: {_reason(e)}.") from e
        if response.status_code >= 400:
            raise _error(method, path, response)
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as e:
            # The server answered, but not in the contract's shape: a version mismatch, or not our API.
            raise ApiError(
                f"Unexpected answer from {method} {path}: {_first_problem(e)}.", status=response.status_code
            ) from e


def _request(model: type[BaseModel], **fields) -> dict:
    """Check a request body before sending it, so a bad value is named here, not by a 422."""
    try:
        return model.model_validate(fields).model_dump(mode="json")
    except ValidationError as e:
        raise ApiError(f"Invalid request: {_first_problem(e)}.", field=_loc(e)) from e


def _loc(e: ValidationError) -> str:
    return ".".join(str(p) for p in e.errors()[0]["loc"])


def _seg(user_id: str) -> str:
    """A user id as one path segment (ids are free text; '/' or spaces must not change the route)."""
    return quote(user_id, safe="")


def _reason(e: Exception) -> str:
    text = str(e).strip()
    if "refused" in text.lower():
        return "connection refused"
    return text.splitlines()[0][:120] if text else type(e).__name__


def _error(method: str, path: str, response: httpx.Response) -> ApiError:
    detail, field = None, None
    try:
        body = response.json()
        if isinstance(body, dict):
            detail, field = body.get("detail"), body.get("field")
    except ValueError:
        pass
    if not isinstance(detail, str):
        # FastAPI's default shape (a list of problems) or a plain-text proxy page.
        detail = str(detail) if detail is not None else (response.text.strip()[:200] or response.reason_phrase)
    status = response.status_code
    if status in (401, 403):
        return ApiError(f"The API refused the demo's token: {detail}", status=status, field=field)
    if status == 404:
        return NotFound(f"Not found: {detail}", status=status, field=field)
    if status < 500:
        where = f" (field `{field}`)" if field else ""
        return ApiError(f"The API rejected the request{where}: {detail}", status=status, field=field)
    return ApiError(f"The API failed on {method} {path} (HTTP {status}): {detail}", status=status, field=field)


def _first_problem(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return f"{_loc(e) or 'body'}: {e.errors()[0]['msg']}"
    return "the body is not JSON"
