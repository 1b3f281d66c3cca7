"""The Serve application: Encoder → Decomposer → Combiner behind a FastAPI ingress.

    python -m ray_app.serve.pin runs/ray/NAME --config ray_app/serve/config.yaml   # pin its checkpoint
    serve run ray_app/serve/config.yaml                      # the checked-in config, once pinned
    python -m ray_app.serve --checkpoint runs/ray/NAME --data runs/data/NAME [--port 8000]

The model deployments (Decomposer, Combiner) take one checkpoint FILE and its sha256 as
`user_config`, and every replica, autoscaled or not, loads those bytes or refuses to start: none
resolves a run folder itself. The serve config names them in both deployments' `user_config`
(`python -m ray_app.serve.pin` writes them); a new checkpoint, or a rollback, is a config naming
another file and digest, deployed: the replicas swap it in place (`reconfigure`, a lightweight
update: `args` are part of an app's code version in Serve, and changing them would restart every
replica). Given `checkpoint` in the app's arguments instead (the command line above), the app
pins, when it is built, the file (a run folder's best_checkpoint.json followed) and its digest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from ray.serve.config import BackpressureConfig

from ray_app.serve import mode as serve_mode
from ray_app.serve.ann import IndexSettings
from ray_app.serve.auth import secret_from_env
from ray_app.serve.deployments import Combiner, Decomposer, Encoder
from ray_app.serve.ingress import Ingress
from ray_app.serve.quotas import QuotaSettings
from ray_app.serve.served_model import ServingSetupError, file_sha256, resolve_checkpoint


# Serve's proxy answers a request that has not finished within this many seconds 408 (above the
# Ingress's call_timeout_s, after which the Ingress answers 504 itself).
REQUEST_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1  # the Retry-After of a request shed beyond capacity


class DeploymentSettings(BaseModel):
    """Replicas and resources of one deployment; min == max means a fixed replica count."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(0.25, gt=0)  # fractional, so the whole app fits in 2 cores
    num_gpus: float = Field(0.0, ge=0)  # for the model deployments on a GPU cluster
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    max_ongoing_requests: int = Field(32, ge=1)  # > max_batch_size, or batches never fill
    # Requests queued at each caller (Serve's proxy, a handle) beyond max_ongoing_requests per
    # replica; past it a request is answered 503 with Retry-After at once. -1: no bound.
    max_queued_requests: int = Field(-1, ge=-1)
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(15.0, ge=0)
    access_log: bool = True  # a log line per request; the Ingress's carries the request id
    # How often Serve checks a replica's health and how long a check may take before the replica
    # is replaced; None: Serve's defaults (10 s and 30 s).
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)

    def options(self) -> dict:
        opts = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "logging_config": {"enable_access_log": self.access_log},
        }
        for name in ("health_check_period_s", "health_check_timeout_s"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        if self.max_queued_requests != -1:
            opts["max_queued_requests"] = self.max_queued_requests
            opts["backpressure_config"] = BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S)
        if self.min_replicas == self.max_replicas:
            opts["num_replicas"] = self.max_replicas
        else:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        return opts


class AppArgs(BaseModel):
    """Typed arguments of `build_app` (the `args:` of the serve config)."""

    model_config = ConfigDict(extra="forbid")
    # The model.pt served (without checkpoint_sha256, a Ray Train run folder may stand for it); None: the
    # serve config's deployments name it in their user_config ({checkpoint: FILE, sha256: HEX}).
    checkpoint: str | None = None
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")  # the file's digest
    data_dir: str  # prepared dataset: titles, genres, training users
    store_url: str = "sqlite:///runs/serve/state.db"
    # Load the dataset's users into the store once, where the app is built (never in a replica, so
    # no replica's start or scale-up waits for the store). The serve config turns it off: there it
    # is the one-off `python -m ray_app.serve.load_users` before deploying.
    load_users: bool = True
    batching: bool = True  # False: max_batch_size 1 everywhere (benchmark baseline)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_s: float = Field(0.002, ge=0)
    text_cache_size: int = Field(10_000, ge=0)  # the Encoder's LRU of text vectors, per replica
    # Limits (ray_app/serve/quotas.py): shared by the Ingress replicas on a Redis store, per replica on SQLite.
    rate_per_minute: int = Field(600, ge=1)  # requests a user token may make a minute
    service_rate_per_minute: int = Field(60_000, ge=1)  # the same for a service token (the demo, a back end)
    events_per_hour: int = Field(5_000, ge=1)  # events written for one user an hour, by any token
    failed_auth_per_minute: int = Field(30, ge=1)  # requests with a bad token from one client address
    max_events_per_user: int = Field(20_000, ge=1)  # a user's stored events; an append past it is a 409
    max_added_items: int = Field(10_000, ge=0)  # items added while serving (POST /items); past it a 409
    call_timeout_s: float = Field(10.0, gt=0)  # the Ingress answers 504 when a model stage takes longer
    # How the Combiner finds the top-k: exact (default) or an HNSW graph for very large catalogues.
    index: IndexSettings = IndexSettings()
    # The model stages log no line per call: the Ingress's access log has every request, with its id.
    encoder: DeploymentSettings = DeploymentSettings(max_replicas=1, num_cpus=0.25, access_log=False)
    decomposer: DeploymentSettings = DeploymentSettings(access_log=False)
    combiner: DeploymentSettings = DeploymentSettings(access_log=False)
    # The app's capacity: an Ingress replica works on 32 requests at once and Serve's proxy queues
    # 16 more; beyond that a request is shed at once (503, Retry-After) instead of queueing.
    ingress: DeploymentSettings = DeploymentSettings(num_cpus=0.25, max_ongoing_requests=32, max_queued_requests=16)

    def resolved(self) -> AppArgs:
        """Absolute paths, so that replicas find the files whatever their working directory."""
        store = self.store_url
        if store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
            store = "sqlite:///" + str(Path(store[len("sqlite:///") :]).resolve())
        return self.model_copy(
            update={
                "checkpoint": str(Path(self.checkpoint).expanduser().resolve()) if self.checkpoint else None,
                "data_dir": str(Path(self.data_dir).expanduser().resolve()),
                "store_url": store,
            }
        )


