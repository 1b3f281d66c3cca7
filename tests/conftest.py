"""Shared fixtures: a tiny synthetic dataset prepared once per session with the real text encoder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.data import load_prepared, prepare_source
from models.data.synthetic import SyntheticConfig
from models.encoder import TextEncoder

SHARED = Path(__file__).resolve().parents[2] / "shared"


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
    return prepare_source("synthetic", out, synthetic_config=cfg, encoder=TextEncoder(cache_path=encoder_cache),
                          progress=False)


@pytest.fixture(scope="session")
def tiny_data(tiny_prepared):
    return load_prepared(tiny_prepared)
