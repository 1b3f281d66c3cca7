"""The event-log format: reading CSV and Parquet, string ids, the rating mapping, errors that name
file, line or row, and column, nothing half-written, and a few training steps from a tiny log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import CrashingEncoder, FakeEncoder

from models.data import DataFormatError, DataSourceError, load_prepared, prepare_source, read_event_log
from models.data.events import EVENTS_FILE_SCHEMA, ITEMS_FILE_SCHEMA
from models.data.features import IMPLICIT_RATING, rating_bucket

ITEMS_CSV = (
    "item_id,title,categories,text\n"
    "0133093,The Matrix (1999),Action|Sci-Fi,\n"
    "0110912,Pulp Fiction (1994),Crime|Drama,\n"
    "sku-7,A cookbook,,Recipes from a small kitchen\n"
    "0000001,Unrated,Documentary,\n"
)


def write_log(folder: Path, events: str, items: str = ITEMS_CSV) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events.csv").write_text(events)
    (folder / "items.csv").write_text(items)
    return folder


def good_events() -> str:
    """Three users (one with leading zeros), epoch and ISO times, a rating left empty, a context column."""
    rows = [
        "u1,0133093,1362062307,4.5,mobile",
        "u1,0110912,2013-03-01T10:00:00Z,,mobile",
        "u1,sku-7,2013-03-02 10:00:00+02:00,3,tv",
        "007,0110912,1362100000,5,tv",
        "007,0133093,1362200000,2.5,tv",
        "007,sku-7,1362300000,,tv",
        "u3,sku-7,1362000000,1,tv",
    ]
    return "user_id,item_id,timestamp,rating,device\n" + "\n".join(rows) + "\n"


def test_csv_log_keeps_string_ids_and_maps_ratings(tmp_path):
    raw = read_event_log(write_log(tmp_path / "log", good_events()))
    r = raw.ratings.to_pydict()
    assert r["user"][:4] == ["u1", "u1", "u1", "007"] and r["item"][:2] == ["0133093", "0110912"]
    assert r["timestamp"][:3] == [1362062307, 1362132000, 1362211200]  # ISO with and without a zone: UTC
    assert r["rating"] == [4.5, IMPLICIT_RATING, 3.0, 5.0, 2.5, IMPLICIT_RATING, 1.0]
    items = {row["source_id"]: row for row in raw.items.to_pylist()}
    assert items["0133093"]["genres"] == ["Action", "Sci-Fi"] and items["0133093"]["text"] is None
    assert items["sku-7"]["genres"] == [] and items["sku-7"]["text"] == "Recipes from a small kitchen"
    assert raw.details["context_columns"] == ["device"]
    assert raw.details["ratings"] == {"column": "rating", "implicit": 2}

    out = prepare_source("events", tmp_path / "prepared", data_dir=tmp_path / "log", encoder=FakeEncoder())
    data = load_prepared(out)
    # Every id as the file wrote it, in string order (not every id is a number); u3, with one event, is dropped.
    assert data.item_source_ids.tolist() == ["", "0110912", "0133093", "sku-7"]
    assert data.user_source_ids.tolist() == ["", "007", "u1"]
    assert data.n_users == 2 and data.n_events == 6
    texts = pq.read_table(out / "items.parquet").column("text").to_pylist()
    assert texts[2] == "Recipes from a small kitchen" and texts[1] == "The Matrix (1999). Genres: Action, Sci-Fi"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_details"]["events"] == "events.csv" and manifest["dataset"] == "events"


def test_parquet_log_with_integer_ids_timestamps_and_weights(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir()
    when = pa.array([1_600_000_000_000_000 + k * 3_600_000_000 for k in range(4)], pa.timestamp("us", tz="UTC"))
    pq.write_table(
        pa.table(
            {"user_id": [5, 5, 5, 6], "item_id": [10, 20, 10, 20], "timestamp": when, "weight": [0.0, 1.0, None, 0.5]}
        ),
        folder / "events.parquet",
    )
    pq.write_table(
        pa.table({"item_id": [10, 20], "title": ["ten", None], "categories": [["a", " b "], None]}),
        folder / "items.parquet",
    )
    raw = read_event_log(folder)
    r = raw.ratings.to_pydict()
    assert r["user"] == ["5", "5", "5", "6"] and r["item"] == ["10", "20", "10", "20"]
    assert r["timestamp"] == [1_600_000_000 + 3600 * k for k in range(4)]
    assert r["rating"] == [0.5, 5.0, IMPLICIT_RATING, 2.75]
    assert rating_bucket(np.array(r["rating"])).tolist() == [1, 10, 8, 6]  # weight 0 → 1, weight 1 → 10
    assert raw.items.to_pydict()["genres"] == [["a", "b"], []] and raw.items.to_pydict()["title"] == ["ten", ""]


def test_the_schemas_are_the_documented_format():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data-and-evaluation.md").read_text()
    for field in (*EVENTS_FILE_SCHEMA, *ITEMS_FILE_SCHEMA):
        assert f"`{field.name}`" in doc


@pytest.mark.parametrize(
    "events, items, message",
    [
        (
            "user_id,item_id,timestamp\nu1,0133093,1362062307\nu1,0133093,2013-02-30\n",
            ITEMS_CSV,
            "events.csv line 3, column 'timestamp': '2013-02-30' is neither epoch seconds nor an ISO 8601 time",
        ),
        ("user_id,item_id\nu1,0133093\n", ITEMS_CSV, "events.csv: no 'timestamp' column (it has user_id, item_id"),
        (
            "user_id,item_id,timestamp\nu1,0133093,1\n\nu1,9999999,2\nu2,8888888,3\n",
            ITEMS_CSV,
            "events.csv line 4, column 'item_id': item '9999999' has no row in items.csv (2 item(s) have none)",
        ),
        (
            "user_id,item_id,timestamp,rating\nu1,0133093,1,7\n",
            ITEMS_CSV,
            "events.csv line 2, column 'rating': 7 is outside 0.5..5; stars are 0.5..5: divide a 0–10 rating by 2",
        ),
        ("user_id,item_id,timestamp,rating\nu1,0133093,1,good\n", ITEMS_CSV, "line 2, column 'rating': 'good' is not"),
        ("user_id,item_id,timestamp,weight\nu1,0133093,1,3\n", ITEMS_CSV, "column 'weight': 3 is outside 0..1"),
        ("user_id,item_id,timestamp,rating,weight\nu1,0133093,1,4,1\n", ITEMS_CSV, "both a rating and a weight"),
        ("user_id,item_id,timestamp\nu1,0133093,1362062307000\n", ITEMS_CSV, "line 2, column 'timestamp': "),
        ("user_id,item_id,timestamp\nu1,0133093\n", ITEMS_CSV, "events.csv line 2: expected 3 fields"),
        ("user_id,item_id,timestamp\n ,0133093,1\n", ITEMS_CSV, "events.csv line 2, column 'user_id': empty id"),
        (
            "user_id,item_id,timestamp\nu1,0133093,1\n",
            "item_id,title\n0133093,a\n0110912,b\n0133093,c\n",
            "items.csv line 4, column 'item_id': item '0133093' appears twice (first at line 2)",
        ),
        ("user_id,item_id,timestamp\nu1,0133093,1\n", "title\nx\n", "items.csv: no 'item_id' column"),
    ],
)
def test_errors_name_file_line_and_column(tmp_path, events, items, message):
    with pytest.raises(DataFormatError) as e:
        read_event_log(write_log(tmp_path / "log", events, items))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parquet_errors_name_the_row(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir()
    pq.write_table(
        pa.table({"user_id": ["a", "b"], "item_id": ["1", "1"], "timestamp": [5, -5]}), folder / "events.parquet"
    )
    pq.write_table(pa.table({"item_id": ["1"]}), folder / "items.parquet")
    with pytest.raises(DataFormatError, match=r"^events.parquet row 2, column 'timestamp': -5 is before 1970$"):
        read_event_log(folder)
    pq.write_table(pa.table({"user_id": ["a"], "item_id": [1.0], "timestamp": [5]}), folder / "events.parquet")
    with pytest.raises(DataFormatError, match=r"^events.parquet, column 'item_id': has type double, expected text or"):
        read_event_log(folder)


def test_missing_files_and_folders_say_what_to_pass(tmp_path):
    with pytest.raises(DataSourceError, match="--dataset events reads --data-dir DIR"):
        prepare_source("events", tmp_path / "out", encoder=FakeEncoder())
    with pytest.raises(
        DataSourceError, match="--data-dir .*nowhere: no such folder or file; pass a folder with events"
    ):
        prepare_source("events", tmp_path / "out", data_dir=tmp_path / "nowhere", encoder=FakeEncoder())
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "events.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataSourceError, match="half: no items.parquet or items.csv"):
        prepare_source("events", tmp_path / "out", data_dir=tmp_path / "half", encoder=FakeEncoder())


def test_a_bad_log_leaves_the_earlier_output_whole_and_a_changed_one_is_prepared_again(tmp_path):
    log = write_log(tmp_path / "log", good_events())
    out = prepare_source("events", tmp_path / "prepared", data_dir=log, encoder=FakeEncoder(), min_user_events=3)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare_source("events", out, data_dir=log, encoder=CrashingEncoder(), min_user_events=3) == out
    (log / "events.csv").write_text(good_events() + "u3,0133093,not-a-time,4,tv\n")
    with pytest.raises(DataFormatError, match="events.csv line 9, column 'timestamp'"):
        prepare_source("events", out, data_dir=log, encoder=FakeEncoder(), min_user_events=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "prepared"]  # no temporary folder left
    (log / "events.csv").write_text(good_events() + "u3,0133093,1362400000,4,tv\nu3,0110912,1362500000,4,tv\n")
    prepare_source("events", out, data_dir=log, encoder=FakeEncoder(), min_user_events=3)
    assert (load_prepared(out).n_users, load_prepared(out).n_events) == (3, 9)  # u3 now has three events


def test_a_few_training_steps_from_a_tiny_event_log(tmp_path, encoder_cache):
    """`python -m models.training.run --dataset events --data-dir DIR`, end to end with the real encoder."""
    from models.training.run import main

    rng = np.random.default_rng(0)
    ids = [f"{k:07d}" for k in range(1, 25)]
    items = "item_id,title,categories\n" + "".join(
        f"{i},Film {i},{['Comedy', 'Drama', 'Horror'][k % 3]}\n" for k, i in enumerate(ids)
    )
    rows = [
        f"user{u},{ids[rng.integers(len(ids))]},{1_600_000_000 + 86_400 * u + 600 * j},{rng.integers(1, 11) / 2}"
        for u in range(12)
        for j in range(8)
    ]
    log = write_log(tmp_path / "log", "user_id,item_id,timestamp,rating\n" + "\n".join(rows) + "\n", items)
    argv = ["--dataset", "events", "--data-dir", str(log), "--prepared-dir", str(tmp_path / "prepared")]
    argv += ["--out", str(tmp_path / "run"), "--models", "decomposer,popular", "--epochs", "2", "--seed", "0"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "events" and set(results["results"]) >= {"decomposer", "popular"}
    assert 0.0 <= results["results"]["decomposer"]["masked"]["ndcg@10"] <= 1.0
    data = load_prepared(tmp_path / "prepared")
    assert data.n_users == 12 and all(len(i) == 7 and i.startswith("00") for i in data.item_source_ids[1:])


def test_every_entry_point_takes_an_event_log(tmp_path, encoder_cache):
    """The command lines that take --dataset take `events` with --data-dir and --min-user-events, and
    the Ray entry points (training, tuning, the equal-budget benchmark) prepare it through `resolve_dataset`."""
    from main_job.main import parse_args as main_job_args
    from models.training.run import parse_args as run_args
    from ray_app.train.data import resolve_dataset
    from ray_app.train.settings import parse_args as train_args
    from tuning.search import parse_args as search_args

    log = write_log(tmp_path / "log", good_events())
    argv = ["--dataset", "events", "--data-dir", str(log), "--min-user-events", "4"]
    for s in (run_args(argv), train_args(argv)[0], search_args(argv)[0], main_job_args(argv)):
        assert (s.dataset, s.data_dir, s.min_user_events) == ("events", log, 4)
    prepared = resolve_dataset("events", log, tmp_path / "prepared", progress=False, min_user_events=3)
    assert load_prepared(prepared).user_source_ids.tolist() == ["", "007", "u1"]
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["min_user_events"] == 3 and manifest["request"]["input"] == str(log.resolve())
