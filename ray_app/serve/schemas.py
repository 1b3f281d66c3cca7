"""pydantic models of every HTTP request and response of the Serve app.

Requests forbid unknown fields so that a typo ("userid") is a 422 naming it instead of a
silently ignored field. Item ids on the wire are SOURCE ids as strings, never the model's indices:
IMDb's "0133093" stays "0133093"; a request may still send a whole number, read as its decimal
string (7 -> "7").
"""

from __future__ import annotations

import time
import unicodedata
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

MAX_K = 100
MAX_HISTORY = 1000  # inline history and events per POST
MAX_INTENT_CHARS = 500
MAX_USER_ID_CHARS = 128
MAX_ITEM_ID_CHARS = 128  # a catalogue whose ids are longer cannot be served (item_catalogue.Catalogue refuses it)
MAX_TIMESTAMP = 1e11  # unix seconds (year 5138): larger values would overflow the int64 time features
# An implicit event (a view, a click) carries no rating; it is taken as this one, the most common
# rating in MovieLens (4.0 stars): the model reads it and the store keeps it so, like a given 4.0.
IMPLICIT_RATING = 4.0
MAX_CLOCK_SKEW_S = 300.0  # an event may be dated this far after the server's clock, not more
IDEMPOTENCY_KEY = r"^[A-Za-z0-9._\-]{1,128}$"  # what an Idempotency-Key header may hold (a UUID, say)


def clean_text(value: str) -> str:
    """Reject text that is not valid Unicode: lone surrogates (not encodable as UTF-8), the
    replacement character (what undecodable bytes in a URL become) and control characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8 text") from None
    if "\ufffd" in value or any(unicodedata.category(ch) == "Cc" for ch in value):
        raise ValueError("contains undecodable bytes or control characters")
    return value


Text = Annotated[str, AfterValidator(clean_text)]


def id_text(value: object) -> object:
    """A whole JSON number as its decimal string (7 -> "7"); a string as it is; anything else refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"an item id is a string or a whole number, not {type(value).__name__} {value!r}")
    return value


ITEM_ID_DESCRIPTION = (
    'the source item id as a string ("0133093" keeps its zero); a whole number is read as its decimal string'
)
# What a request may send as an item id; answers always carry the string.
ItemIdIn = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ITEM_ID_CHARS),
    BeforeValidator(id_text),
    AfterValidator(clean_text),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ITEM_ID_CHARS}, {"type": "integer"}],
            "description": ITEM_ID_DESCRIPTION,
        },
        mode="validation",
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- shared pieces ---------------------------------------------------------------------
class EventIn(_Request):
    item_id: ItemIdIn
    rating: float = Field(
        default=IMPLICIT_RATING,
        ge=0.5,
        le=5.0,
        allow_inf_nan=False,
        description=f"0.5 to 5 stars; leave it out for an implicit event (a view or a click), "
        f"which counts as {IMPLICIT_RATING:g}",
    )
    timestamp: float = Field(
        ge=0,
        le=MAX_TIMESTAMP,
        allow_inf_nan=False,
        description=f"unix seconds, at most {MAX_CLOCK_SKEW_S:g} s after the server's clock",
    )

    @field_validator("timestamp")
    @classmethod
    def _not_in_the_future(cls, ts: float) -> float:
        now = time.time()
        if ts > now + MAX_CLOCK_SKEW_S:
            raise ValueError(
                f"{ts:.0f} is in the future (more than {MAX_CLOCK_SKEW_S:g} s after the server's "
                f"clock, {now:.0f}): an event is something that happened"
            )
        return ts


class Context(_Request):
    timestamp: float | None = Field(
        default=None, ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False, description="unix seconds; default now"
    )
    intent: Text | None = Field(default=None, min_length=1, max_length=MAX_INTENT_CHARS, description="free text")


class Item(BaseModel):
    item_id: str
    title: str
    genres: list[str]
    score: float


class ErrorResponse(BaseModel):
    detail: str
    field: str | None = None


