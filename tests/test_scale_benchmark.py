"""The scale benchmark's data generator (MovieLens files the real reader takes) and its fits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale  # noqa: E402
from scale_data import ScaleConfig, write_release  # noqa: E402

from models.data import read_movielens  # noqa: E402


def test_generated_release_reads_as_movielens_with_its_shape(tmp_path):
    record = write_release(ScaleConfig(events=20_000, items=2_000, seed=1), tmp_path)
    raw = read_movielens(tmp_path, name="scale")
    assert raw.ratings.num_rows == record["events"] == 20_000
    # Source ids are strings on the data path; the generator writes MovieLens's integers.
    users = raw.ratings.column("user").to_numpy(zero_copy_only=False).astype(np.int64)
    items = raw.ratings.column("item").to_numpy(zero_copy_only=False).astype(np.int64)
    assert np.unique(users * 10_000 + items).size == len(items)  # a user rates an item once
    counts = np.bincount(users)[1:-1]  # the last user may be cut short
    assert counts.min() >= 10 and 40 <= np.median(counts) <= 110  # ≥ 20 draws, repeats dropped; median ~70
    pop = np.sort(np.bincount(items))[::-1]
    assert pop[: len(pop) // 10].sum() > 0.3 * pop.sum()  # a long tail: the top tenth holds a third
    assert raw.tag_events is not None and raw.tag_events.num_rows == record["tags"] > 0
    assert set(raw.ratings.column("rating").to_numpy()) <= set(np.arange(1, 11) / 2.0)


def test_sizes_parse_and_bad_ones_are_named():
    assert scale.parse_sizes("100k:10k,10M:60k") == [("100k-10k", 100_000, 10_000), ("10M-60k", 10**7, 60_000)]
    with pytest.raises(Exception, match="EVENTS:ITEMS"):
        scale.parse_sizes("100k")


def size(events: int, items: int, rss: float, seconds: float) -> dict:
    return {"events": events, "items": items, "stages": {"load": {"peak_rss": rss, "load_s": seconds}}}


def test_slopes_and_memory_model_recover_planted_costs():
    plant = [(10**5, 10**4), (10**6, 10**4), (10**6, 60_000), (10**7, 60_000)]
    sizes = [size(e, i, 3e8 + 200 * e + 5e4 * i, 1e-5 * e) for e, i in plant]
    summary = scale.summarize(sizes)
    assert summary["60000 items"]["seconds_slope"]["load_s"] == pytest.approx(1.0)
    model = scale.memory_model(sizes)["load"]
    assert model["base"] == pytest.approx(3e8, rel=1e-6)
    assert model["per_event"] == pytest.approx(200, rel=1e-6)
    assert model["per_item"] == pytest.approx(5e4, rel=1e-6)
