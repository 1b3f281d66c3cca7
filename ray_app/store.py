"""Durable per-user event log plus a cache of each user's LSTM state.

The events are the source of truth; a `StoredState` is a cache that the serving decomposer
rebuilds from the events when it is missing or was produced by another model version.
`open_store(url)` picks the backend: SQLite (embedded, one node) or Redis (several nodes).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class Event:
    item_id: int  # the SOURCE item id (MovieLens movieId / synthetic item id), not the model's index
    rating: float
    timestamp: float  # unix seconds


@dataclass(frozen=True)
class StoredState:
    model_version: str  # which checkpoint produced it; a state from another version is ignored (rebuilt)
    n_events: int  # how many of the user's events it has consumed
    blob: bytes  # the serialised state parts: LSTM (h, c) and, with profiles, their sums and weights (float32)


IDEMPOTENCY_TTL_S = 24 * 3600     # how long an Idempotency-Key is remembered; retries end long before


class IdempotencyConflict(ValueError):
    """An Idempotency-Key seen before with other events: a client bug, not a retry."""


class StoreUnavailable(RuntimeError):
    """The store cannot answer now (down, unreachable, full, locked past its timeout, or
    unreadable). A refused write wrote nothing; only a connection lost after Redis ran a write
    leaves it unknown, which a retry with the same Idempotency-Key settles. The API answers 503."""


def _sqlite_faults(method):
    """SQLite's operational errors (disk full, busy past the timeout, I/O, not a database) ->
    StoreUnavailable naming the file; the write transaction was rolled back, so nothing is lost."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
            if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                raise
            raise StoreUnavailable(f"SQLite store {self.path}: {e}") from None
    return wrapper


def events_digest(events: Sequence[Event]) -> str:
    """What an Idempotency-Key promises: these events, in this order."""
    h = hashlib.sha256()
    for e in events:
        h.update(struct.pack("<qdd", int(e.item_id), float(e.rating), float(e.timestamp)))
    return h.hexdigest()


@runtime_checkable
class StateStore(Protocol):
    """Thread-safe; every method may be called from several processes at once."""

    def append_events(self, user_id: str, events: Sequence[Event]) -> int: ...
    def append_once(self, user_id: str, key: str, events: Sequence[Event]) -> tuple[int, bool]:
        """Append unless `key` was used for this user within IDEMPOTENCY_TTL_S -> (n_events after
        the first append, replayed?); IdempotencyConflict when the key came with other events."""
        ...
    def events(self, user_id: str, start: int = 0, limit: int | None = None) -> list[Event]: ...
    def count_events(self, user_id: str) -> int: ...
    def seen_items(self, user_id: str) -> list[int]:
        """The distinct item ids of the user's events, kept beside the log (no read of the log)."""
        ...
    def get_state(self, user_id: str) -> StoredState | None: ...
    def put_state(self, user_id: str, state: StoredState) -> None: ...
    def users(self, prefix: str = "", limit: int = 50) -> list[tuple[str, int]]: ...
    def bulk_load(self, user_events: Mapping[str, Sequence[Event]]) -> None: ...
    def ping(self) -> None:
        """A cheap round trip; StoreUnavailable when the store cannot answer."""
        ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id  TEXT PRIMARY KEY,
    n_events INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    user_id   TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    item_id   INTEGER NOT NULL,
    rating    REAL    NOT NULL,
    timestamp REAL    NOT NULL,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    user_id TEXT    NOT NULL,
    item_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    user_id  TEXT NOT NULL,
    key      TEXT NOT NULL,
    digest   TEXT NOT NULL,
    n_events INTEGER NOT NULL,
    created  REAL NOT NULL,
    PRIMARY KEY (user_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created);
