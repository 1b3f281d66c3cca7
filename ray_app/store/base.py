"""What every state store holds and promises: events (the source of truth), cached states, the
dataset a store was loaded for, the items added while serving, the errors a caller can meet, and
the `StateStore` protocol; the URL of a store without its password.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class Event:
    item_id: str  # the SOURCE item id as written (MovieLens movieId, IMDb id "0133093"), not the model's index
    rating: float
    timestamp: float  # unix seconds


@dataclass(frozen=True)
class StoredState:
    model_version: str  # which checkpoint produced it; a state from another version is ignored (rebuilt)
    n_events: int  # how many of the user's events it has consumed
    blob: bytes  # the serialised state parts: LSTM (h, c) and, with profiles, their sums and weights (float32)


@dataclass(frozen=True)
class UserSnapshot:
    """What serving reads of a user before ranking, in one store call that sees one commit."""

    state: StoredState | None  # the cached state, None if there is none
    n_events: int  # the length of the log
    last_event: Event | None  # its last event (the gap to now), None for an empty log
    seen: list[str] | None  # the distinct item ids seen; None when not asked for


@dataclass(frozen=True)
class DatasetRecord:
    """The dataset a store was loaded for (`ray_app.serve.item_catalogue.dataset_record`): a store
    holds one dataset's users, so that no user is served another dataset's history."""

    name: str  # the prepared dataset's name ("synthetic", "ml-latest-small", ...)
    events: str  # sha256 of the users' events as loaded
    catalogue: str  # sha256 of the item vocabulary

    @property
    def key(self) -> str:
        """A short name for this record: the dataset's name and a digest of the rest (a file name)."""
        return f"{self.name}-{hashlib.sha256((self.events + self.catalogue).encode()).hexdigest()[:12]}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetRecord:
        return cls(**json.loads(text))

    def describe(self) -> str:
        return f"{self.name!r} (events {self.events[:12]}, catalogue {self.catalogue[:12]})"


@dataclass(frozen=True)
class AddedItem:
    """An item added to the catalogue while serving (POST /items): what a replica needs to place it
    (its text embedding and genres) and what GET /items/{id} answers. The store numbers the added
    items 1, 2, ... in the order they were added, the order every replica appends them in."""

    item_id: str
    title: str
    genres: tuple[str, ...]
    tags: tuple[str, ...]
    description: str
    text_emb: bytes  # (384,) float32: the encoder's vector of the item's text
    created: float  # unix seconds

    def fields_json(self) -> str:
        """Everything but the id and the embedding, as the stores keep it."""
        return json.dumps(
            {
                "title": self.title,
                "genres": list(self.genres),
                "tags": list(self.tags),
                "description": self.description,
                "created": self.created,
            }
        )

    @classmethod
    def from_parts(cls, item_id: str, fields: str | bytes, text_emb: bytes) -> AddedItem:
        f = json.loads(fields)
        return cls(
            item_id, f["title"], tuple(f["genres"]), tuple(f["tags"]), f["description"], bytes(text_emb), f["created"]
        )


class ItemExists(ValueError):
    """An added item's id is taken (by an item added before): nothing is overwritten."""


class ItemCapReached(ValueError):
    """The store holds as many added items as the app allows: nothing written."""

    def __init__(self, n_items: int, cap: int):
        super().__init__(f"the catalogue holds {n_items} added items, the most this app allows ({cap})")
        self.n_items, self.cap = n_items, cap


IDEMPOTENCY_TTL_S = 24 * 3600  # how long an Idempotency-Key is remembered; retries end long before


class IdempotencyConflict(ValueError):
    """An Idempotency-Key seen before with other events: a client bug, not a retry."""


class EventCapReached(ValueError):
    """An append that would take a user's log past its cap: refused whole, nothing written."""

    def __init__(self, user_id: str, n_events: int, cap: int, adding: int):
        super().__init__(
            f"user {user_id!r} holds {n_events} events and the cap is {cap}: {adding} more would exceed it "
            f"(erasing the user frees it)"
        )
        self.user_id, self.n_events, self.cap, self.adding = user_id, n_events, cap, adding


class StoreMismatch(ValueError):
    """A store that was loaded for another dataset (or holds users of an unrecorded one): loading
    this dataset's users into it would mix the two."""


class StoreUnavailable(RuntimeError):
    """The store cannot answer now (down, unreachable, full, locked past its timeout, or
    unreadable). A refused write wrote nothing; only a connection lost after Redis ran a write
    leaves it unknown, which a retry with the same Idempotency-Key settles. The API answers 503."""


def check_claim(store: str, held: DatasetRecord | None, record: DatasetRecord, has_users: bool, adopt: bool) -> None:
    """`claim_dataset`'s rule, for a store that records `held` and holds users or not: StoreMismatch
    where `record` may not be recorded."""
    if held == record or (held is None and (adopt or not has_users)):
        return
    if held is not None:
        raise StoreMismatch(
            f"{store} was loaded for dataset {held.describe()}, not {record.describe()}: a store holds one "
            "dataset's users, so give this one a store of its own (another file, or another Redis database)"
        )
    raise StoreMismatch(
        f"{store} holds users but records no dataset (it was loaded before stores recorded theirs): load "
        f"{record.name!r} into a store of its own, or, if those are {record.name!r}'s users, record it with --adopt"
    )


