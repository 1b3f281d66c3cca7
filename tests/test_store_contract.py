"""One test suite for every StateStore backend: SQLite in a temporary folder and a real
`redis-server` (AOF, fsync on every write), one for the module, started on a free loopback port.

Besides the protocol's semantics it checks the guarantees the server relies on: several writer
processes lose nothing and keep each user's order, and a writer killed mid-write leaves a
readable store with every acknowledged event. Then what only Redis has, on the same server.
"""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from ray_app.store.base import (
    AddedItem,
    DatasetRecord,
    Event,
    EventCapReached,
    IdempotencyConflict,
    ItemCapReached,
    ItemExists,
    StoredState,
    StoreMismatch,
    UserSnapshot,
)
from ray_app.store.opener import open_store
from store_helpers import (
    SPAWN,
    RedisServer,
    _acking_writer,
    _check_acknowledged,
    _read_log,
    _wait_for_acks,
    ev,
    ids,
    needs_redis,
)

BACKENDS = ["sqlite", pytest.param("redis", marks=needs_redis)]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    server = request.getfixturevalue("redis_server")
    import redis

    with redis.Redis.from_url(server.url) as r:  # every test starts from an empty database
        r.flushall()
    return server.url


@pytest.fixture
def store(url):
    s = open_store(url)
    yield s
    s.close()


# -- semantics ---------------------------------------------------------------------------


def test_round_trip(store):
    assert store.count_events("nobody") == 0 and store.events("nobody") == []
    assert store.append_events("u1", [ev(1), ev(2)]) == 2
    assert store.append_events("u1", [ev(3)]) == 3
    assert store.events("u1") == [ev(1), ev(2), ev(3)]
    assert store.count_events("u1") == 3
    assert store.events("u2") == []


def test_order_and_slices(store):
    expected = [ev(i) for i in range(37)]
    for a, b in [(0, 1), (1, 8), (8, 20), (20, 37)]:
        assert store.append_events("u", expected[a:b]) == b
    for start in (0, 1, 5, 36, 37, 50):
        for limit in (None, 0, 1, 3, 100):
            want = expected[start:] if limit is None else expected[start : start + limit]
            assert store.events("u", start, limit) == want, (start, limit)
    with pytest.raises(ValueError, match="start"):
        store.events("u", -1)


def test_large_append_is_one_call(store):
    # More events than Lua's unpack() takes at once: the Redis script chunks them.
    big = [ev(i) for i in range(9001)]
    assert store.append_events("big", big) == 9001
    assert store.events("big", 8990) == big[8990:]


def test_an_idempotency_key_appends_once(store):
    """A client that retries after the commit (its answer lost) sends the same key: nothing more is
    appended and it gets the first answer; the key is per user; other events under it are refused."""
    assert store.append_once("k", "batch-1", [ev(1), ev(2)]) == (2, False)
    assert store.append_once("k", "batch-1", [ev(1), ev(2)]) == (2, True)  # the retry
    assert store.append_events("k", [ev(3)]) == 3
    assert store.append_once("k", "batch-1", [ev(1), ev(2)]) == (2, True)  # still the first answer
    assert store.append_once("k", "batch-2", [ev(4)]) == (4, False)
    assert store.append_once("other-user", "batch-1", [ev(1), ev(2)]) == (2, False)
    with pytest.raises(IdempotencyConflict, match="batch-1"):
        store.append_once("k", "batch-1", [ev(9)])
    assert store.events("k") == [ev(1), ev(2), ev(3), ev(4)]


def test_state_cache(store):
    assert store.get_state("u") is None
    store.put_state("u", StoredState("v1", 5, b"no events"))  # a user the store does not hold: dropped
    assert store.get_state("u") is None
    store.append_events("u", [ev(1)])
    store.put_state("u", StoredState("v1", 5, b"\x00h5"))
    assert store.get_state("u") == StoredState("v1", 5, b"\x00h5")
    store.put_state("u", StoredState("v1", 4, b"older"))  # a slower replica: ignored
    assert store.get_state("u").n_events == 5
    store.put_state("u", StoredState("v1", 5, b"same n"))  # same position: replaced
    assert store.get_state("u").blob == b"same n"
    store.put_state("u", StoredState("v2", 1, b"new model"))  # another version always replaces
    assert store.get_state("u") == StoredState("v2", 1, b"new model")
    assert store.get_state("other") is None


