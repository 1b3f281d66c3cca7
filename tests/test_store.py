"""One test suite for every StateStore backend: SQLite in a temporary folder and a real
`redis-server` (AOF, fsync on every write) started on a free loopback port.

Besides the protocol's semantics it checks the guarantees the server relies on: several writer
processes lose nothing and keep each user's order, a writer killed mid-write leaves a readable
store with every acknowledged event, and `kill -9` of redis-server loses no acknowledged event.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from ray_app.store.base import Event, IdempotencyConflict, StoredState
from ray_app.store.sqlite import SQLiteStore
from ray_app.store.opener import open_store

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not on PATH (apt-get install redis-server)"
)
BACKENDS = ["sqlite", pytest.param("redis", marks=needs_redis)]
SPAWN = mp.get_context("spawn")  # no fork of a process that holds store connections or threads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on loopback with its data in `dir`; `kill()` is SIGKILL, `start()` reuses the dir."""

    def __init__(self, dir: Path):
        self.dir, self.port = dir, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--logfile",
                "redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):  # -LOADING while it replays the AOF
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


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


def ev(i: int, t0: float = 1.7e9) -> Event:
    # Timestamps with a fraction: the round trip must be exact, not rounded to seconds.
    return Event(item_id=i, rating=0.5 + (i % 10) * 0.5, timestamp=t0 + i * 61.123456)


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
    store.put_state("u", StoredState("v1", 5, b"\x00h5"))
    assert store.get_state("u") == StoredState("v1", 5, b"\x00h5")
    store.put_state("u", StoredState("v1", 4, b"older"))  # a slower replica: ignored
    assert store.get_state("u").n_events == 5
    store.put_state("u", StoredState("v1", 5, b"same n"))  # same position: replaced
    assert store.get_state("u").blob == b"same n"
    store.put_state("u", StoredState("v2", 1, b"new model"))  # another version always replaces
    assert store.get_state("u") == StoredState("v2", 1, b"new model")
    assert store.get_state("other") is None


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
    assert sorted(store.seen_items("s")) == [1, 2, 3]
    assert sorted(store.seen_items("t")) == [4, 5]
    big = [ev(i % 9001) for i in range(9001)]
    store.append_events("big", big)
    assert sorted(store.seen_items("big")) == sorted({e.item_id for e in big})


