"""The StateStore when things go wrong, each on a server or file of its own: `kill -9` of
redis-server loses no acknowledged event, an unreachable or stopped Redis is a clear error rather
than a hang, SQLite retries the WAL switch of racing openers, and a full or corrupt SQLite file
is a StoreUnavailable that names it.
"""

from __future__ import annotations

import re
import sqlite3
import time

import pytest

from ray_app.store.base import StoreUnavailable
from ray_app.store.opener import open_store
from ray_app.store.sqlite import SQLiteStore
from store_helpers import (
    SPAWN,
    RedisServer,
    _acking_writer,
    _check_acknowledged,
    _read_log,
    _wait_for_acks,
    ev,
    free_port,
    needs_redis,
)


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


def test_an_unreachable_redis_opens_and_each_call_names_the_url():
    """A replica starts while Redis is down: opening contacts nobody, each call is a StoreUnavailable."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    from ray_app.store.redis import RedisStore

    store = RedisStore(url, retries=0)
    for call in (lambda: store.count_events("u"), store.ping, lambda: store.durable):
        with pytest.raises(StoreUnavailable, match=re.escape(url)):
            call()


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
