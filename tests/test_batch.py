"""Batch recommendations on Ray Data: the job end to end on a real local Ray, its output, the same
top-k as the online ranking (in-process through the Decomposer and Combiner, and over HTTP), the
rerun rule, an event log as input, bad input."""

from __future__ import annotations

import json
import shutil
import socket

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from conftest import local_serve, service_auth

from models.data.batching import make_split
from models.nn import checkpoint
from models.training.loop import new_model
from ray_app.batch.histories import from_arrow, pack, to_arrow
from ray_app.batch.job import main
from ray_app.batch.output import MANIFEST
from ray_app.batch.scoring import OUTPUT_SCHEMA
from ray_app.serve.deployments import Combiner, Decomposer
from ray_app.serve.item_catalogue import training_user_events
from ray_app.serve.records import RankJob
from ray_app.serve.served_model import file_version

K = 5
MAX_LEN = 6  # shorter than every user's log (8 to 20 events): each state comes from a cut window


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    with local_serve(port):
        yield port


@pytest.fixture(scope="module")
def ckpt(tiny_data, tmp_path_factory):
    torch.manual_seed(0)
    model = new_model(
        "decomposer",
        tiny_data,
        make_split(tiny_data.user_offsets, 1),
        lstm_units=16,
        item_dim=16,
        dim_size=8,
        max_len=MAX_LEN,
        combine="max",
    ).eval()
    meta = {"item_source_ids": tiny_data.item_source_ids.tolist()}
    return checkpoint.save(tmp_path_factory.mktemp("ckpt") / "model.pt", model, meta)


@pytest.fixture(scope="module")
def at(tiny_data) -> float:
    return float(tiny_data.timestamps.max() + 3600)


def batch(ckpt, data, out, at, *extra) -> int:
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--k", str(K), "--at", str(at)]
    return main([*args, "--num-cpus", "2", *extra])


@pytest.fixture(scope="module")
def recs(cluster, ckpt, tiny_data, at, tmp_path_factory):
    """The job over the prepared dataset, in ranges of about 100 events (several per actor)."""
    out = tmp_path_factory.mktemp("batch") / "recs.parquet"
    assert batch(ckpt, tiny_data.path, out, at, "--events-per-task", "100") == 0
    return out


@pytest.fixture(scope="module")
def online(tiny_data, ckpt, at, tmp_path_factory) -> dict[str, list[tuple[str, float]]]:
    """Every user's top-k from the online path in-process: the store loaded as the Ingress loads it,
    the Decomposer's states, the Combiner's ranking."""
    db = tmp_path_factory.mktemp("store") / "state.db"
    dec = Decomposer.func_or_class(f"sqlite:///{db}", str(tiny_data.path))
    dec.reconfigure({"checkpoint": str(ckpt)})
    for chunk in training_user_events(tiny_data):
        dec.store.bulk_load(chunk)
    users = list(tiny_data.user_source_ids[1:])
    states = dec._advance_users([(u, True) for u in users])
    comb = Combiner.func_or_class(str(tiny_data.path))
    comb.reconfigure({"checkpoint": str(ckpt)})
    ranked = comb._rank(comb.current, [RankJob(s, None, K, True, False, at) for s in states])
    src = tiny_data.item_source_ids
    return {u: [(src[i], v) for i, v in r.items] for u, r in zip(users, ranked)}


def by_user(table: pa.Table) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for row in table.sort_by([("user_id", "ascending"), ("rank", "ascending")]).to_pylist():
        out.setdefault(row["user_id"], []).append((row["item_id"], row["score"]))
    return out