def test_a_cap_refuses_the_whole_append_and_writes_nothing(store):
    """An append that would take the log past `max_events` is refused whole: the log, the seen set
    and the state stay as they were; a replay of a key used before is still answered."""
    assert store.append_events("c", [ev(1), ev(2)], max_events=3) == 2
    assert store.append_once("c", "key-1", [ev(3)], max_events=3) == (3, False)
    with pytest.raises(EventCapReached, match="holds 3 events and the cap is 3") as e:
        store.append_events("c", [ev(4)], max_events=3)
    assert (e.value.n_events, e.value.cap, e.value.adding) == (3, 3, 1)
    with pytest.raises(EventCapReached):
        store.append_once("c", "key-2", [ev(5), ev(6)], max_events=4)
    assert store.append_once("c", "key-1", [ev(3)], max_events=3) == (3, True)  # the retry of an accepted batch
    assert store.events("c") == [ev(1), ev(2), ev(3)] and sorted(store.seen_items("c")) == ids(1, 2, 3)
    assert store.append_once("c", "key-2", [ev(5)], max_events=4) == (4, False)  # key-2 was never recorded
    with pytest.raises(EventCapReached):
        store.append_events("empty", [ev(1)], max_events=0)
    assert store.count_events("empty") == 0 and store.users("empty") == []


def test_erasing_a_user_removes_events_seen_state_and_idempotency_records(store):
    store.append_once("gone", "key-1", [ev(1), ev(2)])
    store.append_events("gone", [ev(3)])
    store.put_state("gone", StoredState("v1", 3, b"h3"))
    store.append_events("kept", [ev(9)])
    store.put_state("kept", StoredState("v1", 1, b"h1"))
    assert store.erase_user("gone") == 3
    assert store.snapshot("gone", with_seen=True) == UserSnapshot(None, 0, None, [])
    assert [u for u, _ in store.users()] == ["kept"]
    # The key is forgotten with the user: the same batch is a new append, not a replay.
    assert store.append_once("gone", "key-1", [ev(1), ev(2)]) == (2, False)
    store.put_state("gone", StoredState("v1", 2, b"h2"))
    assert store.erase_user("gone") == 2 and store.get_state("gone") is None
    store.put_state("gone", StoredState("v1", 2, b"late"))  # a state computed before the erasure: dropped
    assert store.get_state("gone") is None and store.erase_user("gone") == 0
    assert store.events("kept") == [ev(9)] and store.get_state("kept") == StoredState("v1", 1, b"h1")


def test_revoked_token_ids_are_kept_until_their_tokens_expire(store):
    import time

    now = time.time()
    store.revoke_token("jti-live", now + 3600)
    store.revoke_token("jti-expired", now - 1)
    store.revoke_token("jti-live", now + 10)  # a second revocation never shortens the first
    assert store.revoked_tokens() == {"jti-live"}


def test_a_snapshot_reads_state_length_last_event_and_seen_together(store):
    """What serving reads before ranking, in one call: each part as the single-purpose reads give it."""
    assert store.snapshot("nobody", with_seen=True) == UserSnapshot(None, 0, None, [])
    assert store.snapshot("nobody") == UserSnapshot(None, 0, None, None)
    store.append_events("s", [ev(1), ev(2), ev(1)])
    store.put_state("s", StoredState("v1", 2, b"h2"))
    snap = store.snapshot("s", with_seen=True)
    assert (snap.state, snap.n_events, snap.last_event) == (StoredState("v1", 2, b"h2"), 3, ev(1))
    assert sorted(snap.seen) == ids(1, 2) and snap.seen == store.seen_items("s")
    store.append_once("s", "key-1", [ev(7)])
    assert store.snapshot("s") == UserSnapshot(StoredState("v1", 2, b"h2"), 4, ev(7), None)


def test_a_sqlite_transaction_left_open_does_not_break_later_calls(tmp_path):
    """A transaction an earlier failure left open on the thread's connection does not make every
    later call on that thread fail ("cannot start a transaction within a transaction")."""
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        store.append_events("u", [ev(1)])
        store._local.conn.execute("BEGIN")
        assert store.snapshot("u").n_events == 1 and not store._local.conn.in_transaction
        store._local.conn.execute("BEGIN")
        assert store.append_events("u", [ev(2)]) == 2 and not store._local.conn.in_transaction
    finally:
        store.close()