CREATE TABLE IF NOT EXISTS states (
    user_id       TEXT PRIMARY KEY,
    model_version TEXT    NOT NULL,
    n_events      INTEGER NOT NULL,
    blob          BLOB    NOT NULL
);
"""


class SQLiteStore:
    """SQLite in WAL mode with synchronous=FULL: a committed append survives a crash.

    Each thread gets its own connection (sqlite3 connections are not shareable across
    threads); writers take the database lock with BEGIN IMMEDIATE, so appends from several
    processes serialise and sequence numbers never collide.
    """

    def __init__(self, path: str, timeout_s: float = 5.0):
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
        self.path = path
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        # executescript manages its own transaction; CREATE IF NOT EXISTS makes it idempotent.
        try:
            conn = self._conn()
            had_events = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is not None
            had_seen = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'seen'").fetchone() is not None
            conn.executescript(_SCHEMA)
            if had_events and not had_seen:     # a store from before the seen table: fill it once
                with self._write(conn):
                    conn.execute("INSERT OR IGNORE INTO seen (user_id, item_id) SELECT user_id, item_id FROM events")
        except sqlite3.DatabaseError as e:       # "file is not a database", "disk image is malformed"
            self.close()
            raise StoreUnavailable(f"SQLite store {path}: cannot be opened as a store ({e}); "
                                   "restore it from a backup or move it aside") from None

    # -- connections -----------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"store {self.path!r} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            conn = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None)
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout_s * 1000)}")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """PRAGMA journal_mode=WAL, retried: on a new file, replicas that open it at the same moment
        can get "database is locked" at once, without SQLite waiting out the busy timeout."""
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    class _write:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""

        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                self.conn.execute("COMMIT")
            elif self.conn.in_transaction:   # SQLite may have rolled back itself (a full disk)
                self.conn.execute("ROLLBACK")

    # -- events ----------------------------------------------------------------------
    @_sqlite_faults
    def append_events(self, user_id: str, events: Sequence[Event]) -> int:
        conn = self._conn()
        with self._write(conn):
            return self._append(conn, user_id, events)

    @_sqlite_faults
    def append_once(self, user_id: str, key: str, events: Sequence[Event]) -> tuple[int, bool]:
        digest, now = events_digest(events), time.time()
        conn = self._conn()
        with self._write(conn):                 # the key and the events commit together, or neither
            conn.execute("DELETE FROM idempotency WHERE created < ?", (now - IDEMPOTENCY_TTL_S,))
            row = conn.execute("SELECT digest, n_events FROM idempotency WHERE user_id = ? AND key = ?",
                               (user_id, key)).fetchone()
            if row is not None:
                if row[0] != digest:
                    raise IdempotencyConflict(f"Idempotency-Key {key!r} was used for other events of this user")
                return int(row[1]), True
            total = self._append(conn, user_id, events)
            conn.execute("INSERT INTO idempotency (user_id, key, digest, n_events, created) VALUES (?, ?, ?, ?, ?)",
                         (user_id, key, digest, total, now))
        return total, False

    @staticmethod
    def _append(conn: sqlite3.Connection, user_id: str, events: Sequence[Event]) -> int:
        """Inside a write transaction: the events after the user's last -> the new count."""
        row = conn.execute("SELECT n_events FROM users WHERE user_id = ?", (user_id,)).fetchone()
        n = row[0] if row else 0
        conn.executemany(
            "INSERT INTO events (user_id, seq, item_id, rating, timestamp) VALUES (?, ?, ?, ?, ?)",
            [(user_id, n + i, int(e.item_id), float(e.rating), float(e.timestamp)) for i, e in enumerate(events)],
        )
        conn.executemany("INSERT OR IGNORE INTO seen (user_id, item_id) VALUES (?, ?)",
                         [(user_id, int(e.item_id)) for e in events])
        total = n + len(events)
        conn.execute(
            "INSERT INTO users (user_id, n_events) VALUES (?, ?) "
            "ON CONFLICT(user_id) DO UPDATE SET n_events = excluded.n_events",
            (user_id, total),
        )
        return total

    @_sqlite_faults
    def events(self, user_id: str, start: int = 0, limit: int | None = None) -> list[Event]:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        rows = self._conn().execute(
            "SELECT item_id, rating, timestamp FROM events WHERE user_id = ? AND seq >= ? ORDER BY seq LIMIT ?",
            (user_id, start, -1 if limit is None else max(int(limit), 0)),
        ).fetchall()
        return [Event(int(i), float(r), float(t)) for i, r, t in rows]

    @_sqlite_faults
    def count_events(self, user_id: str) -> int:
        row = self._conn().execute("SELECT n_events FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return int(row[0]) if row else 0

    @_sqlite_faults
    def seen_items(self, user_id: str) -> list[int]:
        return [int(i) for (i,) in self._conn().execute("SELECT item_id FROM seen WHERE user_id = ?", (user_id,))]

    # -- state cache -----------------------------------------------------------------
    @_sqlite_faults
    def get_state(self, user_id: str) -> StoredState | None:
        row = self._conn().execute(
            "SELECT model_version, n_events, blob FROM states WHERE user_id = ?", (user_id,)
        ).fetchone()
        return StoredState(row[0], int(row[1]), bytes(row[2])) if row else None

    @_sqlite_faults
    def put_state(self, user_id: str, state: StoredState) -> None:
        # A slower writer must not overwrite a newer state of the same model version.
        conn = self._conn()
        # The state is a cache rebuilt from the events, so its commit skips the fsync (most of its cost).
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._write(conn):
                conn.execute(
                    "INSERT INTO states (user_id, model_version, n_events, blob) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(user_id) DO UPDATE SET model_version = excluded.model_version, "
                    "n_events = excluded.n_events, blob = excluded.blob "
                    "WHERE states.model_version != excluded.model_version OR excluded.n_events >= states.n_events",
                    (user_id, state.model_version, int(state.n_events), sqlite3.Binary(state.blob)),
                )
        finally:
            conn.execute("PRAGMA synchronous=FULL")

    # -- users -----------------------------------------------------------------------
    @_sqlite_faults
    def users(self, prefix: str = "", limit: int = 50) -> list[tuple[str, int]]:
        rows = self._conn().execute(
            "SELECT user_id, n_events FROM users WHERE substr(user_id, 1, ?) = ? ORDER BY user_id LIMIT ?",
            (len(prefix), prefix, max(int(limit), 0)),
        ).fetchall()
        return [(u, int(n)) for u, n in rows]

    @_sqlite_faults
    def bulk_load(self, user_events: Mapping[str, Sequence[Event]]) -> None:
        conn = self._conn()
        with self._write(conn):
            for user_id, events in user_events.items():
                cur = conn.execute(
                    "INSERT OR IGNORE INTO users (user_id, n_events) VALUES (?, ?)", (user_id, len(events))
                )
                if cur.rowcount == 0:  # already present: idempotent reload
                    continue
                conn.executemany(
                    "INSERT INTO events (user_id, seq, item_id, rating, timestamp) VALUES (?, ?, ?, ?, ?)",
                    [(user_id, i, int(e.item_id), float(e.rating), float(e.timestamp)) for i, e in enumerate(events)],
                )
                conn.executemany("INSERT OR IGNORE INTO seen (user_id, item_id) VALUES (?, ?)",
                                 [(user_id, int(e.item_id)) for e in events])

    @_sqlite_faults
    def ping(self) -> None:
        self._conn().execute("SELECT count(*) FROM users WHERE user_id = ''").fetchone()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:  # closed from another thread already
                    pass
            self._all.clear()


_SCHEMES = "sqlite:///PATH (relative; sqlite:////abs/path for an absolute one) or redis://host:port/db"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def redact_url(url: str) -> str:
    """`url` as it may be printed or logged: a password in it becomes `***`
    (`redis://user:***@host:port/db`, `...?password=***`); a URL without one is returned as is."""
    parts = urlsplit(url)
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    if parts.password is None and query == parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def open_store(url: str) -> StateStore:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db` (SQLAlchemy convention) or `redis://host:port/db`.

    `${NAME}` in the URL is replaced by the environment variable NAME where the store is opened (in
    each replica), so that a password can come from a Kubernetes Secret instead of the serve config."""
    def from_env(m: re.Match) -> str:
        if not os.environ.get(m[1]):
            raise ValueError(f"store URL {redact_url(url)!r} takes ${{{m[1]}}} from the environment, where it is not set")
        return os.environ[m[1]]

    url = _ENV_REFERENCE.sub(from_env, url)
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError(f"store URL {redact_url(url)!r} has no file path; accepted: {_SCHEMES}")
        return SQLiteStore(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from ray_app.store_redis import RedisStore  # lazily: redis is only needed for this backend

        return RedisStore(url)
    raise ValueError(f"unsupported store URL {redact_url(url)!r}; accepted: {_SCHEMES}")
