"""The main job: prepare → train (Ray Train) → evaluate against the baselines → serve → demo.

    python -m main_job                                   # embedded synthetic data
    python -m main_job --dataset ml-latest-small         # MovieLens (../shared copy, a folder/zip, or a download)
    python -m main_job --checkpoint runs/ray/RUN         # skip training
    python -m main_job --tune 8                          # an 8-trial search; serve its best trial

It keeps serving the API and the demo until Ctrl-C, then shuts everything down.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import httpx

from models.cli import add_settings, setting, settings_from

log = logging.getLogger("dynamic_interest.main")

BASELINES = ("popular", "seen-popular", "lstm", "gru4rec", "sasrec")
# Serve first: the default compares with the two trivial rules only (seconds): most-popular, and the
# user's own items first, then popular (what repeating histories make easy). `--baselines all` (or
# `--compare`) adds the trained baselines, each trained with the same epochs and batches (not timed).
DEFAULT_BASELINES = ("popular", "seen-popular")
APP_NAME = "dynamic-interest"  # the Serve application, as `serve status` names it
ORACLE_ROW = "decomposer + oracle intent (the target's own words)"
# Rough peak memory of preparation and training per event (arrays, windows, Parquet buffers).
BYTES_PER_EVENT = 600
KNOWN_EVENTS = {
    "ml-100k": 100_000,
    "ml-latest-small": 100_836,
    "ml-1m": 1_000_209,
    "ml-10m": 10_000_054,
    "ml-25m": 25_000_095,
    "ml-32m": 32_000_204,
}


class NewcomerError(RuntimeError):
    """A problem with a one-line explanation and its fix (printed without a traceback)."""


@dataclass
class MainSettings:
    dataset: str = setting("synthetic", "synthetic | ml-latest-small | ml-1m | ml-25m | ...")
    data_dir: Path | None = setting(None, "MovieLens folder or .zip (else the ../shared copy or a download)")
    checkpoint: Path | None = setting(None, "serve this checkpoint (model.pt or a run folder): no training")
    tune_samples: int = setting(
        0,
        "an N-trial search (Ray Tune + Optuna) instead of one training run; its best trial is served",
        flag="--tune",
        metavar="N",
    )
    model_args: list[str] = setting(help="decomposer config override", flag="--set", metavar="KEY=VALUE", factory=list)
    # The first command trains briefly: 10 epochs of 8-window batches reach valid NDCG@10 0.40 on
    # the synthetic data in under a minute on 2 cores (16-window batches: 0.36 after 12 epochs;
    # 64-window batches: 0.40 after 58). The quality tables' recipe is --epochs 200 --patience 10
    # --batch-size 64.
    epochs: int = setting(10, "at most this many epochs (default 10: under a minute)")
    patience: int = setting(5, "epochs without a better validation NDCG@10")
    batch_size: int = setting(8, "training windows per step (quality tables: 64)")
    baselines: tuple[str, ...] = DEFAULT_BASELINES  # --baselines / --compare (parse_args)
    seed: int = setting(0)
    host: str = setting("127.0.0.1", "where the API and the demo listen (0.0.0.0 for all)")
    port: int = setting(8000, "API port")
    demo_port: int = setting(7860)
    demo: bool = setting(True, "serve the API only", flag="--no-demo")
    smoke: bool = setting(False, "a tiny run (small synthetic data, 2 epochs): a quick check")
    runs: Path = Path("runs/main")
    num_cpus: int | None = setting(None, "CPUs of the local Ray (default: all)")
    verbose: bool = setting(
        False,
        "show Ray's own logs, the workers' and the demo's output (otherwise in "
        "/tmp/ray/session_latest/logs and runs/main/demo.log)",
    )
    throughput_optimized: bool | None = setting(
        None,
        "Serve's throughput-optimized mode (default on; --no-throughput-optimized for Serve's default mode; "
        "RAY_SERVE_THROUGHPUT_OPTIMIZED=0 does the same)",
    )

    @property
    def demo_log(self) -> Path | None:
        """Where the demo's output goes (None: to the console, with --verbose)."""
        return None if self.verbose else self.runs / "demo.log"

    @property
    def secret_file(self) -> Path:
        return self.runs / "auth-secret"

    @property
    def token_file(self) -> Path:
        return self.runs / "token"


# ---- access ----------------------------------------------------------------------------------


