"""Durable per-user event log plus a cache of each user's LSTM state.

The events are the source of truth; a `StoredState` is a cache that the serving decomposer
rebuilds from the events when it is missing or was produced by another model version.
`open_store(url)` picks the backend: SQLite (embedded, one node) or Redis (several nodes).

Schema version 2 (`PRAGMA user_version`) keeps item ids as TEXT ("0133093" keeps its zero) and
records the dataset the store was loaded for (`meta`); version 3 adds the items added while
serving (`items`). A store of version 0 or 1, whose item ids were INTEGER columns, is migrated
when it is first opened, in one transaction: each id becomes its decimal string, which is the
source id it stood for; a store of version 2 only gets the new table.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence

from ray_app.store.base import (
    IDEMPOTENCY_TTL_S,
    AddedItem,
    DatasetRecord,
    Event,
    EventCapReached,
    IdempotencyConflict,
    ItemCapReached,
    ItemExists,
    StoredState,
    StoreUnavailable,
    UserSnapshot,
    check_claim,
    events_digest,
)


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


SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id  TEXT PRIMARY KEY,
    n_events INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    user_id   TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    item_id   TEXT    NOT NULL,
    rating    REAL    NOT NULL,
    timestamp REAL    NOT NULL,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
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
CREATE TABLE IF NOT EXISTS revoked (
    jti     TEXT PRIMARY KEY,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS states (
    user_id       TEXT PRIMARY KEY,
    model_version TEXT    NOT NULL,
    n_events      INTEGER NOT NULL,
    blob          BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS items (
    seq      INTEGER PRIMARY KEY,
    item_id  TEXT NOT NULL UNIQUE,
    fields   TEXT NOT NULL,
    text_emb BLOB NOT NULL
);
"""
# The tables whose item_id was an INTEGER column before version 2, and their columns.
_TEXT_ID_TABLES = {"events": "user_id, seq, item_id, rating, timestamp", "seen": "user_id, item_id"}


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
        try:
            conn = self._conn()
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                with self._write(conn):  # several processes may open a new file at once: one migrates
                    self._migrate(conn)
        except sqlite3.DatabaseError as e:  # "file is not a database", "disk image is malformed"
            self.close()
            raise StoreUnavailable(
                f"SQLite store {path}: cannot be opened as a store ({e}); restore it from a backup or move it aside"
            ) from None

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Inside a write transaction: create what is missing and bring an older store to SCHEMA_VERSION."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return  # another process migrated it meanwhile
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version >= 2:  # item ids are TEXT already: only the tables added since are created
            tables = set()
        for table in _TEXT_ID_TABLES:
            if table in tables:  # item ids were INTEGER: the rows are copied into a TEXT column
                conn.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        for table, columns in _TEXT_ID_TABLES.items():
            if table in tables:
                cast = columns.replace("item_id", "CAST(item_id AS TEXT)")
                conn.execute(f"INSERT INTO {table} ({columns}) SELECT {cast} FROM old_{table}")
                conn.execute(f"DROP TABLE old_{table}")
        if "events" in tables and "seen" not in tables:  # a store from before the seen table: fill it
            conn.execute("INSERT OR IGNORE INTO seen (user_id, item_id) SELECT user_id, item_id FROM events")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        elif conn.in_transaction:  # one that an earlier failure left open on this thread's connection
            conn.execute("ROLLBACK")
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
            elif self.conn.in_transaction:  # SQLite may have rolled back itself (a full disk)
                self.conn.execute("ROLLBACK")

    # -- events ----------------------------------------------------------------------
    @_sqlite_faults
    def append_events(self, user_id: str, events: Sequence[Event], max_events: int | None = None) -> int:
        conn = self._conn()
        with self._write(conn):
            return self._append(conn, user_id, events, max_events)

    @_sqlite_faults
    def append_once(
        self, user_id: str, key: str, events: Sequence[Event], max_events: int | None = None
    ) -> tuple[int, bool]:
        digest, now = events_digest(events), time.time()
        conn = self._conn()
        with self._write(conn):  # the key and the events commit together, or neither
            conn.execute("DELETE FROM idempotency WHERE created < ?", (now - IDEMPOTENCY_TTL_S,))
            row = conn.execute(
                "SELECT digest, n_events FROM idempotency WHERE user_id = ? AND key = ?", (user_id, key)
            ).fetchone()
            if row is not None:
                if row[0] != digest:
                    raise IdempotencyConflict(f"Idempotency-Key {key!r} was used for other events of this user")
                return int(row[1]), True
            total = self._append(conn, user_id, events, max_events)
            conn.execute(
                "INSERT INTO idempotency (user_id, key, digest, n_events, created) VALUES (?, ?, ?, ?, ?)",
                (user_id, key, digest, total, now),
            )
        return total, False

    @staticmethod
    def _append(conn: sqlite3.Connection, user_id: str, events: Sequence[Event], max_events: int | None) -> int:
        """Inside a write transaction: the events after the user's last -> the new count."""
        row = conn.execute("SELECT n_events FROM users WHERE user_id = ?", (user_id,)).fetchone()
        n = row[0] if row else 0
        if max_events is not None and n + len(events) > max_events:
            raise EventCapReached(user_id, n, max_events, len(events))  # the transaction writes nothing
        conn.executemany(
            "INSERT INTO events (user_id, seq, item_id, rating, timestamp) VALUES (?, ?, ?, ?, ?)",
            [(user_id, n + i, str(e.item_id), float(e.rating), float(e.timestamp)) for i, e in enumerate(events)],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO seen (user_id, item_id) VALUES (?, ?)", [(user_id, str(e.item_id)) for e in events]
        )
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
        rows = (
            self._conn()
            .execute(
                "SELECT item_id, rating, timestamp FROM events WHERE user_id = ? AND seq >= ? ORDER BY seq LIMIT ?",
                (user_id, start, -1 if limit is None else max(int(limit), 0)),
            )
            .fetchall()
        )
        return [Event(i, float(r), float(t)) for i, r, t in rows]

    @staticmethod
    def _count(conn: sqlite3.Connection, user_id: str) -> int:
        row = conn.execute("SELECT n_events FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _seen(conn: sqlite3.Connection, user_id: str) -> list[str]:
        # One row (a JSON array built by SQLite) rather than a row per item: a long seen set reads in
        # one step, and an id may hold any character.
        row = conn.execute("SELECT json_group_array(item_id) FROM seen WHERE user_id = ?", (user_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else []

    @staticmethod
    def _state(conn: sqlite3.Connection, user_id: str) -> StoredState | None:
        row = conn.execute("SELECT model_version, n_events, blob FROM states WHERE user_id = ?", (user_id,)).fetchone()
        return StoredState(row[0], int(row[1]), bytes(row[2])) if row else None

    @_sqlite_faults
    def count_events(self, user_id: str) -> int:
        return self._count(self._conn(), user_id)

    @_sqlite_faults
    def seen_items(self, user_id: str) -> list[str]:
        return self._seen(self._conn(), user_id)

    # -- state cache -----------------------------------------------------------------
    @_sqlite_faults
    def get_state(self, user_id: str) -> StoredState | None:
        return self._state(self._conn(), user_id)

    @_sqlite_faults
    def snapshot(self, user_id: str, with_seen: bool = False) -> UserSnapshot:
        conn = self._conn()
        conn.execute("BEGIN")  # a read transaction: the reads below see the same commit
        try:
            n = self._count(conn, user_id)
            row = conn.execute(
                "SELECT item_id, rating, timestamp FROM events WHERE user_id = ? AND seq = ?", (user_id, n - 1)
            ).fetchone()
            last = Event(row[0], float(row[1]), float(row[2])) if row else None
            return UserSnapshot(self._state(conn, user_id), n, last, self._seen(conn, user_id) if with_seen else None)
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    @_sqlite_faults
    def put_state(self, user_id: str, state: StoredState) -> None:
        # A slower writer must not overwrite a newer state of the same model version.
        conn = self._conn()
        # The state is a cache rebuilt from the events, so its commit skips the fsync (most of its cost).
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._write(conn):
                # Only for a user the store holds: a state computed while the user was erased is dropped.
                conn.execute(
                    "INSERT INTO states (user_id, model_version, n_events, blob) "
                    "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM users WHERE user_id = ?) "
                    "ON CONFLICT(user_id) DO UPDATE SET model_version = excluded.model_version, "
                    "n_events = excluded.n_events, blob = excluded.blob "
                    "WHERE states.model_version != excluded.model_version OR excluded.n_events >= states.n_events",
                    (user_id, state.model_version, int(state.n_events), sqlite3.Binary(state.blob), user_id),
                )
        finally:
            conn.execute("PRAGMA synchronous=FULL")

    # -- erasure and revoked tokens --------------------------------------------------------
    @_sqlite_faults
    def erase_user(self, user_id: str) -> int:
        conn = self._conn()
        with self._write(conn):  # all of the user, or (on any error) nothing
            n = self._count(conn, user_id)
            for table in ("events", "seen", "idempotency", "states", "users"):
                conn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))
        return n

    @_sqlite_faults
    def revoke_token(self, jti: str, expires_at: float) -> None:
        conn = self._conn()
        with self._write(conn):
            conn.execute(
                "INSERT INTO revoked (jti, expires) VALUES (?, ?) "
                "ON CONFLICT(jti) DO UPDATE SET expires = max(expires, excluded.expires)",
                (jti, float(expires_at)),
            )

    @_sqlite_faults
    def revoked_tokens(self) -> set[str]:
        conn = self._conn()
        now = time.time()
        if conn.execute("SELECT 1 FROM revoked WHERE expires < ? LIMIT 1", (now,)).fetchone():
            with self._write(conn):
                conn.execute("DELETE FROM revoked WHERE expires < ?", (now,))
        return {row[0] for row in conn.execute("SELECT jti FROM revoked WHERE expires >= ?", (now,))}

    # -- users -----------------------------------------------------------------------
    @_sqlite_faults
    def users(self, prefix: str = "", limit: int = 50) -> list[tuple[str, int]]:
        rows = (
            self._conn()
            .execute(
                "SELECT user_id, n_events FROM users WHERE substr(user_id, 1, ?) = ? ORDER BY user_id LIMIT ?",
                (len(prefix), prefix, max(int(limit), 0)),
            )
            .fetchall()
        )
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
                    [(user_id, i, str(e.item_id), float(e.rating), float(e.timestamp)) for i, e in enumerate(events)],
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO seen (user_id, item_id) VALUES (?, ?)",
                    [(user_id, str(e.item_id)) for e in events],
                )

    # -- the dataset -----------------------------------------------------------------
    @_sqlite_faults
    def dataset(self) -> DatasetRecord | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'dataset'").fetchone()
        return DatasetRecord.from_json(row[0]) if row else None

    @_sqlite_faults
    def claim_dataset(self, record: DatasetRecord, adopt: bool = False) -> None:
        conn = self._conn()
        with self._write(conn):
            row = conn.execute("SELECT value FROM meta WHERE key = 'dataset'").fetchone()
            held = DatasetRecord.from_json(row[0]) if row else None
            has_users = conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None
            check_claim(f"SQLite store {self.path}", held, record, has_users, adopt)
            if held is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('dataset', ?)", (record.to_json(),))

    # -- items added while serving ------------------------------------------------------
    @_sqlite_faults
    def add_item(self, item: AddedItem, max_items: int | None = None) -> int:
        conn = self._conn()
        with self._write(conn):  # the id's check, the cap's and the insert see one commit
            if conn.execute("SELECT 1 FROM items WHERE item_id = ?", (item.item_id,)).fetchone():
                raise ItemExists(f"item {item.item_id!r} was added before")
            n = conn.execute("SELECT count(*) FROM items").fetchone()[0]
            if max_items is not None and n >= max_items:
                raise ItemCapReached(n, max_items)
            conn.execute(
                "INSERT INTO items (seq, item_id, fields, text_emb) VALUES (?, ?, ?, ?)",
                (n + 1, item.item_id, item.fields_json(), sqlite3.Binary(item.text_emb)),
            )
        return n + 1

    @_sqlite_faults
    def count_items(self) -> int:
        row = self._conn().execute("SELECT max(seq) FROM items").fetchone()
        return int(row[0] or 0)

    @_sqlite_faults
    def items_since(self, start: int, limit: int | None = None) -> list[AddedItem]:
        rows = (
            self._conn()
            .execute(
                "SELECT item_id, fields, text_emb FROM items WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(start), -1 if limit is None else max(int(limit), 0)),
            )
            .fetchall()
        )
        return [AddedItem.from_parts(*row) for row in rows]

    @_sqlite_faults
    def get_item(self, item_id: str) -> AddedItem | None:
        row = (
            self._conn().execute("SELECT item_id, fields, text_emb FROM items WHERE item_id = ?", (item_id,)).fetchone()
        )
        return AddedItem.from_parts(*row) if row else None

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