def test_users_prefix_order_limit(store):
    ids = ["bob", "alice", "al", "b", "ålex", "Zed", "alfred"]
    for n, u in enumerate(ids, start=1):
        store.append_events(u, [ev(i) for i in range(n)])
    counts = {u: n for n, u in enumerate(ids, start=1)}
    by_bytes = sorted(ids, key=lambda u: u.encode())  # both backends order by UTF-8 bytes
    assert store.users() == [(u, counts[u]) for u in by_bytes]
    assert store.users("al") == [(u, counts[u]) for u in by_bytes if u.startswith("al")]
    assert store.users("b", limit=1) == [("b", counts["b"])]
    assert store.users("nobody") == [] and store.users(limit=0) == []


def test_bulk_load_is_idempotent(store):
    store.append_events("live", [ev(100)])
    store.bulk_load({"a": [ev(1), ev(2)], "b": [ev(3)], "live": [ev(7), ev(8)], "empty": []})
    snapshot = {u: store.events(u) for u in ("a", "b", "live", "empty")}
    assert snapshot == {"a": [ev(1), ev(2)], "b": [ev(3)], "live": [ev(100)], "empty": []}
    store.bulk_load({"a": [ev(9)], "b": [ev(9), ev(9)], "c": [ev(4)]})  # a reload adds only "c"
    assert {u: store.events(u) for u in snapshot} == snapshot
    assert store.users() == [("a", 2), ("b", 1), ("c", 1), ("empty", 0), ("live", 1)]
    assert store.append_events("a", [ev(5)]) == 3


def test_seen_items_follow_every_kind_of_append(store):
    """The seen set is kept beside the log by every write: appends, keyed appends, bulk loads, and
    large appends that the Redis scripts chunk; a repeated item counts once."""
    assert store.seen_items("nobody") == []
    store.append_events("s", [ev(1), ev(2), ev(1)])
    store.append_once("s", "key-1", [ev(3)])
    store.append_once("s", "key-1", [ev(3)])  # the retry adds nothing
    store.bulk_load({"s": [ev(50)], "t": [ev(4), ev(4), ev(5)]})  # "s" is known: not reloaded
    assert sorted(store.seen_items("s")) == ids(1, 2, 3)
    assert sorted(store.seen_items("t")) == ids(4, 5)
    big = [ev(i % 9001) for i in range(9001)]
    store.append_events("big", big)
    assert sorted(store.seen_items("big")) == sorted({e.item_id for e in big})


# The schema of a store written while item ids were integers (before `PRAGMA user_version` 2),
# without the tables that did not change.
V1_SCHEMA = """
CREATE TABLE users (user_id TEXT PRIMARY KEY, n_events INTEGER NOT NULL);
CREATE TABLE events (user_id TEXT NOT NULL, seq INTEGER NOT NULL, item_id INTEGER NOT NULL,
    rating REAL NOT NULL, timestamp REAL NOT NULL, PRIMARY KEY (user_id, seq)) WITHOUT ROWID;
CREATE TABLE seen (user_id TEXT NOT NULL, item_id INTEGER NOT NULL, PRIMARY KEY (user_id, item_id)) WITHOUT ROWID;
CREATE TABLE idempotency (user_id TEXT NOT NULL, key TEXT NOT NULL, digest TEXT NOT NULL,
    n_events INTEGER NOT NULL, created REAL NOT NULL, PRIMARY KEY (user_id, key)) WITHOUT ROWID;
"""


def v1_store(path, events: dict[str, list], seen_table: bool = True) -> None:
    """A SQLite store as the integer-id code wrote it: `events` {user: [(int id, rating, time)]}."""
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA if seen_table else V1_SCHEMA.replace("CREATE TABLE seen", "CREATE TABLE x"))
        for user, evs in events.items():
            conn.execute("INSERT INTO users VALUES (?, ?)", (user, len(evs)))
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", [(user, i, *e) for i, e in enumerate(evs)])
            if seen_table:
                conn.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", [(user, e[0]) for e in evs])
    conn.close()