_INT64_ID = re.compile(r"0|[1-9][0-9]{0,18}")  # an id as a store held it when ids were integers


def events_digest(events: Sequence[Event]) -> str:
    """What an Idempotency-Key promises: these events, in this order. Events whose ids all read as
    the integers that stores held before ids were strings ("7", not "07") hash as they hashed then,
    so that a key recorded before the change still matches its retry; others hash their ids' text,
    under a prefix that no digest of the first kind has."""
    h = hashlib.sha256()
    if all(_INT64_ID.fullmatch(e.item_id) and int(e.item_id) < 2**63 for e in events):
        for e in events:
            h.update(struct.pack("<qdd", int(e.item_id), float(e.rating), float(e.timestamp)))
        return h.hexdigest()
    for e in events:
        raw = e.item_id.encode()
        h.update(struct.pack("<Qdd", len(raw), float(e.rating), float(e.timestamp)) + raw)
    return "s:" + h.hexdigest()


@runtime_checkable
class StateStore(Protocol):
    """Thread-safe; every method may be called from several processes at once."""

    def append_events(self, user_id: str, events: Sequence[Event], max_events: int | None = None) -> int:
        """Append -> the log's length; EventCapReached (nothing written) when the log would hold
        more than `max_events`."""
        ...

    def append_once(
        self, user_id: str, key: str, events: Sequence[Event], max_events: int | None = None
    ) -> tuple[int, bool]:
        """Append unless `key` was used for this user within IDEMPOTENCY_TTL_S -> (n_events after
        the first append, replayed?); IdempotencyConflict when the key came with other events;
        EventCapReached as `append_events` (a replay is answered whatever the cap)."""
        ...

    def events(self, user_id: str, start: int = 0, limit: int | None = None) -> list[Event]: ...
    def count_events(self, user_id: str) -> int: ...
    def seen_items(self, user_id: str) -> list[str]:
        """The distinct item ids of the user's events, kept beside the log (no read of the log)."""
        ...

    def get_state(self, user_id: str) -> StoredState | None: ...
    def snapshot(self, user_id: str, with_seen: bool = False) -> UserSnapshot:
        """The state, the log's length and last event, and (`with_seen`) the seen set, read together
        (one SQLite read transaction, one Redis MULTI/EXEC round trip)."""
        ...

    def put_state(self, user_id: str, state: StoredState) -> None:
        """Cache a state; a no-op for a user the store does not hold (one erased meanwhile)."""
        ...

    def erase_user(self, user_id: str) -> int:
        """Delete the user's events, seen set, state and idempotency records together -> the
        number of events erased (0 for an unknown user)."""
        ...

    def revoke_token(self, jti: str, expires_at: float) -> None:
        """Remember a revoked token id until `expires_at` (after which the token is refused anyway)."""
        ...

    def revoked_tokens(self) -> set[str]:
        """The ids of revoked tokens that have not expired yet (expired entries are dropped)."""
        ...

    def users(self, prefix: str = "", limit: int = 50) -> list[tuple[str, int]]: ...
    def bulk_load(self, user_events: Mapping[str, Sequence[Event]]) -> None: ...
    def dataset(self) -> DatasetRecord | None:
        """The dataset the store was loaded for; None for a store that records none."""
        ...

    def claim_dataset(self, record: DatasetRecord, adopt: bool = False) -> None:
        """Record `record` as the store's dataset, atomically: a store without users takes it; one
        that holds it already is left as it is; StoreMismatch (nothing written) for a store that
        records another dataset, or that holds users and records none (a store loaded before
        stores recorded their dataset) unless `adopt`, which records it for such a store."""
        ...

    def add_item(self, item: AddedItem, max_items: int | None = None) -> int:
        """Append an item to the added ones -> its number (1, 2, ...); ItemExists when its id was
        added before, ItemCapReached when `max_items` are held; either writes nothing."""
        ...

    def count_items(self) -> int:
        """How many items were added: the catalogue's version, one cheap read."""
        ...

    def items_since(self, start: int, limit: int | None = None) -> list[AddedItem]:
        """The added items after the first `start`, in the order they were added."""
        ...

    def get_item(self, item_id: str) -> AddedItem | None: ...

    def ping(self) -> None:
        """A cheap round trip; StoreUnavailable when the store cannot answer."""
        ...

    def close(self) -> None: ...


def redact_url(url: str) -> str:
    """`url` as it may be printed or logged: a password in it becomes `***`
    (`redis://user:***@host:port/db`, `...?password=***`); a URL without one is returned as is.
    A password holding `/`, `?` or `#` unencoded (which a URL parser cuts the authority at) is
    hidden too: everything between the user's `:` and the last `@`."""
    raw = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^:@/?#]*):([^@]*[/?#][^@]*)@([^@]*)$", url)
    if raw:
        return redact_url(f"{raw[1]}{raw[2]}:***@{raw[4]}")
    parts = urlsplit(url)
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    if parts.password is None and query == parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))
