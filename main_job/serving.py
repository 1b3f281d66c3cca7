"""Serving the API and the demo: Serve's proxy, the app's deployment, the demo process, waiting
until each answers, keeping them up until Ctrl-C, and shutting them down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from main_job.preflight import wait_port_free
from main_job.settings import MainSettings, NewcomerError

APP_NAME = "dynamic-interest"  # the Serve application, as `serve status` names it


def wait_until_up(
    url: str, what: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll `url` until it answers below 500; `proc` exiting first, or `timeout_s`, is a NewcomerError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            where = f"its output is in {log}" if log else "see its output above"
            raise NewcomerError(f"{what} exited with status {proc.returncode} while starting; {where}")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise NewcomerError(f"{what} did not answer at {url} within {timeout_s:.0f} s")


def start_serve_proxy(s: MainSettings) -> str:
    """Serve's controller and HTTP proxy (no CPUs reserved): started before training, on the core
    the Train worker leaves idle -> the API's URL."""
    from ray import serve

    from ray_app.serve.app import REQUEST_TIMEOUT_S

    # Quiet is `connect`'s doing: the replicas' logs stay in Ray's log files, at Serve's own levels.
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": REQUEST_TIMEOUT_S})
    return f"http://{s.host}:{s.port}"


def load_store(s: MainSettings, prepared: Path) -> str:
    """The training users of `prepared` loaded into the event store of that dataset -> its URL.
    Each dataset, as prepared now, has a store of its own (`MainSettings.store_file`): events
    posted for its users stay with them across runs, and no other dataset's users mix with them."""
    from models.data import load_prepared
    from ray_app.serve.load_users import load_users
    from ray_app.serve.item_catalogue import dataset_record
    from ray_app.store.base import StoreMismatch, StoreUnavailable

    data = load_prepared(prepared)
    file = s.store_file(dataset_record(data).key).resolve()
    print(f"    the event store of this dataset: {file}", flush=True)
    store = f"sqlite:///{file}"
    try:
        load_users(data, store)
    except (StoreMismatch, StoreUnavailable) as e:  # a store file copied over, or not a database
        raise NewcomerError(f"{e}; move {file} aside to start this dataset's store afresh") from None
    return store


def deploy_app(s: MainSettings, prepared: Path, checkpoint_path: Path) -> None:
    """Deploy the Serve app and wait until it runs; a failed deploy is one line with Serve's reason
    (a bad checkpoint, a replica that crashed while starting)."""
    from ray import serve

    from ray_app.serve.app import AppArgs, build_app

    print("\n==> deploying the Serve app (encoder → decomposer → combiner)", flush=True)
    store = load_store(s, prepared)  # once, here: no replica loads users when it starts
    args = AppArgs(
        checkpoint=str(checkpoint_path),
        data_dir=str(prepared),
        store_url=store,
        index={"kind": s.index},
        load_users=False,
    )
    app = build_app(args)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:
        raise NewcomerError(f"the Serve app failed to deploy: {e}") from None
    wait_until_up(f"http://{s.host}:{s.port}/healthz", "the Serve app", 300)


def start_demo(s: MainSettings, api_url: str, token: str) -> tuple[subprocess.Popen, str]:
    """Start the demo process (not waiting for it) with the service token in its environment
    (not its command line, which `ps` shows) and its accounts file; never the API's signing keys,
    which this process holds for Ray -> (process, its URL)."""
    from main_job.access import setup_demo_accounts
    from ray_app.serve.auth import SECRET_ENV, TOKEN_ENV, VERIFY_SECRET_ENV

    print("\n==> starting the Gradio demo", flush=True)
    s.runs.mkdir(parents=True, exist_ok=True)
    accounts = setup_demo_accounts(s)
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, VERIFY_SECRET_ENV)}
    out = None if s.demo_log is None else open(s.demo_log, "ab")  # the child keeps its own copy
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gradio_demo",
                "--api",
                api_url,
                "--host",
                s.host,
                "--port",
                str(s.demo_port),
                "--accounts",
                str(accounts.resolve()),
            ],
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env={**env, TOKEN_ENV: token},
        )
    finally:
        if out is not None:
            out.close()
    return proc, f"http://{s.host}:{s.demo_port}"


def serve_until_stopped(s: MainSettings, demo: subprocess.Popen | None) -> None:
    """Return on SIGINT or SIGTERM; the demo exiting before that is a NewcomerError."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if demo is not None and demo.poll() is not None:
            where = f"its output is in {s.demo_log}" if s.demo_log else "see its output above"
            raise NewcomerError(f"the demo exited with status {demo.returncode}; {where}")


def shut_down(s: MainSettings, demo: subprocess.Popen | None) -> None:
    """Stop the demo, Serve and Ray, then wait until the API's port is free again."""
    import ray
    from ray import serve

    print("\nshutting down…", flush=True)
    if demo is not None and demo.poll() is None:
        demo.terminate()
        try:
            demo.wait(15)
        except subprocess.TimeoutExpired:
            demo.kill()
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        # Serve's proxy ends a moment after Ray returns: wait, so the same command can run again at once.
        wait_port_free(s.host, s.port, 60)