def test_a_sqlite_store_of_integer_ids_is_migrated_to_text_ids_when_opened(tmp_path):
    """Each stored id becomes its decimal string (the source id it stood for), the seen set too (and
    filled from the log for a store from before the seen table); then an IMDb id keeps its zero,
    and an Idempotency-Key recorded before the change still answers its retry."""
    import struct
    import time

    for seen_table in (True, False):
        path = tmp_path / f"v1-{seen_table}.db"
        v1_store(path, {"old": [(1, 4.0, 1.7e9), (133093, 3.5, 1.7e9 + 60), (1, 5.0, 1.7e9 + 120)]}, seen_table)
        retry = [Event("7", 4.0, 1.7e9 + 180)]
        digest = hashlib.sha256(struct.pack("<qdd", 7, 4.0, 1.7e9 + 180)).hexdigest()  # as recorded then
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO idempotency VALUES ('old', 'key-1', ?, 4, ?)", (digest, time.time()))
        conn.close()
        store = open_store(f"sqlite:///{path}")
        try:
            assert store.events("old") == [
                Event("1", 4.0, 1.7e9),
                Event("133093", 3.5, 1.7e9 + 60),
                Event("1", 5.0, 1.7e9 + 120),
            ]
            assert sorted(store.seen_items("old")) == ["1", "133093"]
            assert store.append_once("old", "key-1", retry) == (4, True)  # a replay, not a conflict
            assert store.append_events("old", [Event("0133093", 4.5, 1.7e9 + 240)]) == 4
            assert store.events("old", 3)[0].item_id == "0133093"
            assert sorted(store.seen_items("old")) == ["0133093", "1", "133093"]
        finally:
            store.close()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
            types = conn.execute("SELECT DISTINCT typeof(item_id) FROM events UNION SELECT typeof(item_id) FROM seen")
            assert [t for (t,) in types] == ["text"]
        conn.close()
        again = open_store(f"sqlite:///{path}")
        assert again.events("old")[3].item_id == "0133093"  # opened again: as it was
        again.close()


@needs_redis
def test_a_sqlite_store_of_version_2_gets_the_items_table_and_keeps_its_events(tmp_path):
    path = tmp_path / "v2.db"
    store = open_store(f"sqlite:///{path}")
    store.append_events("u", [ev(1), ev(2)])
    store.close()
    with sqlite3.connect(path) as conn:  # a store as version 2 wrote it: no items table
        conn.execute("DROP TABLE items")
        conn.execute("PRAGMA user_version = 2")
    conn.close()
    store = open_store(f"sqlite:///{path}")
    try:
        assert store.events("u") == [ev(1), ev(2)] and store.seen_items("u") != []
        assert store.add_item(_item("new", 1)) == 1 and store.count_items() == 1
    finally:
        store.close()


def test_a_redis_log_from_before_the_seen_sets_is_filled_on_first_use(redis_server):
    store = open_store(redis_server.url)
    try:
        store.append_events("old-r", [ev(7), ev(8)])
        store._r.delete(store._seen("old-r"))
        assert sorted(store.snapshot("old-r", with_seen=True).seen) == ids(7, 8)  # filled by the snapshot too
        store._r.delete(store._seen("old-r"))
        assert sorted(store.seen_items("old-r")) == ids(7, 8)
        assert sorted(i.decode() for i in store._r.smembers(store._seen("old-r"))) == ids(7, 8)
    finally:
        store.close()


@needs_redis
def test_a_redis_store_of_integer_ids_is_read_as_text_ids(redis_server):
    """Events packed while ids were integers (24 bytes: int64 id, rating, time) read as the ids'
    decimal strings beside those written since; their seen set (the ids' decimal text) too."""
    import struct

    store = open_store(redis_server.url)
    try:
        store._r.flushall()
        store._r.rpush(
            store._ev("old"), struct.pack("<qdd", 7, 4.0, 1.7e9), struct.pack("<qdd", 133093, 3.0, 1.7e9 + 1)
        )
        store._r.sadd(store._seen("old"), 7, 133093)
        store._r.zadd(store._users, {"old": 0})
        assert store.events("old") == [Event("7", 4.0, 1.7e9), Event("133093", 3.0, 1.7e9 + 1)]
        assert store.append_events("old", [Event("0133093", 5.0, 1.7e9 + 2)]) == 3
        assert [e.item_id for e in store.events("old")] == ["7", "133093", "0133093"]
        assert sorted(store.snapshot("old", with_seen=True).seen) == ["0133093", "133093", "7"]
    finally:
        store.close()