def test_a_store_from_before_the_seen_sets_is_filled_on_first_use(tmp_path, request):
    """An event log written before the seen sets existed: its seen set is filled from the log
    (SQLite at open, Redis on the first read), not left empty."""
    path = tmp_path / "old.db"
    store = open_store(f"sqlite:///{path}")
    store.append_events("old", [ev(1), ev(2), ev(1)])
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE seen")
    store = open_store(f"sqlite:///{path}")
    try:
        assert sorted(store.seen_items("old")) == [1, 2]
    finally:
        store.close()
    if REDIS_SERVER is not None:
        server = request.getfixturevalue("redis_server")
        store = open_store(server.url)
        try:
            store.append_events("old-r", [ev(7), ev(8)])
            store._r.delete(store._seen("old-r"))
            assert sorted(store.seen_items("old-r")) == [7, 8]
            assert sorted(int(i) for i in store._r.smembers(store._seen("old-r"))) == [7, 8]
        finally:
            store.close()


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
            assert [e for e in shared if e.item_id // 10_000 == p] == mine  # per-writer order kept
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


def _acking_writer(url: str, log_path: str, n: int) -> None:
    """Append events 0..n-1 one by one; after each returned append write `ok i total` (or `err i`)."""
    store = open_store(url)
    with open(log_path, "a", buffering=1) as log:
        for i in range(n):
            try:
                total = store.append_events("w", [ev(i)])
            except Exception as e:  # noqa: BLE001 - an unacknowledged attempt is recorded, not retried
                log.write(f"err {i} {type(e).__name__}\n")
                continue
            log.write(f"ok {i} {total}\n")


def _read_log(path: Path) -> tuple[list[int], list[int]]:
    acked, failed = [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ok":
            acked.append(int(parts[1]))
        elif len(parts) == 3 and parts[0] == "err":
            failed.append(int(parts[1]))
    return acked, failed


def _wait_for_acks(path: Path, n: int, proc, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(_read_log(path)[0]) >= n:
            return
        assert proc.is_alive(), "writer exited early"
        time.sleep(0.01)
    raise AssertionError(f"writer did not acknowledge {n} events in {timeout_s} s")


def _check_acknowledged(store, acked: list[int], attempted: int) -> list[int]:
    """Every acknowledged event is stored, in order, once; nothing stored was never attempted."""
    stored = [e.item_id for e in store.events("w")]
    assert stored == sorted(set(stored)), "an event is duplicated or out of order"
    assert set(acked) <= set(stored), f"acknowledged but lost: {sorted(set(acked) - set(stored))[:10]}"
    assert set(stored) <= set(range(attempted))
    assert store.events("w") == [ev(i) for i in stored]
    assert store.count_events("w") == len(stored)
    return stored


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


# -- Redis only ----------------------------------------------------------------------------


@needs_redis
def test_redis_restart_mid_run_loses_no_acknowledged_event(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    log, n = tmp_path / "acks.log", 600
    writer = SPAWN.Process(target=_acking_writer, args=(server.url, str(log), n))
    writer.start()
    try:
        _wait_for_acks(log, 100, writer)
        server.kill()  # kill -9: only what reached the AOF survives
        killed_at = len(_read_log(log)[0])
        time.sleep(0.3)
        server.start()  # same port, same dir: replays the AOF
        writer.join(60)
        assert writer.exitcode == 0
    finally:
        if writer.is_alive():
            writer.kill()
        server.stop()
    acked, failed = _read_log(log)
    assert len(acked) > killed_at, "no append was acknowledged after the restart"
    assert len(acked) + len(failed) == n
    server.start()  # once more, so the check reads only what was on disk
    store = open_store(server.url)
    try:
        stored = _check_acknowledged(store, acked, n)
        assert len(stored) >= len(acked)
    finally:
        store.close()
        server.stop()


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
        assert sorted(store.seen_items("r")) == [1, 2]
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


def test_unreachable_redis_names_the_url():
    url = f"redis://127.0.0.1:{_free_port()}/0"
    from ray_app.store.redis import RedisStore

    with pytest.raises(ConnectionError, match=re.escape(url)):
        RedisStore(url, retries=0)


def test_wal_switch_is_retried_while_another_opener_holds_the_file(tmp_path):
    """Replicas opening a new file at once can see "database is locked" from the WAL switch itself."""
    store = SQLiteStore(str(tmp_path / "s.db"))

    class Racing:
        def __init__(self, failures: int, message: str = "database is locked"):
            self.failures, self.message, self.calls = failures, message, 0

        def execute(self, sql):
            self.calls += 1
            if self.calls <= self.failures:
                raise sqlite3.OperationalError(self.message)

    racing = Racing(3)
    store._enable_wal(racing)
    assert racing.calls == 4
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):  # other errors are not retried
        store._enable_wal(Racing(1, "disk I/O error"))
    store.close()


# -- faults: a clear StoreUnavailable, and nothing acknowledged is lost ------------------------------


def test_a_full_sqlite_store_refuses_the_write_and_keeps_the_old_data(tmp_path):
    from ray_app.store.base import StoreUnavailable

    store = SQLiteStore(str(tmp_path / "s.db"))
    store.append_events("u", [ev(i) for i in range(5)])
    conn = store._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")  # the size limit: this file cannot grow
    with pytest.raises(StoreUnavailable, match=re.escape(str(tmp_path / "s.db")) + ".*full"):
        store.append_events("u", [ev(i) for i in range(5, 2000)])
    assert store.events("u") == [ev(i) for i in range(5)] and store.count_events("u") == 5
    store.ping()  # still answers reads
    store.close()


def test_a_corrupt_sqlite_file_is_reported_by_name_at_start(tmp_path):
    from ray_app.store.base import StoreUnavailable

    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is no database, " * 200)
    with pytest.raises(StoreUnavailable, match=re.escape(str(bad)) + ".*cannot be opened"):
        open_store(f"sqlite:///{bad}")
    assert bad.read_bytes().startswith(b"this is no database")  # left as it was, for a look


@needs_redis
def test_a_stopped_redis_is_unavailable_not_a_hang(tmp_path):
    from ray_app.store.base import StoreUnavailable

    server = RedisServer(tmp_path)
    server.start()
    store = open_store(server.url)
    store.append_events("u", [ev(1)])
    server.stop()
    t0 = time.monotonic()
    for call in (lambda: store.events("u"), lambda: store.append_events("u", [ev(2)]), store.ping):
        with pytest.raises(StoreUnavailable, match=re.escape(server.url) + ".*unreachable"):
            call()
    assert time.monotonic() - t0 < 30  # the retries give up within seconds each
    server.start()
    assert store.events("u") == [ev(1)]  # back: nothing was lost, nothing half-written
    store.close()
    server.stop()


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
