"""TextEncoder: the real all-MiniLM-L6-v2, offline, and its Parquet cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.data.encoder import DIM, MODEL_NAME, TextEncoder, default_cache_path, text_key

TEXTS = [
    "A light romantic comedy about two strangers in Paris.",
    "A funny romantic comedy set in Paris.",
    "A documentary about deep-sea volcanic vents.",
]


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One real model load for the module: (cache path, embeddings of TEXTS)."""
    cache = tmp_path_factory.mktemp("enc") / "cache.parquet"
    enc = TextEncoder(cache_path=cache)
    return cache, enc.encode(TEXTS)


def test_real_model_unit_vectors(warm):
    _, emb = warm
    assert emb.shape == (3, DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_warm_cache_needs_no_model(warm):
    cache, emb = warm
    enc = TextEncoder(cache_path=cache)
    again = enc.encode([TEXTS[2], TEXTS[0], TEXTS[2]])
    assert enc.model is None
    np.testing.assert_array_equal(again, emb[[2, 0, 2]])
    table = pq.read_table(cache)
    assert table.num_rows == 3 and table.schema.field("embedding").type.list_size == DIM


def test_only_missing_texts_are_encoded(warm, tmp_path):
    cache, emb = warm
    copy = tmp_path / "c.parquet"
    copy.write_bytes(cache.read_bytes())
    enc = TextEncoder(cache_path=copy)
    out = enc.encode(TEXTS + ["A horror film in an abandoned hospital."], progress=True)
    np.testing.assert_allclose(out[:3], emb, atol=1e-6)
    assert pq.read_table(copy).num_rows == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c.parquet"]  # no temp file left behind


def test_empty_input_and_cache_location(monkeypatch, tmp_path):
    assert TextEncoder(cache_path=tmp_path / "x.parquet").encode([]).shape == (0, DIM)
    assert MODEL_NAME == "all-MiniLM-L6-v2"
    monkeypatch.setenv("DYNAMIC_INTEREST_CACHE", str(tmp_path / "cachedir"))
    assert default_cache_path() == tmp_path / "cachedir" / "text-embeddings.parquet"
    monkeypatch.setenv("DYNAMIC_INTEREST_CACHE", str(tmp_path / "mine.parquet"))
    assert TextEncoder().cache_path == tmp_path / "mine.parquet"
    monkeypatch.delenv("DYNAMIC_INTEREST_CACHE")
    assert default_cache_path().parts[-3:] == (".cache", "dynamic-interest", "text-embeddings.parquet")


def test_vectors_match_sentence_transformers():
    """The encoder written on `transformers` gives the vectors sentence-transformers gave (the
    reference file was written by it: the empty text and one past the 256-token limit included)."""
    ref = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())
    got = TextEncoder(cache=False).encode(ref["texts"])
    np.testing.assert_allclose(got, np.array(ref["embeddings"], np.float32), atol=1e-5)


def test_the_in_memory_cache_keeps_only_the_most_recent(warm):
    """Serving's cache (cache=False) is an LRU: distinct texts beyond its size push the oldest out,
    and a text read again is kept; the vectors are those of the model either way."""
    _, emb = warm
    enc = TextEncoder(cache=False, max_cached=2)
    np.testing.assert_allclose(enc.encode(TEXTS), emb, atol=1e-6)  # 3 texts through a cache of 2
    assert enc.cached == 2
    enc.encode([TEXTS[1]])  # used again: now the most recent
    enc.encode(["A fourth text, new to the cache."])
    assert enc.cached == 2
    assert text_key(TEXTS[1]) in enc._recent and text_key(TEXTS[2]) not in enc._recent