def test_item_ids_come_back_as_written(store):
    """Text ids, whatever they hold: leading zeros, a comma, non-ASCII, the longest the API takes."""
    from ray_app.serve.schemas import MAX_ITEM_ID_CHARS

    odd = ["0133093", "133093", "a,b", "é 1", "x" * MAX_ITEM_ID_CHARS, "7"]
    events = [Event(i, 4.0, 1.7e9 + j) for j, i in enumerate(odd)]
    assert store.append_events("u", events[:3]) == 3
    assert store.append_once("u", "key-1", events[3:]) == (6, False)
    assert store.append_once("u", "key-1", events[3:]) == (6, True)
    store.bulk_load({"v": events})
    assert store.events("u") == events and store.events("v") == events
    assert sorted(store.seen_items("u")) == sorted(odd) and sorted(store.snapshot("v", True).seen) == sorted(odd)
    assert store.snapshot("u").last_event == events[-1]


def _item(item_id: str, j: int) -> AddedItem:
    emb = bytes(range(256)) * 6  # 384 float32 would be 1536 bytes: any bytes must come back exactly
    return AddedItem(item_id, f"Title {j} é", ("Comedy",), ("tag, a", "b"), "A description.", emb, 1.7e9 + j)


def test_added_items_are_numbered_in_order_unique_and_capped(store):
    """Items added while serving: numbered 1, 2, ... in the order of their adds, read back exactly
    from any place, an id taken is refused, and so is an add past the cap; a refusal writes nothing."""
    assert store.count_items() == 0 and store.items_since(0) == [] and store.get_item("x") is None
    added = [_item(i, j) for j, i in enumerate(["0133093", "new,1", "é 2"])]
    assert [store.add_item(item, max_items=3) for item in added] == [1, 2, 3]
    with pytest.raises(ItemExists, match="'new,1'"):
        store.add_item(_item("new,1", 9))
    with pytest.raises(ItemCapReached, match="holds 3 added items.*\\(3\\)"):
        store.add_item(_item("other", 9), max_items=3)
    assert store.count_items() == 3
    assert store.items_since(0) == added and store.items_since(1) == added[1:] and store.items_since(3) == []
    assert store.items_since(1, limit=1) == added[1:2]
    assert store.get_item("new,1") == added[1] and store.get_item("other") is None
    assert store.add_item(_item("other", 9)) == 4  # no cap: taken


def test_a_store_records_the_dataset_it_was_loaded_for(store):
    """The first claim records the dataset; the same one again is fine; another is refused, writing
    nothing; a store that holds users but records none is refused unless adopted."""
    synthetic = DatasetRecord("synthetic", "a" * 64, "b" * 64)
    movielens = DatasetRecord("ml-latest-small", "c" * 64, "d" * 64)
    assert store.dataset() is None
    store.claim_dataset(synthetic)
    store.claim_dataset(synthetic)
    store.append_events("1", [ev(1)])
    with pytest.raises(StoreMismatch, match="loaded for dataset 'synthetic'.*not 'ml-latest-small'"):
        store.claim_dataset(movielens)
    with pytest.raises(StoreMismatch):
        store.claim_dataset(movielens, adopt=True)  # adopting is for a store that records none
    assert store.dataset() == synthetic


def test_a_store_with_users_and_no_dataset_is_adopted_only_when_asked(store):
    movielens = DatasetRecord("ml-latest-small", "c" * 64, "d" * 64)
    store.append_events("1", [ev(1)])  # loaded before stores recorded their dataset
    with pytest.raises(StoreMismatch, match="records no dataset.*--adopt"):
        store.claim_dataset(movielens)
    assert store.dataset() is None
    store.claim_dataset(movielens, adopt=True)
    assert store.dataset() == movielens


# -- several processes -------------------------------------------------------------------

N_PROCS, N_EVENTS = 4, 200


def _writer(url: str, proc: int, out) -> None:
    """Append N_EVENTS events of this process to a shared user and to its own, in batches of 1-3."""
    store = open_store(url)
    totals, i = [], 0
    while i < N_EVENTS:
        batch = [ev(proc * 10_000 + j) for j in range(i, min(i + 1 + i % 3, N_EVENTS))]
        totals.append((len(batch), store.append_events("shared", batch)))
        store.append_events(f"own{proc}", batch)
        i += len(batch)
    store.close()
    out.send(totals)


