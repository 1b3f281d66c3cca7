"""The serving floor benchmark's wrk driver, against a plain local HTTP server (no Ray): what the
Lua script sends, and how wrk's summary is read and pooled."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# The benchmark is a script, not a package: loaded from its file, without putting benchmarks/ on
# sys.path (a module there could shadow a package of the same name for the other test modules).
_spec = importlib.util.spec_from_file_location(
    "serve_floor", Path(__file__).resolve().parents[1] / "benchmarks" / "serve_floor.py"
)
serve_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_floor)
_pooled, run_wrk = serve_floor._pooled, serve_floor.run_wrk

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not on PATH (apt-get install wrk)")


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None, dict]] = []
    fail_every = 0
    shed = False  # every answer a 503 with Retry-After: 1

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get("Authorization"), body))
        bad = self.fail_every and len(self.seen) % self.fail_every == 0
        payload = b'{"items": []}'
        self.send_response(503 if self.shed else 500 if bad else 200)
        if self.shed:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Recorder.seen, _Recorder.fail_every, _Recorder.shed = [], 0, False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@needs_wrk
def test_wrk_sends_the_token_and_known_users_and_counts_failures(server, tmp_path, monkeypatch):
    users = tmp_path / "users.txt"
    users.write_text("17\n42\n")
    monkeypatch.setenv("DYNAMIC_INTEREST_TOKEN", "tok-123")
    r = run_wrk(server, 2, 1.0, users, path="/floor/recommend")
    assert r["requests"] > 0 and r["errors"] == 0 and r["throughput_rps"] > 0
    assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    paths, auths, bodies = zip(*_Recorder.seen)
    assert set(paths) == {"/floor/recommend"} and set(auths) == {"Bearer tok-123"}
    assert {b["user_id"] for b in bodies} <= {"17", "42"} and {b["k"] for b in bodies} == {10}
    _Recorder.seen, _Recorder.fail_every = [], 3  # every third answer a 500
    r = run_wrk(server, 2, 1.0, users)
    assert r["error_kinds"]["status_errors"] > 0 and r["errors"] >= r["error_kinds"]["status_errors"]


@needs_wrk
def test_a_client_that_honours_retry_after_waits_after_each_503(server, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("17\n")
    _Recorder.shed = True
    eager = run_wrk(server, 2, 2.0, users)
    _Recorder.seen = []
    polite = run_wrk(server, 2, 2.0, users, threads=2, honour_retry_after=True)
    # Two connections, each waiting 1 s after every 503: at most a few requests in 2 s.
    assert polite["error_kinds"]["status_errors"] == polite["requests"] <= 6 < eager["requests"]
    assert len(_Recorder.seen) <= 8


def test_rounds_pool_into_one_rate_and_the_median_round():
    runs = [
        {
            "connections": 8,
            "duration_s": 10.0,
            "requests": n,
            "errors": e,
            "mean_ms": p,
            "p50_ms": p,
            "p90_ms": p,
            "p99_ms": p * 2,
            "max_ms": p * 3,
        }
        for n, e, p in ((500, 0, 10.0), (700, 1, 30.0), (600, 0, 20.0))
    ]
    pooled = _pooled(runs)
    assert pooled["throughput_rps"] == pytest.approx(1800 / 30.0)
    assert pooled["p99_ms"] == 40.0 and pooled["max_ms"] == 90.0 and pooled["errors"] == 1 and pooled["rounds"] == 3