def pinned_checkpoint(checkpoint: str, sha256: str | None) -> Path:
    """The checkpoint file to serve: with a digest, `checkpoint` must be that very file; without,
    a file or a run folder (its best_checkpoint.json followed, once, here)."""
    if sha256 is None:
        return resolve_checkpoint(checkpoint)
    file = Path(checkpoint)
    if not file.is_file():
        raise ServingSetupError(f"checkpoint {file}: the serve config pins a digest, so it must name the model file")
    got = file_sha256(file)
    if got != sha256.lower():
        raise ServingSetupError(
            f"checkpoint {file}: its sha256 is {got}, the serve config pins {sha256.lower()}; pin the config "
            "to the file you mean to serve (python -m ray_app.serve.pin RUN_OR_FILE --config CONFIG)"
        )
    return file


def build_app(args: AppArgs):
    """One .bind() expression: the ingress holds handles to the three model stages."""
    args = AppArgs.model_validate(args if isinstance(args, (dict, AppArgs)) else dict(args)).resolved()
    model = {}  # without a checkpoint here, the serve config's user_config names it
    if args.checkpoint is not None:
        file = pinned_checkpoint(args.checkpoint, args.checkpoint_sha256)  # fails here, naming the file
        # Every replica loads these bytes, even if training writes a better checkpoint meanwhile.
        model = {"user_config": {"checkpoint": str(file), "sha256": args.checkpoint_sha256 or file_sha256(file)}}
    if args.load_users:
        from ray_app.serve.load_users import load_training_users

        load_training_users(args.data_dir, args.store_url)
    batch = {"max_batch_size": args.max_batch_size if args.batching else 1, "batch_wait_s": args.batch_wait_s}
    return Ingress.options(**args.ingress.options()).bind(
        Encoder.options(**args.encoder.options()).bind(**batch, cache_size=args.text_cache_size),
        Decomposer.options(**args.decomposer.options(), **model).bind(args.store_url, args.data_dir, **batch),
        Combiner.options(**args.combiner.options(), **model).bind(
            args.data_dir, **batch, index=args.index, store_url=args.store_url
        ),
        args.store_url,
        args.data_dir,
        quotas=QuotaSettings(
            args.rate_per_minute, args.service_rate_per_minute, args.events_per_hour, args.failed_auth_per_minute
        ),
        max_events_per_user=args.max_events_per_user,
        max_added_items=args.max_added_items,
        call_timeout_s=args.call_timeout_s,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ray_app.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="model.pt or a Ray Train run folder")
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--store-url", default=AppArgs.model_fields["store_url"].default)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-batching", action="store_true")
    p.add_argument(
        "--load-users",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the dataset's training users into the store before deploying (once; default on)",
    )
    p.add_argument("--index", choices=("exact", "hnsw"), default="exact", help="how the Combiner finds the top-k")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (without RAY_ADDRESS)")
    p.add_argument(
        "--throughput-optimized",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Serve's throughput-optimized mode for a local Ray (default on)",
    )
    a = p.parse_args(argv)
    serve_mode.use(a.throughput_optimized)
    try:
        if not os.environ.get("RAY_ADDRESS"):  # a local Ray: its replicas inherit this environment
            secret_from_env()
        app = build_app(
            AppArgs(
                checkpoint=a.checkpoint,
                data_dir=a.data,
                store_url=a.store_url,
                load_users=a.load_users,
                batching=not a.no_batching,
                index=IndexSettings(kind=a.index),
            )
        )
    except (ServingSetupError, ValueError, RuntimeError) as e:  # StoreUnavailable is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=a.num_cpus if not os.environ.get("RAY_ADDRESS") else None)
    serve.start(http_options={"host": a.host, "port": a.port, "request_timeout_s": REQUEST_TIMEOUT_S})
    try:
        serve.run(app, name="recommender", route_prefix="/")
        print(f"serving on http://{a.host}:{a.port} (docs at /docs); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
