"""State-store throughput and latency: SQLite (WAL, synchronous=FULL) against Redis (AOF,
`appendfsync always`, and `everysec` as the price of per-write durability), same process.

Per backend: one process appending single events round-robin over users (what
`POST /users/{id}/events` does), the same from several processes at once, reading a user's
last 50 events, and state-cache writes/reads of an LSTM-sized blob. Redis runs as a local
`redis-server` on loopback with its data in a temporary folder, like SQLite's file.

    python benchmarks/store.py [--appends 2000] [--procs 4]   -> benchmarks/results/store.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_common import RESULTS, command_line, machine, percentiles  # noqa: E402

from ray_app.store.base import Event, StoredState  # noqa: E402
from ray_app.store.opener import open_store  # noqa: E402
from models.files import write_json

USERS = 20
BLOB = bytes(2 * 256 * 4)  # (h, c) of a 256-unit LSTM as float32


def start_redis(dir: Path, port: int, fsync: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            shutil.which("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            fsync,
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            open_store(f"redis://127.0.0.1:{port}/0").close()
            return proc
        except ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def appends(url: str, n: int, proc: int = 0, go=None) -> tuple[list[float], float, float]:
    """n single-event appends -> (latencies, start, end); `go` (an Event) holds the start."""
    store = open_store(url)
    store.count_events("warm-up")  # connect before the clock starts
    if go is not None:
        go.wait()
    lat, start = [], time.time()
    for i in range(n):
        t = time.perf_counter()
        store.append_events(f"p{proc}-u{i % USERS}", [Event(str(i), 4.0, 1.7e9 + i)])
        lat.append(time.perf_counter() - t)
    end = time.time()
    store.close()
    return lat, start, end


def _worker(url: str, n: int, proc: int, ready, go, out) -> None:
    ready.release()
    _, start, end = appends(url, n, proc, go)
    out.send((start, end))


def parallel_appends(url: str, n: int, procs: int) -> dict:
    """procs processes append at once (started together): aggregate appends/s."""
    ctx = mp.get_context("spawn")
    ready, go = ctx.Semaphore(0), ctx.Event()
    pipes, workers = [], []
    for p in range(procs):
        recv, send = ctx.Pipe(duplex=False)
        workers.append(ctx.Process(target=_worker, args=(url, n, 100 + p, ready, go, send)))
        pipes.append(recv)
    for w in workers:
        w.start()
    for _ in workers:
        ready.acquire()
    time.sleep(0.5)  # every worker connected and waiting
    go.set()
    spans = [r.recv() for r in pipes]
    for w in workers:
        w.join()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"procs": procs, "appends": n * procs, "per_s": n * procs / wall}


def measure(url: str, n: int, procs: int) -> dict:
    single, start, end = appends(url, n)
    store = open_store(url)
    reads, puts, gets = [], [], []
    for i in range(n):
        user = f"p0-u{i % USERS}"
        t = time.perf_counter()
        store.events(user, max(store.count_events(user) - 50, 0))
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.put_state(user, StoredState("v1", i, BLOB))
        puts.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.get_state(user)
        gets.append(time.perf_counter() - t)
    store.close()
    return {
        "append_1_event": {**percentiles(single), "per_s": n / (end - start)},
        "append_parallel": parallel_appends(url, n // procs, procs),
        "read_last_50": percentiles(reads),
        "put_state": percentiles(puts),
        "get_state": percentiles(gets),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--appends", type=int, default=2000)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS / "store.json")
    a = p.parse_args(argv)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(Path.cwd())], capture_output=True, text=True).stdout.strip()
    result = {
        "machine": {**machine(), "filesystem": fs},
        "command": command_line(),
        "appends": a.appends,
        "backends": {},
    }
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # on the project's disk, not tmpfs
        tmp = Path(tmp)
        result["backends"]["sqlite"] = measure(f"sqlite:///{tmp}/state.db", a.appends, a.procs)
        for port, fsync in ((16391, "always"), (16392, "everysec")):
            (tmp / fsync).mkdir()
            server = start_redis(tmp / fsync, port, fsync)
            try:
                result["backends"][f"redis_fsync_{fsync}"] = measure(f"redis://127.0.0.1:{port}/0", a.appends, a.procs)
            finally:
                server.terminate()
                server.wait()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result, indent=2)
    for name, r in result["backends"].items():
        print(
            f"{name:22s} append {r['append_1_event']['per_s']:8.0f}/s (p50 {r['append_1_event']['p50_ms']:.2f} ms, "
            f"p99 {r['append_1_event']['p99_ms']:.2f} ms)  x{a.procs} procs "
            f"{r['append_parallel']['per_s']:8.0f}/s  read-50 p50 {r['read_last_50']['p50_ms']:.2f} ms  "
            f"put_state p50 {r['put_state']['p50_ms']:.2f} ms"
        )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