def test_concurrent_writers_lose_nothing(url):
    pipes, procs = [], []
    for p in range(N_PROCS):
        recv, send = SPAWN.Pipe(duplex=False)
        procs.append(SPAWN.Process(target=_writer, args=(url, p, send)))
        pipes.append(recv)
    for proc in procs:
        proc.start()
    totals = [r.recv() for r in pipes]
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    store = open_store(url)
    try:
        shared = store.events("shared")
        assert len(shared) == store.count_events("shared") == N_PROCS * N_EVENTS
        for p in range(N_PROCS):
            mine = [ev(p * 10_000 + j) for j in range(N_EVENTS)]
            assert [e for e in shared if int(e.item_id) // 10_000 == p] == mine  # per-writer order kept
            assert store.events(f"own{p}") == mine
        # Each returned total is the count right after that batch: the batches tile 1..N exactly.
        spans = sorted((total - n + 1, total + 1) for calls in totals for n, total in calls)
        assert [k for a, b in spans for k in range(a, b)] == list(range(1, N_PROCS * N_EVENTS + 1))
    finally:
        store.close()


def _state_writer(url: str, proc: int, n: int) -> None:
    """Cache writes of a replica: states 0..n-1 of model v1, upwards (proc 0) or downwards (proc 1),
    as a slow replica would write stale states after a fast one."""
    store = open_store(url)
    for i in range(n) if proc == 0 else reversed(range(n)):
        store.put_state("cached", StoredState("v1", i, f"{proc}:{i}".encode()))
    store.close()


def test_concurrent_state_writers_never_go_backwards(url):
    # Two replicas racing on one user's cache: whatever the interleaving, the newest survives.
    seed = open_store(url)
    seed.append_events("cached", [ev(0)])  # a state is cached only for a user the store holds
    seed.close()
    procs = [SPAWN.Process(target=_state_writer, args=(url, p, 150)) for p in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    store = open_store(url)
    try:
        state = store.get_state("cached")
        assert state.n_events == 149 and state.blob in (b"0:149", b"1:149")
    finally:
        store.close()


def test_writer_killed_mid_write(url, tmp_path):
    log = tmp_path / "acks.log"
    writer = SPAWN.Process(target=_acking_writer, args=(url, str(log), 1_000_000))
    writer.start()
    try:
        _wait_for_acks(log, 50, writer)
    finally:
        writer.kill()  # SIGKILL, most likely inside an append
        writer.join()
    acked, _ = _read_log(log)
    store = open_store(url)
    try:
        stored = _check_acknowledged(store, acked, max(acked) + 2)
        assert len(stored) >= len(acked) >= 50
        assert store.append_events("w", [ev(10**7)]) == len(stored) + 1  # still writable
    finally:
        store.close()
    if url.startswith("sqlite"):
        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# -- Redis only, on the suite's server ----------------------------------------------------------


@needs_redis
def test_redis_append_is_exactly_once_under_retry(redis_server):
    store = open_store(redis_server.url)
    try:
        store.append_events("r", [ev(1)])
        raw = [ev(2)]
        # A retried call carries the same token: the second run only reads the count.
        assert store._append_once("r", raw, "token-1") == 2
        assert store._append_once("r", raw, "token-1") == 2
        assert store.events("r") == [ev(1), ev(2)]
        assert sorted(store.seen_items("r")) == ids(1, 2)
    finally:
        store.close()


@needs_redis
def test_redis_reports_durability(redis_server):
    import redis

    store = open_store(redis_server.url)
    assert store.durable is True
    with redis.Redis.from_url(redis_server.url) as r:
        r.config_set("appendfsync", "everysec")
        try:
            relaxed = open_store(redis_server.url)
            assert relaxed.durable is False
            relaxed.close()
        finally:
            r.config_set("appendfsync", "always")
    store.close()


@needs_redis
def test_a_full_redis_refuses_writes_rather_than_evicting_events(redis_server):
    import redis

    from ray_app.store.base import StoreUnavailable

    store = open_store(redis_server.url)
    store.append_events("kept", [ev(i) for i in range(50)])
    with redis.Redis.from_url(redis_server.url) as r:
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", max(int(r.info("memory")["used_memory"]) - 1, 1))
        try:
            with pytest.raises(StoreUnavailable, match="OutOfMemoryError.*maxmemory"):
                store.append_events("more", [ev(i) for i in range(1000)])
        finally:
            r.config_set("maxmemory", 0)
    assert store.events("kept") == [ev(i) for i in range(50)] and store.count_events("more") == 0
    store.close()
