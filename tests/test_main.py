"""The README's first command, end to end: set up, prepare, train, evaluate, serve, demo, Ctrl-C.

The job runs as the README shows it (`bash scripts/main.sh`), with `--smoke` for a small budget
and `--runs-dir` in a temporary folder (never the checkout's runs/, which holds a user's own
secret, token and stores); on CI this is a clean clone, so `scripts/setup.sh` has just built a
clean virtual environment.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from main_job import main as main_job
from ray_app.serve.auth import SECRET_ENV

ROOT = Path(__file__).resolve().parents[1]
# What Ray's own processes print when their logs reach the console.
RAY_INTERNALS = re.compile(
    r"TrainingReport\(|Checkpoint successfully created|TrainController|\(pid=|RayTrainWorker|"
    r"ServeController|ProxyActor|ServeReplica|INFO worker\.py|StorageContext"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the main job exited early with status {proc.returncode}"
        try:
            r = httpx.get(url, timeout=3.0)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_first_command_serves_the_api_and_the_demo(tmp_path, encoder_cache):
    api_port, demo_port = free_port(), free_port()
    log, runs = tmp_path / "main.log", tmp_path / "runs"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop(SECRET_ENV, None)  # the job makes (or reuses) its own secret, as for a newcomer
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                "bash",
                "scripts/main.sh",
                "--smoke",
                "--port",
                str(api_port),
                "--demo-port",
                str(demo_port),
                "--num-cpus",
                "2",
                "--runs-dir",
                str(runs),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        api = f"http://127.0.0.1:{api_port}"
        health = wait_for(f"{api}/healthz", proc, 600).json()
        assert health["status"] == "ok" and health["n_items"] > 0
        wait_for(f"http://127.0.0.1:{demo_port}/", proc, 120)
        # The banner comes after both are up; give the job a moment to print it.
        deadline = time.monotonic() + 30
        while "Ctrl-C stops" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        text = log.read_text()
        assert "ndcg@10" in text and "popular" in text, "the evaluation table was not printed"
        assert f"{api}/docs" in text and f"127.0.0.1:{demo_port}" in text
        before = text[: text.index("=" * 72)].splitlines()  # what a newcomer reads before the banner
        assert len(before) <= 60, "\n".join(before)
        noisy = [line for line in before if RAY_INTERNALS.search(line)]
        assert not noisy, "\n".join(noisy)
        assert sum(line.startswith("epoch ") for line in before) == 2  # --smoke trains 2 epochs

        assert httpx.get(f"{api}/users", params={"limit": 1}, timeout=10).status_code == 401  # no token
        token_file = runs / "main" / "token"
        assert token_file.stat().st_mode & 0o777 == 0o600 and (runs / "main/auth-secret").stat().st_mode & 0o077 == 0
        (store,) = (runs / "main" / "stores").glob("synthetic-*.db")  # the store of this dataset
        assert f"the event store of this dataset: {store}" in text
        assert f"$(cat {token_file})" in text  # the banner says where the token is
        auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        user = httpx.get(f"{api}/users", params={"limit": 1}, timeout=10, headers=auth).json()["users"][0]["user_id"]
        rec = httpx.post(f"{api}/recommend", json={"user_id": user, "k": 5}, timeout=30, headers=auth)
        assert rec.status_code == 200, rec.text
        items = [i["item_id"] for i in rec.json()["items"]]
        assert len(items) == 5 and all(isinstance(i, str) for i in items)
        ev = httpx.post(
            f"{api}/users/{user}/events",
            json={"events": [{"item_id": items[0], "rating": 5.0, "timestamp": time.time()}]},
            timeout=30,
            headers=auth,
        )
        assert ev.status_code == 200, ev.text
        assert ev.json()["accepted"] == 1

        # The demo: behind a login whose password the banner points to, and without the signing key.
        password_file = runs / "main" / "demo-password"
        assert password_file.stat().st_mode & 0o777 == 0o600 and f"cat {password_file}" in text
        demo = f"http://127.0.0.1:{demo_port}"
        assert httpx.get(f"{demo}/config", timeout=10).status_code == 401
        login = {"username": "admin", "password": password_file.read_text().strip()}
        assert httpx.post(f"{demo}/login", data=login, timeout=10).status_code == 200
        (pid,) = subprocess.run(
            ["pgrep", "-f", f"gradio_demo --api {api} "], capture_output=True, text=True
        ).stdout.split()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(SECRET_ENV.encode() + b"=") for e in environ)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(
                    "the main job did not shut down within 120 s of Ctrl-C:\n" + log.read_text()[-3000:]
                ) from None
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "shutting down" in log.read_text()
    with socket.socket() as s:  # the API port is free again
        s.bind(("127.0.0.1", api_port))


def test_port_in_use_is_one_line_with_the_fix(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "main_job", "--port", str(port), "--no-demo", "--runs-dir", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"port {port}" in lines[0] and "--port" in lines[0]


def test_not_enough_memory_names_the_dataset_and_a_smaller_one():
    with pytest.raises(main_job.NewcomerError, match=r"ml-32m needs about .* GiB .*ml-latest-small"):
        main_job.check_memory("ml-32m", free_bytes=2 * 2**30)
    main_job.check_memory("ml-latest-small", free_bytes=4 * 2**30)  # measured: 2.3 GiB at its peak (training)


def test_bad_checkpoint_path_is_explained(tmp_path):
    with pytest.raises(main_job.NewcomerError, match="--checkpoint"):
        main_job.resolve_checkpoint(tmp_path / "missing")


def test_serve_first_the_full_comparison_is_one_flag_away():
    assert main_job.parse_args([]).baselines == ("popular", "seen-popular")
    assert main_job.parse_args(["--compare"]).baselines == main_job.BASELINES
    assert main_job.parse_args(["--baselines", "all"]).baselines == main_job.BASELINES
    assert main_job.parse_args(["--baselines", "popular,sasrec"]).baselines == ("popular", "sasrec")
    assert main_job.parse_args(["--baselines", ""]).baselines == ()
    with pytest.raises(SystemExit):
        main_job.parse_args(["--baselines", "bogus"])


def test_the_combiners_index_is_a_main_job_option(capsys):
    assert main_job.parse_args([]).index == "exact"
    assert main_job.parse_args(["--index", "hnsw"]).index == "hnsw"
    with pytest.raises(SystemExit):
        main_job.parse_args(["--index", "annoy"])
    assert "invalid choice: 'annoy'" in capsys.readouterr().err
    main_job.check_index("hnsw", {"combine": "concat"})
    main_job.check_index("exact", {"combine": "mixture"})
    with pytest.raises(main_job.NewcomerError, match="--index hnsw .*'combine=mixture'.*--index exact"):
        main_job.check_index("hnsw", {"combine": "mixture"})


def test_the_memory_estimate_is_the_scale_benchmarks_fit():
    import json

    fit = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/scale.json").read_text())[
        "memory_model"
    ]
    results = Path(__file__).resolve().parents[1] / "benchmarks/results"
    fit |= json.loads((results / "scale_ray_train.json").read_text())["memory_model"]
    for stage, coefs in main_job.MEMORY_MODEL.items():
        want = (fit[stage]["base"], fit[stage]["per_event"], fit[stage]["per_item"])
        assert coefs == pytest.approx(want, rel=0.01, abs=1.0), stage
    stage, need = main_job.memory_need(*main_job.KNOWN_SIZES["ml-25m"])
    assert stage != "train-full" and need > main_job.memory_need(*main_job.KNOWN_SIZES["ml-1m"])[1]


def test_each_dataset_gets_a_store_of_its_own(tiny_prepared, tmp_path):
    """The sequence a newcomer runs: the first command (synthetic data), then ml-latest-small, whose
    user ids overlap the synthetic ones. Each dataset gets a store of its own, and every user of
    each holds exactly its dataset's events; a dataset run again finds its store with the events
    posted since; and loading the second dataset into the first one's store is refused, writing nothing."""
    from main_job.serving import load_store
    from models.data import load_prepared, prepare_source
    from ray_app.serve.load_users import load_users
    from ray_app.serve.item_catalogue import training_user_events
    from ray_app.store.base import Event, StoreMismatch
    from ray_app.store.opener import open_store
    from test_prepare import FakeEncoder

    source = ROOT.parent / "shared" / "data" / "movielens" / "ml-latest-small"
    if not source.is_dir():
        pytest.skip(f"{source} is not here")
    movielens = prepare_source(
        "ml-latest-small", tmp_path / "ml", data_dir=source, encoder=FakeEncoder(), progress=False
    )
    s = main_job.MainSettings(runs_dir=tmp_path / "runs")
    first = load_store(s, tiny_prepared)
    second = load_store(s, movielens)
    assert first != second and all(url.startswith(f"sqlite:///{s.runs / 'stores'}") for url in (first, second))
    for url, prepared in ((first, tiny_prepared), (second, movielens)):
        expected = {u: evs for chunk in training_user_events(load_prepared(prepared)) for u, evs in chunk.items()}
        store = open_store(url)
        try:
            assert {u for u, _ in store.users(limit=10_000)} == set(expected)
            assert all(store.events(u) == evs for u, evs in expected.items())
        finally:
            store.close()
    store = open_store(first)
    n = store.count_events("1")
    store.append_events("1", [Event(str(load_prepared(tiny_prepared).item_source_ids[1]), 4.0, 1.7e9)])
    store.close()
    assert load_store(s, tiny_prepared) == first  # the synthetic run again: its own store, as it was left
    store = open_store(first)
    try:
        assert store.count_events("1") == n + 1
        with pytest.raises(StoreMismatch, match="loaded for dataset 'synthetic'.*not 'ml-latest-small'"):
            load_users(load_prepared(movielens), first)
        assert store.count_events("1") == n + 1 and store.count_events("600") == 0
    finally:
        store.close()