# -- requests --------------------------------------------------------------------------
class RecommendRequest(_Request):
    user_id: Text | None = Field(default=None, min_length=1, max_length=MAX_USER_ID_CHARS)
    history: list[EventIn] | None = Field(default=None, max_length=MAX_HISTORY)
    context: Context = Field(default_factory=Context)
    k: int = Field(default=10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    explain: bool = False

    @field_validator("history")
    @classmethod
    def _one_of_user_or_history(cls, history: list[EventIn] | None, info: ValidationInfo) -> list[EventIn] | None:
        # Declared after user_id, so user_id is already in info.data when it validated.
        if history and info.data.get("user_id") is not None:
            raise ValueError("give either user_id or history, not both")
        return history


# The bounds of an added item (documented in docs/serving.md, "Adding items").
MAX_TITLE_CHARS = 300
MAX_GENRES = 20
MAX_TAGS = 20
MAX_TAG_CHARS = 64
MAX_DESCRIPTION_CHARS = 2000
Tag = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_TAG_CHARS)]


class ItemIn(_Request):
    """An item added to the catalogue while serving (POST /items), placed by its text."""

    item_id: ItemIdIn
    title: Text = Field(min_length=1, max_length=MAX_TITLE_CHARS, description="its title, with the year if any")
    genres: list[Tag] = Field(
        default_factory=list, max_length=MAX_GENRES, description="genres among the catalogue's (GET /healthz)"
    )
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS, description="free tags; the first 5 are read")
    description: Text = Field("", max_length=MAX_DESCRIPTION_CHARS, description="a sentence or a paragraph")

    @field_validator("title")
    @classmethod
    def _not_blank(cls, title: str) -> str:
        if not title.strip():
            raise ValueError("a title is needed (it is most of the text that places the item)")
        return title


class ItemOut(BaseModel):
    item_id: str
    title: str
    genres: list[str]
    tags: list[str]
    description: str
    added: bool = Field(description="true for an item added while serving, false for a trained one")


class EventsRequest(_Request):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_HISTORY)


# -- responses -------------------------------------------------------------------------
class Health(BaseModel):
    status: str
    model_version: str
    n_items: int
    n_users: int
    dimensions: list[str]
    genres: list[str] = Field(default_factory=list, description="the catalogue's genres (what an added item may name)")


class TokenRequest(_Request):
    user_id: Text = Field(min_length=1, max_length=MAX_USER_ID_CHARS)
    ttl_s: int = Field(900, ge=60, le=3600, description="lifetime in seconds (15 minutes by default, an hour at most)")


class TokenResponse(BaseModel):
    token: str
    jti: str  # what a revocation names
    expires_at: float  # unix seconds


class Ready(BaseModel):
    status: str  # "ready"
    store: str  # "ok"


class ErasedResponse(BaseModel):
    user_id: str
    erased_events: int  # 0 for a user the store did not hold


class RecommendResponse(BaseModel):
    user_id: str | None
    model_version: str
    n_events: int
    items: list[Item]
    gates: dict[str, float]
    explanation: dict[str, list[Item]] | None = None


class EventsResponse(BaseModel):
    user_id: str
    accepted: int
    n_events: int
    replayed: bool = Field(
        default=False,
        description="true when the Idempotency-Key was seen before: nothing "
        "was appended, and this is the first answer again",
    )


class UserSummary(BaseModel):
    user_id: str
    n_events: int


class UsersResponse(BaseModel):
    users: list[UserSummary]


class UserEvent(BaseModel):
    item_id: str
    title: str
    genres: list[str]
    rating: float
    timestamp: float


class UserEventsResponse(BaseModel):
    user_id: str
    events: list[UserEvent]


class InterestStep(BaseModel):
    index: int
    item_id: str
    title: str
    timestamp: float
    gates: dict[str, float]


class InterestsResponse(BaseModel):
    user_id: str
    dimensions: list[str]
    steps: list[InterestStep]


class ItemsResponse(BaseModel):
    items: list[Item]
