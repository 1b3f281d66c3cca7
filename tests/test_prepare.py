"""prepare / prepare_source / load_prepared: contents, atomicity, reuse and validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.data import (
    DataFormatError,
    ITEMS_SCHEMA,
    RATINGS_SCHEMA,
    RawData,
    intent_phrases,
    item_text,
    load_prepared,
    prepare,
    prepare_source,
)
from models.data.encoder import DIM


def csv_folder(root: Path) -> Path:
    """A tiny ml-latest-small style folder (CRLF, like the real files)."""
    folder = root / "ml-latest-small"
    folder.mkdir(parents=True)
    (folder / "movies.csv").write_bytes(
        b"movieId,title,genres\r\n1,Toy Story (1995),Animation|Comedy\r\n"
        b'2,"American President, The (1995)",Comedy|Romance\r\n'
    )
    (folder / "ratings.csv").write_bytes(
        b"userId,movieId,rating,timestamp\r\n"
        + b"".join(f"{u},{i},4.0,{100 * u + i}\r\n".encode() for u in (1, 2) for i in (1, 2, 1))
    )
    return folder


class FakeEncoder:
    """Deterministic unit vectors from a hash of the text; counts what it was asked."""

    model_name = "fake-encoder"
    dim = DIM

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts, progress=False):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), DIM), np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            out[i] = np.random.default_rng(seed).normal(size=DIM)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class CrashingEncoder(FakeEncoder):
    def encode(self, texts, progress=False):
        raise RuntimeError("encoder crashed")


def make_raw() -> RawData:
    items = pa.table(
        {
            "source_id": ["30", "10", "20", "40"],
            "title": ["Heat (1995)", "Toy Story (1995)", "Sabrina (1995)", "Never Rated (2000)"],
            "genres": [["Action", "Crime"], ["Animation", "Comedy"], ["Comedy", "Romance"], ["Drama"]],
            "tags": [[], ["pixar", "fun", "toys", "cgi", "buddy", "kids"], ["remake"], []],
            "text": [None] * 4,
        },
        schema=ITEMS_SCHEMA,
    )
    ratings = pa.table(
        {
            "user": ["7", "5", "7", "5", "5", "7", "9", "9", "5"],
            "item": ["30", "10", "10", "20", "30", "20", "10", "20", "10"],
            "rating": [4.0, 5.0, 3.0, 2.5, 4.5, 1.0, 3.0, 3.0, 4.0],
            # user 5 has a timestamp tie (200): the two take the seeded order
            "timestamp": [300, 200, 100, 200, 100, 200, 50, 60, 400],
        },
        schema=RATINGS_SCHEMA,
    )
    return RawData(
        "toy", items, ratings, source="made by hand", extra={"truth": pa.table({"user": [5, 7], "note": ["a", "b"]})}
    )


def test_text_and_phrases():
    assert (
        item_text("Toy Story (1995)", ["Animation", "Comedy"], list("abcdefg"))
        == "Toy Story (1995). Genres: Animation, Comedy. Tags: a, b, c, d, e"
    )
    assert item_text("Heat (1995)", [], []) == "Heat (1995)"
    assert intent_phrases(["Comedy", "Romance", "Drama"], ["Paris", "kiss", "rain", "wine"]) == [
        "comedy",
        "romance",
        "drama",
        "comedy and romance",
        "paris",
        "kiss",
        "rain",
    ]
    assert intent_phrases([], []) == []


def test_prepare_tables_and_manifest(tmp_path):
    enc = FakeEncoder()
    out = prepare(make_raw(), tmp_path / "toy", encoder=enc, min_user_events=3, progress=False)
    items = pq.read_table(out / "items.parquet")
    assert items.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert items.schema.field("item_idx").type == pa.int32()
    assert items.schema.field("intent_ids").type == pa.list_(pa.int32())
    # user 9 (2 events) is dropped; item 40 is never rated; items ordered by source id
    assert items.column("source_id").to_pylist() == ["10", "20", "30"]
    assert items.column("item_idx").to_pylist() == [1, 2, 3]
    assert (
        items.column("text")[0].as_py()
        == "Toy Story (1995). Genres: Animation, Comedy. Tags: pixar, fun, toys, cgi, buddy"
    )
    inter = pq.read_table(out / "interactions.parquet")
    assert inter.schema == pa.schema(
        [
            ("user_idx", pa.int32()),
            ("source_user", pa.string()),
            ("item_idx", pa.int32()),
            ("rating", pa.float32()),
            ("timestamp", pa.int64()),
        ]
    )
    d = inter.to_pydict()
    assert d["source_user"] == ["5", "5", "5", "5", "7", "7", "7"]
    assert d["user_idx"] == [1, 1, 1, 1, 2, 2, 2]
    # User 5's events at t=200 (items 10 and 20, in that file order) tie: either order, the rest by time.
    assert d["item_idx"][0] == 3 and sorted(d["item_idx"][1:3]) == [1, 2] and d["item_idx"][3:] == [1, 1, 2, 3]
    assert d["timestamp"] == [100, 200, 200, 400, 100, 200, 300]
    intents = pq.read_table(out / "intents.parquet")
    phrases = intents.column("phrase").to_pylist()
    assert phrases == sorted(phrases) and "comedy and romance" in phrases
    assert "toys" in phrases and "cgi" not in phrases  # at most 3 tags per item
    assert not any("(1995)" in p for p in phrases)  # never the title
    assert pq.read_table(out / "user_map.parquet").to_pydict() == {"user_idx": [1, 2], "source_user": ["5", "7"]}
    assert pq.read_table(out / "truth.parquet").equals(make_raw().extra["truth"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 5 and m["dataset"] == "toy" and m["source"] == "made by hand"
    assert m["tie_seed"] == 0
    assert m["counts"] == {"users": 2, "items": 3, "interactions": 7, "genres": 5, "intents": len(phrases)}
    assert m["genres"] == ["Action", "Animation", "Comedy", "Crime", "Romance"]
    assert m["encoder"] == {"model": "fake-encoder", "dim": DIM}
    assert "leave-one-out" in m["split_protocol"] and m["created"].endswith("+00:00")
    for name, info in m["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]
    assert set(m["files"]) == {
        "items.parquet",
        "interactions.parquet",
        "intents.parquet",
        "user_map.parquet",
        "truth.parquet",
    }
    assert len(enc.calls) == 2 and len(enc.calls[1]) == len(set(enc.calls[1]))  # phrases once


def test_load_prepared(tmp_path):
    out = prepare(make_raw(), tmp_path / "toy", encoder=FakeEncoder(), progress=False)
    data = load_prepared(out)
    assert (data.n_users, data.n_items, data.n_events) == (2, 3, 7)
    assert data.user_offsets.tolist() == [0, 4, 7]
    assert data.items[data.user_events(2)].tolist() == [1, 2, 3]
    assert data.titles == ["<pad>", "Toy Story (1995)", "Sabrina (1995)", "Heat (1995)"]
    assert data.item_source_ids.tolist() == ["", "10", "20", "30"]
    assert data.user_source_ids.tolist() == ["", "5", "7"]
    assert data.item_genres.shape == (4, 5) and not data.item_genres[0].any()
    heat = [data.genre_names[j] for j in np.flatnonzero(data.item_genres[3])]
    assert heat == ["Action", "Crime"]
    assert data.item_emb.shape == (4, DIM) and not data.item_emb[0].any()
    np.testing.assert_allclose(np.linalg.norm(data.item_emb[1:], axis=1), 1.0, atol=1e-5)
    assert data.item_intent_offsets.shape == (5,) and data.item_intent_offsets[:2].tolist() == [0, 0]
    sabrina = [data.intent_phrases[k] for k in data.item_intents(2)]
    assert sabrina == ["comedy", "romance", "comedy and romance", "remake"]
    assert data.intent_emb.shape == (len(data.intent_phrases), DIM)
    assert data.ratings.dtype == np.float32 and data.timestamps.dtype == np.int64


def test_load_prepared_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_prepared(tmp_path)
    out = prepare(make_raw(), tmp_path / "toy", encoder=FakeEncoder(), progress=False)
    (out / "intents.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="intents.parquet"):
        load_prepared(out)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataFormatError, match="manifest.json: format_version 99"):
        load_prepared(out)


def test_prepare_is_atomic(tmp_path):
    out = prepare(make_raw(), tmp_path / "toy", encoder=FakeEncoder(), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError):
        prepare(make_raw(), out, encoder=FakeEncoder(), progress=False)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        prepare(make_raw(), out, encoder=CrashingEncoder(), overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no temp folder left


def test_prepare_crash_while_writing(tmp_path):
    out = prepare(make_raw(), tmp_path / "toy", encoder=FakeEncoder(), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    raw = make_raw()
    raw.extra["broken"] = object()  # fails after the main tables are written
    with pytest.raises(AttributeError, match="schema"):  # not a table: fails when written
        prepare(raw, out, encoder=FakeEncoder(), overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_prepare_overwrite_replaces(tmp_path):
    out = prepare(make_raw(), tmp_path / "toy", encoder=FakeEncoder(), progress=False)
    prepare(make_raw(), out, encoder=FakeEncoder(), min_user_events=2, overwrite=True, progress=False)
    assert load_prepared(out).n_users == 3
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_prepare_source_reuses_output(tmp_path):
    data_dir = csv_folder(tmp_path / "src")
    out = tmp_path / "prepared"
    enc = FakeEncoder()
    prepare_source("ml-latest-small", out, data_dir=data_dir, encoder=enc)
    created = json.loads((out / "manifest.json").read_text())["created"]
    assert load_prepared(out).n_users == 2
    again = prepare_source("ml-latest-small", out, data_dir=data_dir, encoder=CrashingEncoder())
    assert again == out and json.loads((out / "manifest.json").read_text())["created"] == created
    other = csv_folder(tmp_path / "other")
    with pytest.raises(FileExistsError, match="another source"):
        prepare_source("ml-latest-small", out, data_dir=other, encoder=enc)
    prepare_source("ml-latest-small", out, data_dir=other, encoder=enc, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["request"]["input"] == str(other.resolve())


def test_prepare_source_synthetic(tmp_path):
    synthetic = pytest.importorskip("models.data.synthetic")
    config = synthetic.SyntheticConfig(n_users=20, n_items=40)
    out = prepare_source("synthetic", tmp_path / "syn", encoder=FakeEncoder(), synthetic_config=config)
    data = load_prepared(out)
    assert data.n_users == 20 and data.n_items > 0 and data.intent_emb.shape[0] > 0
    assert prepare_source("synthetic", out, encoder=CrashingEncoder(), synthetic_config=config) == out


def test_prepare_source_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare_source("netflix", tmp_path / "x", encoder=FakeEncoder())


def bulk_rated(n_users: int, per_second: int) -> RawData:
    """Each user rates `per_second` items within one second, listed in ascending item id (as MovieLens
    lists a bulk-rating second), after two earlier events: file order says the last event of the
    second, the test target, is its largest id."""
    users, items, times = [], [], []
    rng = np.random.default_rng(7)
    for u in range(1, n_users + 1):
        bulk = np.sort(rng.choice(np.arange(3, 40), per_second, replace=False))
        for t, i in [(10, 1), (20, 2), *((30, int(i)) for i in bulk)]:
            users.append(str(u))
            items.append(str(i))
            times.append(1000 * u + t)
    n = len(users)
    ratings = pa.table({"user": users, "item": items, "rating": [4.0] * n, "timestamp": times}, schema=RATINGS_SCHEMA)
    ids = [str(i) for i in range(1, 40)]
    items_t = pa.table(
        {
            "source_id": ids,
            "title": [f"m{i}" for i in ids],
            "genres": [[]] * 39,
            "tags": [[]] * 39,
            "text": [None] * 39,
        },
        schema=ITEMS_SCHEMA,
    )
    return RawData("bulk", items_t, ratings)


def test_file_order_within_a_second_does_not_show_through(tmp_path):
    n_users, k = 200, 5
    raw = bulk_rated(n_users, k)
    out = prepare(raw, tmp_path / "a", encoder=FakeEncoder(), progress=False)
    data = load_prepared(out)
    ids = np.array([0, *map(int, data.item_source_ids[1:])])  # item index -> its id as a number
    last = np.array([ids[data.items[data.user_offsets[u] - 1]] for u in range(1, n_users + 1)])
    bulk = [ids[data.items[data.user_offsets[u] - k : data.user_offsets[u]]] for u in range(1, n_users + 1)]
    # In file order the rule "the target is the largest id of its second" is right for every user;
    # after preparation about 1 in k.
    hits = np.mean([t == max(b) for t, b in zip(last, bulk)])
    assert 0.1 < hits < 0.35
    ascending = np.mean([list(b) == sorted(b) for b in bulk])
    assert ascending < 0.05  # 1 in k! = 120 by chance
    # Only the tied events move: each user's two earlier events keep their places.
    assert all(ids[data.items[data.user_offsets[u - 1]]] == 1 for u in range(1, n_users + 1))
    # The order is the same every run: the same input prepares the same bytes.
    again = prepare(bulk_rated(n_users, k), tmp_path / "b", encoder=FakeEncoder(), progress=False)
    for name in ("interactions.parquet", "items.parquet", "user_map.parquet"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


# ---- no future information in item text -------------------------------------------------------


def _tagged_folder(root: Path, extra_tags: list[str]) -> Path:
    """Three users × 14 events (every protocol's targets at times ≥ 1000), six movies, early tags."""
    folder = root / "ml-latest-small"
    folder.mkdir(parents=True)
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        + "".join(f"{i},Movie {i} (1999),{g}\n" for i, g in zip(range(1, 7), ["Comedy", "Drama", "Horror"] * 2))
    )
    rows = [f"{u},{1 + (u + j) % 6},4.0,{1000 * j + u}" for u in (1, 2, 3) for j in range(14)]
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n")
    tags = ["1,1,funny,5", "2,2,sad,6", *extra_tags]
    (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n" + "\n".join(tags) + "\n")
    return folder


def test_a_tag_applied_after_a_target_does_not_change_its_score(tmp_path):
    import torch

    from models.data.batching import make_split
    from models.data.prepare import evaluation_cutoff
    from models.evaluation.evaluate import evaluate
    from models.training.loop import new_model

    def prepared_scores(name: str, extra: list[str]):
        out = prepare_source(
            "ml-latest-small",
            tmp_path / name / "out",
            encoder=FakeEncoder(),
            data_dir=_tagged_folder(tmp_path / name, extra),
            progress=False,
        )
        data = load_prepared(out)
        split = make_split(data.user_offsets, 10, 10)
        torch.manual_seed(0)
        model = new_model("decomposer", data, split)
        ev = evaluate(model, data, split, "test")
        return data, np.concatenate([ev["masked"]["ndcg@10"], ev["unmasked"]["mrr"]]), out

    base, base_scores, out = prepared_scores("base", [])
    manifest = json.loads((out / "manifest.json").read_text())
    cutoff = manifest["tags"]["used_before"]
    # The earliest evaluated event: user 1's 3rd (14 events: 10 test, 2 validation, 2 to train on).
    assert (
        cutoff
        == 2001
        == evaluation_cutoff(np.repeat([1, 2, 3], 14), np.tile(1000 * np.arange(14), 3) + np.repeat([1, 2, 3], 14))
    )
    target_item = base.item_source_ids[base.items[base.user_offsets[1] - 1]]  # user 1's last target
    late = [f"9,{target_item},spoiler ending,{cutoff + 1}", f"9,{target_item},spoiler ending,99999"]
    planted, planted_scores, planted_out = prepared_scores("late", late)
    assert json.loads((planted_out / "manifest.json").read_text())["tags"]["applied"] == 4
    np.testing.assert_array_equal(planted.item_emb, base.item_emb)  # the item text did not see it
    np.testing.assert_array_equal(planted_scores, base_scores)  # nor did any target's score
    # The same tag applied before every target is used: the check above can fail.
    early, early_scores, _ = prepared_scores("early", [f"9,{target_item},spoiler ending,{cutoff - 1}"])
    assert not np.array_equal(early.item_emb, base.item_emb)
    assert not np.array_equal(early_scores, base_scores)


def test_the_tag_cutoff_covers_the_longest_protocol():
    from models.data.prepare import MAX_TEST_EVENTS, MAX_VALID_EVENTS
    from models.training.defaults import PROTOCOLS, VALID_TARGETS

    assert MAX_TEST_EVENTS == max(PROTOCOLS.values())
    assert MAX_VALID_EVENTS >= max(VALID_TARGETS.values())