def assert_same_rankings(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for user in want:
        assert [i for i, _ in got[user]] == [i for i, _ in want[user]], user
        np.testing.assert_allclose([s for _, s in got[user]], [s for _, s in want[user]], rtol=1e-5, atol=1e-6)


# ---- no cluster needed ---------------------------------------------------------------------


def test_pack_keeps_the_window_and_the_event_before_it_and_every_seen_item():
    users = np.array([1] * 5 + [2] * 2)
    items = np.array([3, 4, 3, 5, 6, 7, 7])
    h = pack(users, np.array(["a"] * 5 + ["b"] * 2, object), items, np.full(7, 4.0), np.arange(7), max_len=3)
    assert list(h.user_ids) == ["a", "b"] and list(h.n_events) == [5, 2]
    assert h.items[h.offsets[0] : h.offsets[1]].tolist() == [4, 3, 5, 6]  # the last 3, and the one before
    assert h.items[h.offsets[1] : h.offsets[2]].tolist() == [7, 7]
    assert h.window_starts(3).tolist() == [1, 4]  # a's first scored row is its second; b has no earlier event
    assert h.seen[h.seen_offsets[0] : h.seen_offsets[1]].tolist() == [3, 4, 5, 6]  # the whole log's items
    back = from_arrow(to_arrow(h).slice(1))
    assert list(back.user_ids) == ["b"] and back.items.tolist() == [7, 7] and back.seen.tolist() == [7]


# ---- the job -------------------------------------------------------------------------------


def test_the_output_is_every_users_top_k_in_the_documented_schema(recs, tiny_data, ckpt, at):
    table = pq.read_table(recs)
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert table.num_rows == tiny_data.n_users * K
    ranks = by_user(table)
    assert sorted(ranks) == sorted(tiny_data.user_source_ids[1:])
    assert set(table.column("model_version").to_pylist()) == {file_version(ckpt)}
    assert sorted(set(table.column("rank").to_pylist())) == list(range(1, K + 1))
    for user, items in ranks.items():
        scores = [s for _, s in items]
        assert scores == sorted(scores, reverse=True)
        u = int(np.flatnonzero(tiny_data.user_source_ids == user)[0])
        seen = set(tiny_data.item_source_ids[tiny_data.items[tiny_data.user_events(u)]])
        assert not seen & {i for i, _ in items}  # exclude_seen: nothing the user has had
    manifest = json.loads((recs / MANIFEST).read_text())
    assert manifest["users"] == tiny_data.n_users and manifest["rows"] == table.num_rows and manifest["at"] == at


def test_every_user_gets_the_online_rankings_top_k(recs, online):
    assert_same_rankings(by_user(pq.read_table(recs)), online)


def test_an_event_log_gives_the_same_recommendations(cluster, ckpt, tiny_data, at, recs, tmp_path):
    """The same events as an event-log CSV, rows shuffled: Ray Data groups them per user again."""
    users = np.repeat(tiny_data.user_source_ids[1:], np.diff(tiny_data.user_offsets))
    order = np.random.default_rng(0).permutation(tiny_data.n_events)
    log = tmp_path / "log"
    log.mkdir()
    events = pa.table(
        {
            "user_id": pa.array(users[order], pa.string()),
            "item_id": pa.array(tiny_data.item_source_ids[tiny_data.items][order], pa.string()),
            "timestamp": tiny_data.timestamps[order],
            "rating": tiny_data.ratings[order],
        }
    )
    pacsv.write_csv(events, log / "events.csv")
    assert batch(ckpt, log, tmp_path / "from-log", at) == 0
    assert_same_rankings(by_user(pq.read_table(tmp_path / "from-log")), by_user(pq.read_table(recs)))


def test_a_rerun_is_refused_and_overwrite_replaces_the_output_whole(
    cluster, ckpt, tiny_data, at, recs, tmp_path, capsys
):
    out = tmp_path / "recs.parquet"
    shutil.copytree(recs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert batch(ckpt, tiny_data.path, out, at) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    # A run that fails (a malformed event log) leaves the earlier output as it was.
    log = tmp_path / "bad-log"
    log.mkdir()
    (log / "events.csv").write_text("user_id,item_id,timestamp\n1,1,1577984850\n1,2,2013-02-30\n")
    assert batch(ckpt, log, out, at, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "error: events.csv, column 'timestamp': '2013-02-30' is neither epoch seconds nor an ISO 8601 time" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite with a good run: the new output replaces the old one whole.
    assert batch(ckpt, tiny_data.path, out, at, "--overwrite", "--k", "3") == 0
    table = pq.read_table(out)
    assert table.num_rows == tiny_data.n_users * 3 and not set(before) & {p.name for p in out.glob("*.parquet")}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_bad_input_is_one_line_naming_what_is_wrong(cluster, ckpt, tiny_data, at, tmp_path, capsys):
    assert batch(ckpt, tmp_path / "nowhere", tmp_path / "a", at) == 2
    assert "--data" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert batch(ckpt, empty, tmp_path / "b", at) == 2
    assert "neither a prepared dataset (manifest.json) nor an event log" in capsys.readouterr().err
    (empty / "events.csv").write_text("user_id,timestamp\n1,1577984850\n")
    assert batch(ckpt, empty, tmp_path / "c", at) == 2
    assert "error: events.csv: no 'item_id' column" in capsys.readouterr().err
    assert batch(tmp_path / "no-model.pt", tiny_data.path, tmp_path / "d", at) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name in ("a", "b", "c", "d")]  # nothing written
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--data", str(tiny_data.path), "--out", str(tmp_path / "e"), "--k", "0"])
    assert "--k must be positive" in capsys.readouterr().err


def test_recommend_over_http_gives_the_batch_top_k(cluster, recs, ckpt, tiny_data, at, tmp_path, capsys):
    """One real check through the Serve app: /recommend at the batch's moment gives its rows; with
    items added over HTTP, a job reading the API's store (--store-url) ranks them as /recommend does."""
    from ray import serve

    from ray_app.serve.app import AppArgs, build_app

    store_url = f"sqlite:///{tmp_path / 's.db'}"
    args = AppArgs(checkpoint=str(ckpt), data_dir=str(tiny_data.path), store_url=store_url)
    serve.run(build_app(args), name="batch-check", route_prefix="/")
    try:
        want = by_user(pq.read_table(recs))
        with httpx.Client(base_url=f"http://127.0.0.1:{cluster}", timeout=60, headers=service_auth()) as client:
            for user in list(want)[:3]:
                r = client.post(
                    "/recommend", json={"user_id": user, "context": {"timestamp": at}, "k": K, "exclude_seen": True}
                )
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["model_version"] == file_version(ckpt)
                assert [str(i["item_id"]) for i in body["items"]] == [i for i, _ in want[user]]
                np.testing.assert_allclose([i["score"] for i in body["items"]], [s for _, s in want[user]], rtol=1e-5)
            # Items added while serving: a job given the API's store ranks them as /recommend does.
            titles = pq.read_table(tiny_data.path / "items.parquet", columns=["title"]).column(0).to_pylist()
            for n, title in enumerate(titles[:2]):
                r = client.post("/items", json={"item_id": f"added-{n}", "title": title})
                assert r.status_code == 201, r.text
            out, every = tmp_path / "with-added", tiny_data.n_items + 2
            assert batch(ckpt, tiny_data.path, out, at, "--store-url", store_url, "--k", str(every)) == 0
            assert json.loads((out / MANIFEST).read_text())["added_items"] == 2
            got = by_user(pq.read_table(out))
            for user in list(got)[:3]:
                assert {"added-0", "added-1"} <= {i for i, _ in got[user]}
                r = client.post(
                    "/recommend", json={"user_id": user, "context": {"timestamp": at}, "k": every, "exclude_seen": True}
                )
                assert r.status_code == 200, r.text
                assert [str(i["item_id"]) for i in r.json()["items"]] == [i for i, _ in got[user]]
                np.testing.assert_allclose(
                    [i["score"] for i in r.json()["items"]], [s for _, s in got[user]], rtol=1e-5, atol=1e-6
                )
    finally:
        serve.delete("batch-check")
    # The same users as an event log, one of them with an event on an added item: the others get the
    # same rankings, and that user no longer gets the item it has seen.
    users = np.repeat(tiny_data.user_source_ids[1:], np.diff(tiny_data.user_offsets))
    fan = str(tiny_data.user_source_ids[1])
    log = tmp_path / "log"
    log.mkdir()
    pacsv.write_csv(
        pa.table(
            {
                "user_id": pa.array([*users, fan], pa.string()),
                "item_id": pa.array([*tiny_data.item_source_ids[tiny_data.items], "added-0"], pa.string()),
                "timestamp": [*tiny_data.timestamps, float(tiny_data.timestamps.min())],
                "rating": [*tiny_data.ratings, 4.0],
            }
        ),
        log / "events.csv",
    )
    assert batch(ckpt, log, tmp_path / "from-log", at, "--store-url", store_url, "--k", str(every)) == 0
    from_log = by_user(pq.read_table(tmp_path / "from-log"))
    assert_same_rankings({u: r for u, r in from_log.items() if u != fan}, {u: r for u, r in got.items() if u != fan})
    assert "added-0" in {i for i, _ in got[fan]} and "added-0" not in {i for i, _ in from_log[fan]}
    # Refused, one line each, nothing written: a store file that does not exist, and added items
    # with a checkpoint trained without item text (nothing to place them by).
    assert batch(ckpt, tiny_data.path, tmp_path / "x", at, "--store-url", f"sqlite:///{tmp_path / 'typo.db'}") == 2
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "x").exists()
    torch.manual_seed(0)
    ids_only = new_model(
        "decomposer", tiny_data, make_split(tiny_data.user_offsets, 1), lstm_units=8, item_dim=8, use_text=False
    )
    meta = {"item_source_ids": tiny_data.item_source_ids.tolist()}
    ids_ckpt = checkpoint.save(tmp_path / "ids.pt", ids_only.eval(), meta)
    capsys.readouterr()
    assert batch(ids_ckpt, tiny_data.path, tmp_path / "y", at, "--store-url", store_url) == 2
    assert "trained without item text" in capsys.readouterr().err and not (tmp_path / "y").exists()
