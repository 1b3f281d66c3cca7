"""Ray Jobs: a local head on loopback, `python -m ray_app.train` and `python -m ray_app.batch` submitted with the
working directory."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from models.nn import checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc), so teardown ends exactly what this head started."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(head: subprocess.Popen) -> None:
    """`ray stop` would end every Ray on this machine; signal only this head's process tree instead.

    Like `ray stop`: SIGTERM, a grace period, then SIGKILL (gcs_server outlives a SIGTERM for long).
    """
    pids = descendants(head.pid) + [head.pid]
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        for pid in filter(running, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(map(running, pids)):
            head.poll()
            time.sleep(0.2)
    head.wait(timeout=10)


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` on loopback with 2 CPUs and the dashboard (the job server) on a free port.

    Ray turns token authentication on whenever ~/.ray/auth_token exists (any earlier `ray.init()`
    writes one), and then the job server answers 401 to a client without the token. The head
    gets its own token here and the client sends it, whatever the state of ~/.ray.
    """
    temp = Path(tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard, agent = free_ports(3)
    token = secrets.token_hex(32)
    (temp / "auth_token").write_text(token)
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(temp / "auth_token"),
    }
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    log = open(temp / "head.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--dashboard-agent-listen-port",
            str(agent),
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{(temp / 'head.log').read_text()[-3000:]}")
            try:
                client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
                client.list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"job server at {address} never answered:\n{(temp / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield client, temp
    finally:
        stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def submit(client, entrypoint: str, timeout_s: float = 300) -> str:
    """Submit `entrypoint` with the repository as the working directory -> its logs, once it succeeded."""
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    try:
        deadline = time.monotonic() + timeout_s
        while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
    finally:
        client.stop_job(job)
    return logs


@pytest.fixture(scope="module")
def trained(head, tiny_data):
    client, temp = head
    storage = temp / "runs"
    logs = submit(
        client,
        f"python -m ray_app.train --dataset {tiny_data.path} --epochs 2 --storage-path {storage} "
        "--name job --set lstm_units=16",
    )
    return logs, storage


def test_submitted_training_job_writes_a_checkpoint(trained):
    logs, storage = trained
    assert "best checkpoint:" in logs
    assert "epoch   1/2" in logs and "TrainingReport(" not in logs  # the driver's epoch lines, quiet Ray
    best = json.loads((storage / "job" / "best_checkpoint.json").read_text())
    model, meta = checkpoint.load(best["model"])
    assert model.cfg.lstm_units == 16 and meta["epoch"] == best["epoch"] in (1, 2)


def test_submitted_batch_job_writes_every_users_top_k(head, trained, tiny_data):
    import pyarrow.parquet as pq

    client, temp = head
    out = temp / "recs.parquet"
    logs = submit(
        client, f"python -m ray_app.batch --checkpoint {trained[1] / 'job'} --data {tiny_data.path} --k 5 --out {out}"
    )
    assert f"batch: {tiny_data.n_users} users, {tiny_data.n_users * 5} rows" in logs
    table = pq.read_table(out)
    assert table.num_rows == tiny_data.n_users * 5 and set(table.column("rank").to_pylist()) == set(range(1, 6))