def private_write(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (a crash leaves the old one)."""
    from models.files import atomic_path

    with atomic_path(path, mode=0o600) as tmp:  # owner-only from its creation on
        tmp.write_text(text + "\n")


def setup_access(s: MainSettings) -> str:
    """The API's signing secret into this process's environment, before Ray starts (its workers,
    the Ingress among them, inherit it): $DYNAMIC_INTEREST_AUTH_SECRET when set, else the one
    generated at the first start and kept in runs/main/auth-secret (owner-only). A service token
    for this run goes to runs/main/token (owner-only) -> that token."""
    from ray_app.serve.auth import SECRET_ENV, mint, new_secret, secret_from_env

    if not os.environ.get(SECRET_ENV):
        if not s.secret_file.is_file():
            private_write(s.secret_file, new_secret())
        os.environ[SECRET_ENV] = s.secret_file.read_text().strip()
    try:
        secret = secret_from_env()
    except RuntimeError as e:
        raise NewcomerError(str(e)) from None
    token = mint(secret, "service")
    private_write(s.token_file, token)
    return token


# ---- checks a newcomer benefits from, before anything starts --------------------------------


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def check_port(host: str, port: int, what: str, flag: str) -> None:
    if not port_free(host, port):
        raise NewcomerError(
            f"port {port} ({what}) is already in use — another copy of this job or "
            f"another server is running there: stop it, or pick a free port with {flag} {port + 10}"
        )


def check_memory(dataset: str, free_bytes: int | None = None) -> None:
    import psutil

    events = KNOWN_EVENTS.get(dataset)
    if events is None:
        return
    need = events * BYTES_PER_EVENT
    free = psutil.virtual_memory().available if free_bytes is None else free_bytes
    if need > free:
        raise NewcomerError(
            f"{dataset} needs about {need / 2**30:.1f} GiB of memory to prepare and train, "
            f"this machine has {free / 2**30:.1f} GiB free: use --dataset ml-latest-small "
            f"(or ml-1m), or run it on a cluster (see k8s/README.md)"
        )


def check_ray() -> None:
    """Join a cluster only when asked to (RAY_ADDRESS); a stray local one would be joined silently."""
    from ray._private.services import find_bootstrap_address

    if os.environ.get("RAY_ADDRESS"):
        print(f"joining the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}", flush=True)
    elif find_bootstrap_address(None):  # what a plain ray.init() would silently join
        raise NewcomerError(
            "Ray is already running on this machine (a `ray start` cluster): stop it with "
            "`ray stop`, or run on it on purpose with RAY_ADDRESS=auto"
        )


def preflight(s: MainSettings) -> None:
    check_port(s.host, s.port, "the API", "--port")
    if s.demo:
        check_port(s.host, s.demo_port, "the demo", "--demo-port")
    check_memory(s.dataset)
    check_ray()


# ---- the stages ------------------------------------------------------------------------------


def prepare(s: MainSettings) -> Path:
    from models.data.errors import DataFormatError
    from models.data.prepare import prepare_source
    from models.data.synthetic import SyntheticConfig

    synthetic = SyntheticConfig(n_users=120, n_items=150, min_events=10, max_events=30) if s.smoke else None
    name = f"{s.dataset}-smoke" if s.smoke else s.dataset
    print(f"\n==> preparing {s.dataset}", flush=True)
    try:
        return prepare_source(s.dataset, Path("runs/data") / name, data_dir=s.data_dir, synthetic_config=synthetic)
    except urllib.error.URLError as e:
        raise NewcomerError(
            f"could not download {s.dataset} ({e.reason}); without network, pass a local copy: "
            f"--data-dir path/to/{s.dataset}.zip or its unpacked folder"
        ) from None
    except DataFormatError as e:
        raise NewcomerError(str(e)) from None


def tune(s: MainSettings, prepared: Path) -> Path:
    """A short search (Ray Tune + Optuna, each trial a Ray Train run) -> its best trial's checkpoint."""
    from tuning.search import SearchSettings
    from tuning.search import run as run_search

    print(f"\n==> tuning: {s.tune_samples} trials", flush=True)
    best = run_search(
        SearchSettings(
            dataset=str(prepared),
            num_samples=s.tune_samples,
            seed=s.seed,
            epochs=2 if s.smoke else 10,
            storage_path=str((s.runs / "tune").resolve()),
            verbose=s.verbose,
        ),
        num_cpus=s.num_cpus,
    )
    if not best.get("model"):
        raise NewcomerError("the tuning search finished without a successful trial; see its table in runs/main/tune")
    return Path(best["model"])


def train(s: MainSettings, prepared: Path, model_args: dict) -> Path:
    from ray_app.train.settings import RayTrainSettings
    from ray_app.train.driver import SetupError, run

    print("\n==> training the decomposer with Ray Train", flush=True)
    settings = RayTrainSettings(
        dataset=str(prepared),
        model="decomposer",
        model_args=model_args,
        epochs=2 if s.smoke else s.epochs,
        patience=s.patience,
        seed=s.seed,
        batch_size=s.batch_size,
        storage_path=str((s.runs / "ray").resolve()),
        verbose=s.verbose,
    )
    try:
        best = run(settings, num_cpus=s.num_cpus)
    except SetupError as e:
        raise NewcomerError(str(e)) from None
    return Path(best.model)


def evaluate(s: MainSettings, prepared: Path, checkpoint_path: Path) -> str:
    """The trained decomposer and the baselines on the same split -> the printed table."""
    import torch

    from models.nn import checkpoint
    from models.data.batching import make_split
    from models.data.dataset import load_prepared
    from models.evaluation.metrics import summarize
    from models.evaluation.report import TABLE_METRICS, format_table, table_row
    from models.training.defaults import train_config
    from models.evaluation.evaluate import evaluate as evaluate_model
    from models.training.loop import fit, new_model

    data = load_prepared(prepared)
    split = make_split(data.user_offsets, 1)
    model, _ = checkpoint.load(checkpoint_path)
    # The intent phrase of a test target is drawn from that target's own genres and tags: an oracle,
    # shown for what the context path can carry, not as what a user would type.
    rows = [("decomposer", model, False), (ORACLE_ROW, model, True)]
    for kind in s.baselines:
        print(f"\n==> baseline {kind}", flush=True)
        torch.manual_seed(s.seed)
        base = new_model(kind, data, split)
        fit(
            base,
            data,
            split,
            train_config(
                kind, epochs=2 if s.smoke else s.epochs, patience=s.patience, seed=s.seed, batch_size=s.batch_size
            ),
            desc=kind,
        )
        rows.append((kind, base, False))
    table = []
    for name, m, intent in rows:
        ev = evaluate_model(m, data, split, "test", with_intent=intent)
        table.append(table_row(name, summarize(ev["masked"]), summarize(ev["unmasked"])))
    return format_table(table, ["model", *TABLE_METRICS, "ndcg@10 unmasked"])


def wait_until_up(
    url: str, what: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
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

    # Quiet is `connect`'s doing: the replicas' logs stay in Ray's log files, at Serve's own levels.
    serve.start(http_options={"host": s.host, "port": s.port})
    return f"http://{s.host}:{s.port}"


def deploy_app(s: MainSettings, prepared: Path, checkpoint_path: Path) -> None:
    """Deploy the Serve app and wait until it runs; a failed deploy is one line with Serve's reason
    (a bad checkpoint, a replica that crashed while starting)."""
    from ray import serve

    from ray_app.serve.app import AppArgs, build_app

    print("\n==> deploying the Serve app (encoder → decomposer → combiner)", flush=True)
    s.runs.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{(s.runs / 'state.db').resolve()}"
    app = build_app(AppArgs(checkpoint=str(checkpoint_path), data_dir=str(prepared), store_url=store))
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:
        raise NewcomerError(f"the Serve app failed to deploy: {e}") from None
    wait_until_up(f"http://{s.host}:{s.port}/healthz", "the Serve app", 300)


def start_demo(s: MainSettings, api_url: str, token: str) -> tuple[subprocess.Popen, str]:
    """Start the demo process (not waiting for it) with the service token in its environment
    (not its command line, which `ps` shows) -> (process, its URL)."""
    from ray_app.serve.auth import TOKEN_ENV

    print("\n==> starting the Gradio demo", flush=True)
    s.runs.mkdir(parents=True, exist_ok=True)
    out = None if s.demo_log is None else open(s.demo_log, "ab")  # the child keeps its own copy
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradio_demo", "--api", api_url, "--host", s.host, "--port", str(s.demo_port)],
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env={**os.environ, TOKEN_ENV: token},
        )
    finally:
        if out is not None:
            out.close()
    return proc, f"http://{s.host}:{s.demo_port}"


def banner(api_url: str, demo_url: str | None, user_id: str, item_id: int, s: MainSettings) -> str:
    from ray_app.serve.auth import SECRET_ENV, TOKEN_ENV

    token_file = s.token_file
    # The secret is the user's own ($DYNAMIC_INTEREST_AUTH_SECRET) or the one kept in the secret file.
    kept = s.secret_file.is_file() and s.secret_file.read_text().strip() == os.environ.get(SECRET_ENV)
    mint_user = f"{sys.executable} -m ray_app.serve.auth --user {user_id}"

    auth = f'-H "Authorization: Bearer ${TOKEN_ENV}"'
    json_ = "-H 'content-type: application/json'"
    lines = [
        "",
        "=" * 72,
        f"API   {api_url}        (OpenAPI docs: {api_url}/docs)",
        *([f"demo  {demo_url}"] if demo_url else []),
        "",
        "try (every route but /healthz needs a token; this one acts for any user):",
        f"  export {TOKEN_ENV}=$(cat {token_file.resolve()})",
        f"  curl -s {api_url}/recommend {auth} {json_} \\",
        f'       -d \'{{"user_id": "{user_id}", "context": {{"intent": "something light and funny"}}, "k": 5, "explain": true}}\'',
        f"  curl -s {api_url}/users/{user_id}/events {auth} {json_} \\",
        f'       -d \'{{"events": [{{"item_id": {item_id}, "rating": 4.5, "timestamp": {time.time():.0f}}}]}}\'',
        f"  curl -s {api_url}/recommend {auth} {json_} \\",
        f'       -d \'{{"history": [{{"item_id": {item_id}, "timestamp": {time.time():.0f}}}], "k": 5}}\''
        "   # no rating: a view",
        f"  curl -s '{api_url}/users/{user_id}/interests?last=20' {auth}",
        f"  curl -s '{api_url}/items?q=space+adventure&k=5' {auth}",
        "",
        f"a token for user {user_id} only:",
        f"  {SECRET_ENV}=$(cat {s.secret_file.resolve()}) {mint_user}" if kept else f"  {mint_user}",
        "Ctrl-C stops the API and the demo.",
        "=" * 72,
    ]
    return "\n".join(lines)


def example_ids(prepared: Path) -> tuple[str, int]:
    from models.data.dataset import load_prepared

    data = load_prepared(prepared)
    return str(data.user_source_ids[1]), int(data.item_source_ids[1])  # [0] is padding


# ---- the whole job ---------------------------------------------------------------------------


def run(s: MainSettings) -> int:
    import ray
    from ray import serve

    from ray_app.train.driver import SetupError
    from ray_app.train.preflight import connect
    from ray_app.train.settings import parse_model_args

    preflight(s)
    try:
        model_args = parse_model_args("decomposer", s.model_args)
    except SetupError as e:
        raise NewcomerError(str(e)) from None
    prepared = prepare(s)
    token = setup_access(s)
    connect(s.num_cpus, s.verbose)
    demo = demo_url = None
    try:
        # The demo and Serve's proxy start first, beside the training (which keeps one core busy);
        # the demo waits for the API itself.
        api_url = start_serve_proxy(s)
        if s.demo:
            demo, demo_url = start_demo(s, api_url, token)
        if s.checkpoint is not None:
            checkpoint_path = resolve_checkpoint(s.checkpoint)
        elif s.tune_samples:
            checkpoint_path = tune(s, prepared)
        else:
            checkpoint_path = train(s, prepared, model_args)
        print("\n" + evaluate(s, prepared, checkpoint_path), flush=True)
        deploy_app(s, prepared, checkpoint_path)
        if demo is not None:
            wait_until_up(demo_url, "the demo", 120, demo, log=s.demo_log)
        print(banner(api_url, demo_url, *example_ids(prepared), s), flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            if demo is not None and demo.poll() is not None:
                where = f"its output is in {s.demo_log}" if s.demo_log else "see its output above"
                raise NewcomerError(f"the demo exited with status {demo.returncode}; {where}")
    finally:
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
    return 0


def wait_port_free(host: str, port: int, timeout_s: float) -> bool:
    """True once `port` can be bound again (False after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not port_free(host, port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def resolve_checkpoint(path: Path) -> Path:
    """`--checkpoint`: what `ray_app.serve.served_model.resolve_checkpoint` accepts, its error a NewcomerError."""
    from ray_app.serve.served_model import ServingSetupError
    from ray_app.serve.served_model import resolve_checkpoint as resolve

    try:
        return resolve(path)
    except ServingSetupError as e:
        raise NewcomerError(f"--checkpoint {e}") from None


def parse_args(argv=None) -> MainSettings:
    p = argparse.ArgumentParser(
        prog="python -m main_job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_settings(p, MainSettings)
    p.add_argument(
        "--baselines",
        default=",".join(DEFAULT_BASELINES),
        help=f"comma-separated from {', '.join(BASELINES)}, 'all', or empty for none (default: the "
        "two untrained rules, so that the API is up in minutes; 'all' trains LSTM, GRU4Rec and "
        "SASRec too, with the same epochs and batches: minutes more)",
    )
    p.add_argument("--compare", action="store_true", help="the same as --baselines all")
    a = p.parse_args(argv)
    baselines = tuple(b.strip() for b in a.baselines.split(",") if b.strip())
    if a.compare or baselines == ("all",):
        baselines = BASELINES
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        p.error(f"--baselines: unknown {bad}; choose from {', '.join(BASELINES)}")
    if a.smoke:
        baselines = tuple(b for b in baselines if b in DEFAULT_BASELINES)
    return settings_from(MainSettings, a, baselines=baselines)


def main(argv=None) -> int:
    from ray_app.serve import mode as serve_mode

    logging.basicConfig(level=logging.WARNING)
    s = parse_args(argv)
    serve_mode.use(s.throughput_optimized)  # before Ray starts: its processes inherit the choice
    try:
        return run(s)
    except NewcomerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
