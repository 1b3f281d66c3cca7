"""What the StateStore tests share: a real `redis-server` (AOF, fsync on every write) on a free
loopback port, the events they write, and a writer process that logs each acknowledged append."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ray_app.store.base import Event
from ray_app.store.opener import open_store

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not on PATH (apt-get install redis-server)"
)
SPAWN = mp.get_context("spawn")  # no fork of a process that holds store connections or threads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on loopback with its data in `dir`; `kill()` is SIGKILL, `start()` reuses the dir."""

    def __init__(self, dir: Path):
        self.dir, self.port = dir, free_port()
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


def ev(i: int, t0: float = 1.7e9) -> Event:
    # Ids as IMDb writes them, with leading zeros (they must come back as written); timestamps with
    # a fraction: the round trip must be exact, not rounded to seconds.
    return Event(item_id=f"{i:07d}", rating=0.5 + (i % 10) * 0.5, timestamp=t0 + i * 61.123456)


def ids(*numbers: int) -> list[str]:
    """The item ids of `ev(n)` for each n, in that order."""
    return [ev(n).item_id for n in numbers]


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
    stored = [int(e.item_id) for e in store.events("w")]
    assert stored == sorted(set(stored)), "an event is duplicated or out of order"
    assert set(acked) <= set(stored), f"acknowledged but lost: {sorted(set(acked) - set(stored))[:10]}"
    assert set(stored) <= set(range(attempted))
    assert store.events("w") == [ev(i) for i in stored]
    assert store.count_events("w") == len(stored)
    return stored
