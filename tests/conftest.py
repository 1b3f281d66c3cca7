"""Shared fixtures: a tiny synthetic dataset prepared once per session with the real text encoder
(and its training/validation/test split), the same with IMDb-style item ids, the API's signing
secret with tokens for it, the one local Ray (and Serve) of a test module, and a check that no
test module writes into the checkout."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from models.data import load_prepared, prepare_source
from models.data.batching import make_split
from models.data.synthetic import SyntheticConfig
from models.data.encoder import TextEncoder
from ray_app.serve.auth import SECRET_ENV, mint, new_secret

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# The ignored folders that the project's commands write into: a user's own secret, token, stores
# and checkpoints live there, so a test writes only to temporary folders.
OUTPUT_DIRS = ("runs", "data", "artifacts")

# Set before any test module starts Ray, whose workers (the Ingress among them) inherit it.
os.environ.setdefault(SECRET_ENV, new_secret())


def checkout_files() -> tuple[dict[str, tuple[int, int]], str]:
    """What a test could write into the checkout: each file under OUTPUT_DIRS with its size and
    modification time, and `git status` (modified tracked files, untracked files not ignored)."""
    files = {}
    for folder in OUTPUT_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.is_file():
                st = path.stat()
                files[str(path.relative_to(ROOT))] = (st.st_size, st.st_mtime_ns)
    status = ""
    if (ROOT / ".git").exists():
        cmd = ["git", "status", "--porcelain", "--untracked-files=all"]
        status = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return files, status


@pytest.fixture(scope="module", autouse=True)
def writes_nothing_into_the_checkout():
    """Fails the module whose tests wrote into the checkout (runs/, a tracked or a new file)."""
    before = checkout_files()
    yield
    after = checkout_files()
    if after != before:
        changed = sorted(set(before[0].items()) ^ set(after[0].items()))
        pytest.fail(
            "this test module wrote into the checkout; write to a temporary folder instead:\n"
            + "\n".join(sorted({path for path, _ in changed}))
            + ("\n" + after[1] if after[1] != before[1] else "")
        )


def service_auth() -> dict[str, str]:
    """Headers of a service token (acts for any user)."""
    return {"Authorization": f"Bearer {mint(os.environ[SECRET_ENV], 'service')}"}


def user_auth(user_id: str) -> dict[str, str]:
    """Headers of user `user_id`'s token."""
    return {"Authorization": f"Bearer {mint(os.environ[SECRET_ENV], 'user', user_id)}"}


@contextmanager
def local_ray(**extra):
    """The test module's own Ray: 2 CPUs, no dashboard, no usage stats; shut down on leaving."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, **extra)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def local_serve(port: int, **ray_extra):
    """`local_ray` with Serve's proxy on 127.0.0.1:`port`; Serve is shut down before Ray."""
    from ray import serve

    with local_ray(**ray_extra):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield
        finally:
            serve.shutdown()


@pytest.fixture(scope="session")
def encoder_cache(tmp_path_factory) -> Path:
    """Tests never touch the user's embedding cache."""
    path = tmp_path_factory.mktemp("encoder-cache") / "text-embeddings.parquet"
    os.environ["DYNAMIC_INTEREST_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, encoder_cache) -> Path:
    """The prepared folder of a tiny synthetic dataset."""
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    cfg = SyntheticConfig(n_users=40, n_items=60, min_events=8, max_events=20, seed=3)
    return prepare_source(
        "synthetic", out, synthetic_config=cfg, encoder=TextEncoder(cache_path=encoder_cache), progress=False
    )


@pytest.fixture(scope="session")
def tiny_data(tiny_prepared):
    return load_prepared(tiny_prepared)


def imdb_id(synthetic_id: str) -> str:
    """A synthetic item id as an IMDb-style one: seven digits with leading zeros ("7" -> "0000707")."""
    return f"{int(synthetic_id) * 101:07d}"


@pytest.fixture(scope="session")
def imdb_prepared(tmp_path_factory, encoder_cache) -> Path:
    """The tiny synthetic dataset with its items named as IMDb names films (`imdb_id`): ids that
    only survive as strings. The texts are the tiny dataset's, so the encoder's cache serves them."""
    import pyarrow as pa

    from models.data.prepare import prepare
    from models.data.synthetic import generate

    def renamed(table: pa.Table, column: str) -> pa.Table:
        ids = pa.array([imdb_id(i) for i in table.column(column).to_pylist()], pa.string())
        return table.set_column(table.schema.get_field_index(column), column, ids)

    raw = generate(SyntheticConfig(n_users=40, n_items=60, min_events=8, max_events=20, seed=3))
    raw.items, raw.ratings = renamed(raw.items, "source_id"), renamed(raw.ratings, "item")
    raw.name, raw.extra = "synthetic-imdb", {}
    out = tmp_path_factory.mktemp("prepared") / "imdb"
    return prepare(raw, out, encoder=TextEncoder(cache_path=encoder_cache), progress=False)


@pytest.fixture(scope="session")
def imdb_data(imdb_prepared):
    return load_prepared(imdb_prepared)


@pytest.fixture(scope="module")
def split(tiny_data):
    return make_split(tiny_data.user_offsets, 1)
