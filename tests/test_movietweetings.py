"""MovieTweetings-100k as a named dataset: the counts its SOURCES.md states, IMDb ids as strings,
the 0..10 ratings on the star scale, its protocol's minimum of 5 ratings per user, malformed lines."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from test_prepare import FakeEncoder

from models.data import DataFormatError, DataSourceError, load_prepared, prepare_source
from models.data.features import rating_bucket
from models.data.movietweetings import read_movietweetings
from models.data.sources import SHARED_MOVIETWEETINGS_100K, min_user_events_for

needs_copy = pytest.mark.skipif(not SHARED_MOVIETWEETINGS_100K.is_dir(), reason="no ../shared MovieTweetings copy")


@needs_copy
def test_the_files_are_the_ones_sources_md_describes():
    sums = (SHARED_MOVIETWEETINGS_100K.parent / "SHA256SUMS").read_text().split("\n")
    for line in filter(None, sums):
        digest, name = line.split()
        assert hashlib.sha256((SHARED_MOVIETWEETINGS_100K.parent / name).read_bytes()).hexdigest() == digest


@needs_copy
def test_reads_the_counts_of_sources_md():
    raw = read_movietweetings(SHARED_MOVIETWEETINGS_100K)
    r = raw.ratings
    assert r.num_rows == 100_000 and raw.items.num_rows == 10_506
    assert len(pc.unique(r.column("user"))) == 16_554
    assert pc.min_max(r.column("timestamp")).as_py() == {"min": 1362062307, "max": 1378067265}
    # Integers 0..10 as stars r / 2 (0 joins 1 at 0.5): 12 zeros on the file's scale.
    stars = r.column("rating").to_numpy()
    assert set(np.unique(stars * 2)) <= set(range(1, 11)) and stars.max() == 5.0
    lines = (SHARED_MOVIETWEETINGS_100K / "ratings.dat").read_text().split("\n")
    assert sum(line.split("::")[2] == "0" for line in lines if line) == 12
    assert rating_bucket(np.array([0.5, 5.0])).tolist() == [1, 10]
    # IMDb ids as written, leading zeros and all: The Matrix is 0133093, not 133093.
    items = {row["source_id"]: row for row in raw.items.to_pylist()}
    assert items["0133093"]["title"] == "The Matrix (1999)"
    assert items["0004972"]["genres"] == ["Drama", "History", "Romance", "War"]
    assert all(len(i) == 7 for i in items)


@needs_copy
def test_prepared_with_its_protocol_minimum(tmp_path):
    assert min_user_events_for("movietweetings-100k") == 5 and min_user_events_for("ml-latest-small") == 3
    assert min_user_events_for("movietweetings-100k", 3) == 3
    with pytest.raises(DataSourceError, match="--min-user-events 2: every user needs at least 3 events"):
        min_user_events_for("movietweetings-100k", 2)
    out = prepare_source("movietweetings-100k", tmp_path / "mt", encoder=FakeEncoder(), progress=False)
    data = load_prepared(out)
    # SOURCES.md: 4,692 users have at least 5 ratings (80,854 ratings).
    assert (data.n_users, data.n_events) == (4_692, 80_854)
    assert np.diff(data.user_offsets).min() == 5
    assert "0133093" in set(data.item_source_ids) and all(len(i) == 7 for i in data.item_source_ids[1:])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["min_user_events"] == 5 and manifest["dataset"] == "movietweetings-100k"
    assert manifest["counts"]["items"] == data.n_items == len(np.unique(data.items))


def mt_folder(root: Path, ratings: str, movies: str = "0133093::The Matrix (1999)::Action|Sci-Fi\n") -> Path:
    root.mkdir(parents=True)
    (root / "ratings.dat").write_text(ratings)
    (root / "movies.dat").write_text(movies)
    return root


@pytest.mark.parametrize(
    "ratings, movies, message",
    [
        ("1::0133093::7::1362062307\n1::0133093::7\n", None, "ratings.dat line 2: expected 4 fields"),
        (
            "1::0133093::7::1362062307\n\n1::0133093::11::1362062308\n",
            None,
            "ratings.dat line 3, column 'rating': '11'",
        ),
        ("1::0133093::7::yesterday\n", None, "ratings.dat line 1, column 'timestamp': 'yesterday' is neither"),
        (
            "1::0133093::7::1\n1::0110912::7::2\n",
            None,
            "ratings.dat line 2, column 'item_id': item '0110912' has no row",
        ),
        ("1::0133093::7::1\n", "0133093::The Matrix (1999)\n", "movies.dat line 1: expected 3 fields"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, ratings, movies, message):
    folder = mt_folder(tmp_path / "mt", ratings, *([movies] if movies else []))
    with pytest.raises(DataFormatError) as e:
        read_movietweetings(folder)
    assert message in str(e.value)


def test_data_dir_overrides_the_shared_copy(tmp_path):
    rows = "".join(f"{u}::0133093::{r}::{1362062307 + 60 * r}\n" for u in (1, 2) for r in range(6))
    folder = mt_folder(tmp_path / "mine", rows)
    out = prepare_source("movietweetings-100k", tmp_path / "out", data_dir=folder, encoder=FakeEncoder())
    data = load_prepared(out)
    assert data.user_source_ids.tolist() == ["", "1", "2"] and data.item_source_ids.tolist() == ["", "0133093"]
    assert data.ratings[:6].tolist() == [0.5, 0.5, 1.0, 1.5, 2.0, 2.5]
    with pytest.raises(DataSourceError, match="nowhere: no such folder or file; pass the MovieTweetings folder"):
        prepare_source("movietweetings-100k", tmp_path / "x", data_dir=tmp_path / "nowhere", encoder=FakeEncoder())
