"""The main job's settings, and the error it explains in one line instead of a traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.cli import setting
from models.data.sources import DATA_DIR_HELP, DATASETS, MIN_USER_EVENTS_HELP

BASELINES = ("popular", "seen-popular", "lstm", "gru4rec", "sasrec")
# Serve first: the default compares with the two trivial rules only (seconds): most-popular, and the
# user's own items first, then popular (what repeating histories make easy). `--baselines all` (or
# `--compare`) adds the trained baselines, each trained with the same epochs and batches (not timed).
DEFAULT_BASELINES = ("popular", "seen-popular")


class NewcomerError(RuntimeError):
    """A problem with a one-line explanation and its fix (printed without a traceback)."""


@dataclass
class MainSettings:
    dataset: str = setting("synthetic", " | ".join(DATASETS))
    data_dir: Path | None = setting(None, DATA_DIR_HELP)
    min_user_events: int | None = setting(None, MIN_USER_EVENTS_HELP)
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
    baselines: tuple[str, ...] = DEFAULT_BASELINES  # --baselines / --compare (main_job.main.parse_args)
    seed: int = setting(0)
    host: str = setting("127.0.0.1", "where the API and the demo listen (0.0.0.0 for all)")
    port: int = setting(8000, "API port")
    index: str = setting(
        "exact",
        "how the Combiner finds the top-k: exact (a matmul) or hnsw (a graph, large catalogues)",
        choices=("exact", "hnsw"),
    )
    demo_port: int = setting(7860)
    demo: bool = setting(True, "serve the API only", flag="--no-demo")
    smoke: bool = setting(False, "a tiny run (small synthetic data, 2 epochs): a quick check")
    runs_dir: Path = setting(
        Path("runs"),
        "where the job writes: the prepared data (DIR/data), and its checkpoints, stores, secret and token (DIR/main)",
    )
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
    def runs(self) -> Path:
        """The job's own files: checkpoints, the event stores, the secret, the token, the demo's login."""
        return self.runs_dir / "main"

    @property
    def data_root(self) -> Path:
        """Where datasets are prepared, one folder each."""
        return self.runs_dir / "data"

    def store_file(self, dataset_key: str) -> Path:
        """The event store of one dataset (`DatasetRecord.key`): a dataset's users never share a
        store with another's."""
        return self.runs / "stores" / f"{dataset_key}.db"

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

    @property
    def demo_accounts_file(self) -> Path:
        return self.runs / "demo-accounts.yaml"

    @property
    def demo_password_file(self) -> Path:
        return self.runs / "demo-password"
