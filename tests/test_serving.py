"""The Serve app's pieces without Ray: checkpoints, features, state blobs, the decomposer's
incremental update against a rebuild, the combiner's ranking, errors and app arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from models.nn import checkpoint
from models.data.batching import BatchBuilder, make_split
from models.data.features import moment_features
from models.training.loop import new_model
from models.nn.checkpoint import BestCheckpoint
from ray_app.serve.deployments import Combiner, Decomposer
from ray_app.serve.ingress import _field_path
from ray_app.serve.app import AppArgs, DeploymentSettings, build_app
from ray_app.serve.item_catalogue import Catalogue, training_user_events
from ray_app.serve.records import RankJob
from ray_app.serve.served_model import (
    ServedModel,
    ServingSetupError,
    event_tensors,
    file_version,
    pack_state,
    resolve_checkpoint,
    unpack_state,
)
from ray_app.store.base import Event, StoredState
from ray_app.store.opener import open_store


@pytest.fixture(scope="module")
def ckpt(tiny_data, tmp_path_factory):
    torch.manual_seed(0)
    m = new_model(
        "decomposer",
        tiny_data,
        make_split(tiny_data.user_offsets, 1),
        lstm_units=24,
        item_dim=16,
        dim_size=8,
        combine="mixture",
        profile_decays=(),
    ).eval()  # the plain (h, c) state
    return checkpoint.save(
        tmp_path_factory.mktemp("ckpt") / "model.pt", m, {"item_source_ids": tiny_data.item_source_ids.tolist()}
    )


@pytest.fixture(scope="module")
def profile_ckpt(tiny_data, tmp_path_factory):
    """A concat-mode decomposer whose state carries decayed profiles beside (h, c)."""
    torch.manual_seed(0)
    m = new_model(
        "decomposer",
        tiny_data,
        make_split(tiny_data.user_offsets, 1),
        lstm_units=24,
        item_dim=16,
        dim_size=8,
        residual=True,
        profile_decays=(1.0, 0.9),
    ).eval()
    return checkpoint.save(
        tmp_path_factory.mktemp("ckpt") / "profile.pt", m, {"item_source_ids": tiny_data.item_source_ids.tolist()}
    )


def test_resolve_checkpoint_accepts_file_folder_and_run(ckpt, tmp_path):
    assert resolve_checkpoint(ckpt) == ckpt
    assert resolve_checkpoint(ckpt.parent) == ckpt
    run = tmp_path / "run"
    run.mkdir()
    record = BestCheckpoint(
        run="run",
        path=str(ckpt.parent),
        model=str(ckpt),
        epoch=3,
        valid_ndcg10=0.1,
        metrics={"epoch": 3},
        model_type="decomposer",
        dataset="d",
        protocol="loo",
    )
    (run / "best_checkpoint.json").write_text(record.to_json())
    assert resolve_checkpoint(run) == ckpt
    assert json.loads(record.to_json())["valid_ndcg@10"] == 0.1  # the key train, tune and serve read
    (run / "best_checkpoint.json").write_text(json.dumps({**json.loads(record.to_json()), "model": None}))
    with pytest.raises(ServingSetupError, match="best_checkpoint.json: not a best-checkpoint record .'model'"):
        resolve_checkpoint(run)
    (run / "best_checkpoint.json").write_text(json.dumps({"path": "x"}))
    with pytest.raises(ServingSetupError, match="best_checkpoint.json: not a best-checkpoint record .'run'"):
        resolve_checkpoint(run)
    with pytest.raises(ServingSetupError, match="nowhere"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ServingSetupError, match="without"):
        resolve_checkpoint(tmp_path)


def test_served_model_checks_type_and_vocabulary(tiny_data, ckpt, tmp_path):
    served = ServedModel.load(ckpt, tiny_data.item_source_ids)
    assert served.version == file_version(ckpt) and len(served.version) == 12
    assert served.index_of[tiny_data.item_source_ids[5]] == 5
    other = tiny_data.item_source_ids.copy()
    other[1] = "not-an-item"
    with pytest.raises(ServingSetupError, match="differs"):
        ServedModel.load(ckpt, other)
    lstm = new_model("lstm", tiny_data, make_split(tiny_data.user_offsets, 1))
    with pytest.raises(ServingSetupError, match="'lstm'.*decomposer"):
        ServedModel.load(checkpoint.save(tmp_path / "lstm.pt", lstm), tiny_data.item_source_ids)


def test_a_checkpoint_is_served_only_with_the_digest_its_configuration_names(tiny_data, ckpt, tmp_path):
    import shutil

    from ray_app.serve.deployments import _checkpoint_of
    from ray_app.serve.app import AppArgs, build_app
    from ray_app.serve.served_model import file_sha256

    digest = file_sha256(ckpt)
    assert ServedModel.load(ckpt, tiny_data.item_source_ids, digest.upper()).version == digest[:12]
    moved = tmp_path / "swapped.pt"
    shutil.copy(ckpt, moved)
    with open(moved, "ab") as f:
        f.write(b"\0")  # the file changed after the swap named it
    with pytest.raises(ServingSetupError, match=f"swapped.pt: sha256 .* is not the {digest}"):
        ServedModel.load(moved, tiny_data.item_source_ids, digest)
    assert _checkpoint_of({"checkpoint": "a.pt", "sha256": digest}) == ("a.pt", digest)
    # A replica never resolves a run folder (build_app always gives the file and its digest).
    for bad in (
        {"checkpoint": "a.pt", "sha": digest},
        {"checkpoint": str(tmp_path), "sha256": digest},
        {"checkpoint": "a.pt", "sha256": "not-a-digest"},
    ):
        with pytest.raises(ValueError, match="user_config must"):
            _checkpoint_of(bad)
    # The app names the resolved file and its digest in every model stage's user_config.
    app = build_app(AppArgs(checkpoint=str(ckpt), data_dir=str(tiny_data.path), load_users=False))
    configs = [d.user_config for d in _deployments(app) if d.user_config]
    assert len(configs) == 2 and all(c == {"checkpoint": str(ckpt.resolve()), "sha256": digest} for c in configs)
    # A config that pins a digest serves that file or none: not another file, not a folder.
    pinned = build_app(
        AppArgs(checkpoint=str(ckpt), checkpoint_sha256=digest, data_dir=str(tiny_data.path), load_users=False)
    )
    assert [d.user_config for d in _deployments(pinned) if d.user_config] == configs
    with pytest.raises(ServingSetupError, match=f"its sha256 is .* the serve config pins {digest}"):
        build_app(
            AppArgs(checkpoint=str(moved), checkpoint_sha256=digest, data_dir=str(tiny_data.path), load_users=False)
        )
    with pytest.raises(ServingSetupError, match="must name the model file"):
        build_app(
            AppArgs(
                checkpoint=str(ckpt.parent), checkpoint_sha256=digest, data_dir=str(tiny_data.path), load_users=False
            )
        )


def test_pinning_rewrites_the_two_lines_of_a_serve_config(tiny_data, ckpt, tmp_path):
    from ray_app.serve.pin import main as pin_main
    from ray_app.serve.served_model import file_sha256
    from serve_helpers import CONFIG

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.read_text())
    assert pin_main([str(ckpt), "--config", str(config)]) == 0
    deployments = yaml.safe_load(config.read_text())["applications"][0]["deployments"]
    pins = [d["user_config"] for d in deployments if "user_config" in d]
    assert pins == [{"checkpoint": str(ckpt), "sha256": file_sha256(ckpt)}] * 2
    before, after = CONFIG.read_text().splitlines(), config.read_text().splitlines()
    assert len(before) == len(after) and sum(a != b for a, b in zip(before, after)) == 4  # comments kept


def _deployments(app):
    """The deployments of a bound app, depth first."""
    seen, todo = [], [app]
    while todo:
        d = todo.pop()._bound_deployment
        seen.append(d)
        todo += [a for a in (*d.init_args, *d.init_kwargs.values()) if hasattr(a, "_bound_deployment")]
    return seen


def test_event_tensors_are_the_training_features(tiny_data):
    sl = tiny_data.user_events(3)
    items, ratings, ts = tiny_data.items[sl], tiny_data.ratings[sl], tiny_data.timestamps[sl]
    n = len(items) - 1  # inputs: all but the last event, whose moment is the context of the last state
    train = BatchBuilder(items, ratings, ts)(np.array([0]), np.array([n]), np.array([0]))
    serve = event_tensors(items[:n], ratings[:n], ts[:n], 0, ts[n])
    for key in ("items", "ratings", "event_feats", "ctx_feats"):
        torch.testing.assert_close(serve[key], train[key])
    tail = event_tensors(items[:n], ratings[:n], ts[:n], 4, ts[n])  # events 4.. with event 3's gap
    torch.testing.assert_close(tail["event_feats"], train["event_feats"][:, 4:])


def test_state_blob_round_trip():
    h, c = torch.randn(7), torch.randn(7)
    back = unpack_state(pack_state(h, c), (7, 7))
    torch.testing.assert_close(back[0], h)
    torch.testing.assert_close(back[1], c)
    assert unpack_state(pack_state(h, c), (8, 8)) is None  # a state of another shape is rebuilt
    s, w = torch.randn(6), torch.rand(2)
    back = unpack_state(pack_state(h, c, s, w), (7, 7, 6, 2))
    torch.testing.assert_close(back[2], s)
    torch.testing.assert_close(back[3], w)
    assert unpack_state(pack_state(h, c), (7, 7, 6, 2)) is None  # a state saved without the profile


@pytest.mark.parametrize("which", ["ckpt", "profile_ckpt"])
def test_incremental_update_equals_rebuild(tiny_data, which, request, tmp_path):
    """The decomposer's stored state, advanced event by event, equals a recomputation."""
    ckpt = request.getfixturevalue(which)
    dec = Decomposer.func_or_class(f"sqlite:///{tmp_path / 's.db'}", str(tiny_data.path))
    dec.reconfigure({"checkpoint": str(ckpt)})
    src = tiny_data.item_source_ids
    events = [Event(src[i], 3.5 + (i % 3) / 2, 1.6e9 + 3600 * i * i) for i in range(1, 9)]
    dec.store.append_events("u", events[:5])
    first = dec._advance_users([("u", True)])[0]
    assert first.n_events == 5 and dec.store.get_state("u").n_events == 5
    for e in events[5:]:  # one event at a time, as POST /events does
        dec.store.append_events("u", [e])
        step = dec._advance_users([("u", False), ("u", True)])
    full = dec.history_state([(e.item_id, e.rating, e.timestamp) for e in events])
    assert step[1].n_events == full.n_events == 8 and step[1].last_ts == events[-1].timestamp
    np.testing.assert_allclose(step[1].h, full.h, atol=1e-5)
    np.testing.assert_array_equal(np.sort(step[1].seen), full.seen)
    # A state written by another model version is ignored and rebuilt from the events.
    dec.store.put_state("u", StoredState("old", 8, b"\0" * 8))
    np.testing.assert_allclose(dec._advance_users([("u", False)])[0].h, full.h, atol=1e-5)

    comb = Combiner.func_or_class()
    comb.reconfigure({"checkpoint": str(ckpt)})
    now = events[-1].timestamp + 60
    jobs = [RankJob(step[1], None, 5, True, True, now), RankJob(full, None, 3, False, False, now)]
    ranked = comb._rank(comb.current, jobs)
    seen = set(full.seen.tolist())
    assert len(ranked[0].items) == 5 and not seen & {i for i, _ in ranked[0].items}
    assert len(ranked[1].items) == 3 and ranked[1].explanation is None
    assert set(ranked[0].explanation) == set(ranked[0].gates) and abs(sum(ranked[0].gates.values()) - 1) < 1e-5
    # The scores are the model's own: score_state over the same state and context.
    m = comb.current.model
    ctx = torch.from_numpy(moment_features(np.array([now]), np.array([60.0])))
    expected = m.score_state(torch.from_numpy(full.h)[None], ctx)[0]
    top = [i for i, _ in ranked[1].items]
    np.testing.assert_allclose([s for _, s in ranked[1].items], expected[top].numpy(), rtol=1e-5)
    assert top == expected[1:].topk(3).indices.add(1).tolist()


def test_events_that_land_between_the_snapshot_and_the_tail_read_are_consumed(tiny_data, ckpt, tmp_path):
    """A POST /events that commits after the Decomposer's snapshot of a user and before its read of
    the new events: the state, the count, the gap and the seen set all include those events."""
    dec = Decomposer.func_or_class(f"sqlite:///{tmp_path / 's.db'}", str(tiny_data.path))
    dec.reconfigure({"checkpoint": str(ckpt)})
    src = tiny_data.item_source_ids
    events = [Event(src[i], 4.0, 1.6e9 + 3600 * i) for i in range(1, 8)]
    dec.store.append_events("u", events[:3])
    dec._advance_users([("u", False)])
    dec.store.append_events("u", events[3:4])  # a new event: the tail is read after the snapshot
    real = dec.store.snapshot

    def snapshot_then_append(user_id, with_seen=False):
        snap = real(user_id, with_seen)
        dec.store.append_events(user_id, events[4:])  # the concurrent commit
        return snap

    dec.store.snapshot = snapshot_then_append
    got = dec._advance_users([("u", True)])[0]
    full = dec.history_state([(e.item_id, e.rating, e.timestamp) for e in events])
    assert got.n_events == 7 and got.last_ts == events[-1].timestamp
    np.testing.assert_allclose(got.h, full.h, atol=1e-5)
    np.testing.assert_array_equal(np.sort(got.seen), full.seen)
    assert dec.store.get_state("u").n_events == 7


@pytest.mark.parametrize(
    "loc,field",
    [
        (("body", "history", 3, "item_id"), "history.3.item_id"),
        (("query", "k"), "k"),
        (("path", "user_id"), "user_id"),
        (("body",), "body"),
        (("body", 17), "body"),
    ],
)
def test_error_field_paths(loc, field):
    assert _field_path(loc) == field


def test_app_args(tmp_path, ckpt, tiny_data):
    args = AppArgs(checkpoint=str(ckpt), data_dir=str(tiny_data.path), load_users=False)
    parts = [args.encoder, args.decomposer, args.combiner, args.ingress]
    assert sum(p.num_cpus * p.max_replicas for p in parts) <= 2
    assert DeploymentSettings(min_replicas=2, max_replicas=2).options()["num_replicas"] == 2
    auto = DeploymentSettings(min_replicas=1, max_replicas=3).options()["autoscaling_config"]
    assert auto["min_replicas"] == 1 and auto["max_replicas"] == 3
    assert args.resolved().store_url.startswith("sqlite:////")
    with pytest.raises(ValidationError, match="replica"):
        AppArgs(checkpoint="x", data_dir="y", decomposer={"replica": 2})
    with pytest.raises(ServingSetupError, match="missing.pt"):
        build_app({"checkpoint": str(tmp_path / "missing.pt"), "data_dir": str(tiny_data.path)})
    unbatched = build_app(args.model_copy(update={"batching": False}))
    assert unbatched is not None
    # Where the app is built, the training users are loaded into its store once (never in a replica).
    store = f"sqlite:///{tmp_path / 'built.db'}"
    build_app(args.model_copy(update={"store_url": store, "load_users": True}))
    assert open_store(store).count_events(str(int(tiny_data.user_source_ids[1]))) > 0


def test_open_store_rejects_unknown_urls(tmp_path):
    with pytest.raises(ValueError, match="ftp://x.*sqlite:///"):
        open_store("ftp://x")
    store = open_store(f"sqlite:///{tmp_path / 'a' / 'b.db'}")
    assert store.append_events("u", [Event("1", 4.0, 1.0)]) == 1
    store.close()


def test_training_users_in_chunks(tiny_data):
    chunks = list(training_user_events(tiny_data, chunk=15))
    assert [len(c) for c in chunks] == [15, 15, 10]
    users = {k: v for c in chunks for k, v in c.items()}
    first = users[str(int(tiny_data.user_source_ids[1]))]
    sl = tiny_data.user_events(1)
    assert [str(e.item_id) for e in first] == tiny_data.item_source_ids[tiny_data.items[sl]].tolist()
    assert sum(map(len, users.values())) == tiny_data.n_events


def test_catalogue_describes_items(tiny_data):
    cat = Catalogue.from_data(tiny_data)
    d = cat.describe(1, 0.5)
    assert d["item_id"] == tiny_data.item_source_ids[1] and d["title"] == tiny_data.titles[1]
    assert d["score"] == 0.5 and set(d["genres"]) <= set(tiny_data.genre_names)
    assert cat.unknown([tiny_data.item_source_ids[2], "-99", "0" + tiny_data.item_source_ids[2]]) == [1, 2]


def test_a_model_stage_past_its_timeout_is_a_504_and_is_cancelled():
    """The Ingress awaits each call down the graph for at most call_timeout_s."""
    import asyncio

    from ray_app.serve.ingress import ApiError, Ingress
    from ray_app.store.base import StoreUnavailable

    class Slow:
        cancelled = False

        def __await__(self):
            return asyncio.sleep(60).__await__()

        def cancel(self):
            Slow.cancelled = True

    class Fails:
        def __init__(self, exc):
            self.exc = exc

        def __await__(self):
            async def go():
                raise self.exc

            return go().__await__()

    ingress = object.__new__(Ingress.func_or_class)
    ingress.call_timeout_s = 0.05
    with pytest.raises(ApiError) as e:
        asyncio.run(ingress._call(Slow(), "ranking"))
    assert e.value.status == 504 and "ranking did not answer within 0.05 s" in e.value.detail and Slow.cancelled

    class Wrapped(Exception):  # how a failure down the graph arrives: the cause inside
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    with pytest.raises(StoreUnavailable, match="redis://h:6379"):
        asyncio.run(ingress._call(Fails(Wrapped(StoreUnavailable("Redis store redis://h:6379: down"))), "decomposer"))
    with pytest.raises(KeyError):  # anything else is not dressed up as a store fault
        asyncio.run(ingress._call(Fails(KeyError("x")), "decomposer"))


def test_a_state_rebuild_reads_the_models_window_not_the_whole_log(tiny_data, tmp_path):
    """A user with a long log and no usable state: the rebuild reads the last max_len events (and
    the one before, for its gap), then advances one event at a time as usual."""
    torch.manual_seed(0)
    model = new_model(
        "decomposer", tiny_data, make_split(tiny_data.user_offsets, 1), lstm_units=16, dim_size=8, max_len=6
    )
    ckpt = checkpoint.save(tmp_path / "short.pt", model, {"item_source_ids": tiny_data.item_source_ids.tolist()})
    dec = Decomposer.func_or_class(f"sqlite:///{tmp_path / 's.db'}", str(tiny_data.path))
    dec.reconfigure({"checkpoint": str(ckpt)})
    src = tiny_data.item_source_ids
    events = [Event(src[1 + i % 20], 4.0, 1.6e9 + 3600 * i) for i in range(40)]
    dec.store.append_events("long", events)
    reads = []
    real = dec.store.events
    dec.store.events = lambda user, start=0, limit=None: reads.append(start) or real(user, start, limit)
    out = dec._advance_users([("long", False)])[0]
    assert out.n_events == 40 and reads == [40 - 6 - 1]  # the window and the event before it
    # The same state as the last six events ranked in training, their first gap included.
    from ray_app.serve.served_model import event_tensors

    served = dec.served
    items = np.array([served.index_of[e.item_id] for e in events[33:]], np.int64)
    t = event_tensors(
        items, np.full(7, 4.0, np.float32), np.array([e.timestamp for e in events[33:]]), 1, events[-1].timestamp
    )
    parts = served.model.advance(None, t["items"], t["ratings"], t["event_feats"])
    np.testing.assert_allclose(out.h, served.model.interest_state(parts)[0].numpy(), atol=1e-5)
    reads.clear()
    dec.store.append_events("long", [Event(src[3], 5.0, 1.6e9 + 3600 * 41)])
    assert dec._advance_users([("long", False)])[0].n_events == 41 and reads == [39]  # one step, as usual


def test_item_ids_are_strings_and_a_whole_number_is_read_as_its_decimal_string():
    """IMDb's "0133093" keeps its zero; 7 is "7"; an empty, overlong, fractional or boolean id is a
    validation error naming the field. Answers carry the string."""
    from ray_app.serve.schemas import MAX_ITEM_ID_CHARS, EventIn, Item, RecommendRequest

    assert EventIn(item_id="0133093", timestamp=1.0).item_id == "0133093"
    assert EventIn(item_id=7, timestamp=1.0).item_id == "7"
    req = RecommendRequest.model_validate({"history": [{"item_id": 133093, "timestamp": 1.0}]})
    assert req.history[0].item_id == "133093"
    for bad, message in [
        ("", "at least 1 character"),
        ("x" * (MAX_ITEM_ID_CHARS + 1), f"at most {MAX_ITEM_ID_CHARS} characters"),
        (1.5, "a string or a whole number"),
        (True, "a string or a whole number"),
        (None, "a string or a whole number"),
        ("a\x00b", "control characters"),
    ]:
        with pytest.raises(ValidationError, match=message) as e:
            EventIn(item_id=bad, timestamp=1.0)
        assert e.value.errors()[0]["loc"] == ("item_id",)
    assert Item(item_id="0133093", title="The Matrix", genres=[], score=1.0).model_dump()["item_id"] == "0133093"


def test_a_catalogue_of_text_ids_is_served_by_its_ids(imdb_data, tmp_path):
    """Ids with leading zeros name their items, in the Catalogue and the served model alike; the
    same digits without the zeros name nothing; ids longer than a request may send are refused."""
    import dataclasses

    from ray_app.serve.schemas import MAX_ITEM_ID_CHARS

    cat = Catalogue.from_data(imdb_data)
    first = imdb_data.item_source_ids[1]
    assert first.startswith("0") and cat.describe(1)["item_id"] == first and cat.index_of[first] == 1
    assert cat.unknown([first, first.lstrip("0"), str(int(first))]) == [1, 2]
    torch.manual_seed(0)
    model = new_model("decomposer", imdb_data, make_split(imdb_data.user_offsets, 1), lstm_units=16, dim_size=8)
    saved = checkpoint.save(tmp_path / "m.pt", model, {"item_source_ids": imdb_data.item_source_ids.tolist()})
    served = ServedModel.load(saved, imdb_data.item_source_ids)
    assert served.index_of == cat.index_of
    ids = imdb_data.item_source_ids.copy()
    ids[2] = "x" * (MAX_ITEM_ID_CHARS + 1)
    with pytest.raises(ServingSetupError, match=f"longer than the {MAX_ITEM_ID_CHARS} characters"):
        Catalogue.from_data(dataclasses.replace(imdb_data, item_source_ids=ids))


def test_a_dataset_record_names_the_dataset_by_its_content(tiny_data, imdb_data):
    """The same data gives the same record; another catalogue, or one changed event, another."""
    import dataclasses

    from ray_app.serve.item_catalogue import catalogue_digest, dataset_record

    record = dataset_record(tiny_data)
    assert record.catalogue == catalogue_digest(tiny_data.item_source_ids[1:])  # what a batch run checks a store by
    assert record == dataset_record(dataclasses.replace(tiny_data, manifest=dict(tiny_data.manifest)))
    assert record.name == "synthetic" and len(record.events) == len(record.catalogue) == 64
    other = dataset_record(imdb_data)  # the same events, the items named otherwise
    assert other.catalogue != record.catalogue and other.events != record.events and other.key != record.key
    ratings = tiny_data.ratings.copy()
    ratings[0] += 0.5
    changed = dataset_record(dataclasses.replace(tiny_data, ratings=ratings))
    assert changed.catalogue == record.catalogue and changed.events != record.events


def test_loading_users_refuses_a_store_of_another_dataset(tiny_data, imdb_data, tmp_path):
    """The load step records the dataset; loading another into the same store writes nothing."""
    from ray_app.serve.load_users import load_users, main as load_main
    from ray_app.serve.item_catalogue import dataset_record
    from ray_app.store.base import StoreMismatch

    url = f"sqlite:///{tmp_path / 'state.db'}"
    assert load_users(tiny_data, url) == tiny_data.n_users
    assert load_users(tiny_data, url) == tiny_data.n_users  # again: nothing changes
    store = open_store(url)
    before = {u: store.events(u) for u, _ in store.users(limit=1000)}
    with pytest.raises(StoreMismatch, match="loaded for dataset 'synthetic'.*not 'synthetic-imdb'"):
        load_users(imdb_data, url)
    assert {u: store.events(u) for u, _ in store.users(limit=1000)} == before
    assert store.dataset() == dataset_record(tiny_data)
    store.close()
    assert load_main(["--data", str(imdb_data.path), "--store-url", url]) == 2  # one line, no traceback


def test_a_transformer_decomposer_reads_gates_over_its_window(tiny_data, tmp_path):
    """Gates step by step on a transformer backbone: a log longer than its max_len is read as its last
    max_len events (what its state holds), the steps keep their place in the whole log."""
    torch.manual_seed(0)
    model = new_model(
        "decomposer", tiny_data, make_split(tiny_data.user_offsets, 1), backbone="transformer", dim_size=8, max_len=6
    )
    ckpt = checkpoint.save(tmp_path / "tf.pt", model, {"item_source_ids": tiny_data.item_source_ids.tolist()})
    dec = Decomposer.func_or_class(f"sqlite:///{tmp_path / 's.db'}", str(tiny_data.path))
    dec.reconfigure({"checkpoint": str(ckpt)})
    src = tiny_data.item_source_ids
    events = [Event(src[1 + i % 20], 4.0, 1.6e9 + 3600 * i) for i in range(15)]
    dec.store.append_events("long", events)
    out = dec._interests("long", last=3, now=events[-1].timestamp + 60)
    assert [s["index"] for s in out["steps"]] == [12, 13, 14]
    assert [s["item_id"] for s in out["steps"]] == [e.item_id for e in events[-3:]]
    for step in out["steps"]:
        assert abs(sum(step["gates"].values()) - 1) < 1e-5
    assert dec._advance_users([("long", False)])[0].n_events == 15  # its state over the same window


def test_items_added_to_the_store_are_followed_by_every_stage_and_placed_again_by_a_new_model(
    tiny_data, ckpt, profile_ckpt, tmp_path
):
    """An item added to the store: the Decomposer's next batch holds it (an event on it advances the
    state through its text vector), a Combiner catches up to the catalogue the state was read with
    and ranks it, exactly and through an HNSW graph built before the add; a swap to another
    checkpoint places it again with that model, from its stored text embedding."""
    import time

    from ray_app.serve.catalogue import n_added
    from ray_app.store.base import AddedItem

    url = f"sqlite:///{tmp_path / 's.db'}"
    dec = Decomposer.func_or_class(url, str(tiny_data.path))
    dec.reconfigure({"checkpoint": str(profile_ckpt)})
    exact = Combiner.func_or_class(str(tiny_data.path), store_url=url)
    hnsw = Combiner.func_or_class(str(tiny_data.path), store_url=url, index={"kind": "hnsw", "ef_search": 256})
    for comb in (exact, hnsw):
        comb.reconfigure({"checkpoint": str(profile_ckpt)})
    src, N = tiny_data.item_source_ids, tiny_data.n_items
    events = [Event(src[i], 4.0, 1.6e9 + 3600 * i) for i in range(1, 6)]
    dec.store.append_events("u", events)
    before = dec._advance_users([("u", True)])[0]
    assert before.n_items == N
    text = tiny_data.item_emb[3]  # the text of item 3, under a new id
    item = AddedItem("new-1", "A new film", ("Comedy",), (), "", text.astype(np.float32).tobytes(), time.time())
    assert dec.store.add_item(item) == 1
    new_event = Event("new-1", 5.0, 1.6e9 + 3600 * 7)
    dec.store.append_events("u", [new_event])
    after = dec._advance_users([("u", True)])[0]
    assert after.n_items == N + 1 and dec.served.index_of["new-1"] == N + 1 and after.n_events == 6
    assert N + 1 in after.seen.tolist()
    full = dec.history_state([(e.item_id, e.rating, e.timestamp) for e in [*events, new_event]])
    np.testing.assert_allclose(after.h, full.h, atol=1e-5)  # the stored state advanced through it
    assert not np.allclose(after.h, before.h, atol=1e-4)
    m = dec.served.model
    torch.testing.assert_close(m.items.all()[N + 1], m.items.proj(torch.from_numpy(text)))  # its text's vector
    now = new_event.timestamp + 60
    for comb in (exact, hnsw):
        assert n_added(comb.current) == 0  # nothing read until a request needs it
        job = RankJob(after, None, N + 1, False, False, now)
        comb.added(comb.current, after.n_items)  # what _rank_batch does first
        (res,) = comb._rank(comb.current, [job])
        assert n_added(comb.current) == 1 and comb.current.model.cfg.n_items == N + 1
        assert N + 1 in [i for i, _ in res.items]
    scores = dict(exact._rank(exact.current, [job])[0].items)
    graph = dict(hnsw._rank(hnsw.current, [job])[0].items)
    assert graph[N + 1] == pytest.approx(scores[N + 1], rel=1e-4)
    # A swap: the new model places the added item from its stored text embedding.
    exact.reconfigure({"checkpoint": str(ckpt)})
    placed = exact.current.model
    assert exact.current.version == file_version(ckpt) and placed.cfg.n_items == N + 1
    torch.testing.assert_close(placed.items.all()[N + 1], placed.items.proj(torch.from_numpy(text)))


def test_adding_an_item_to_a_model_trained_without_text_is_a_409(tiny_data, tmp_path):
    """Such a model has no vector for an item no training event holds: the add is refused, not
    stored (an item ranked from the origin would be an item ranked by nothing)."""
    import asyncio
    from types import SimpleNamespace

    from ray_app.serve.ingress import ApiError, Ingress
    from ray_app.serve.schemas import ItemIn

    torch.manual_seed(0)
    m = new_model(
        "decomposer", tiny_data, make_split(tiny_data.user_offsets, 1), lstm_units=8, item_dim=8, use_text=False
    ).eval()
    path = checkpoint.save(tmp_path / "ids.pt", m, {"item_source_ids": tiny_data.item_source_ids.tolist()})
    url = f"sqlite:///{tmp_path / 's.db'}"
    dec = Decomposer.func_or_class(url, str(tiny_data.path))
    dec.reconfigure({"checkpoint": str(path)})
    assert dec.info()["places_by_text"] is False

    async def answer(value):
        return value

    ingress = object.__new__(Ingress.func_or_class)
    ingress.call_timeout_s = 5.0
    ingress.catalogue = Catalogue.load(tiny_data.path)[0]
    ingress.decomposer = SimpleNamespace(info=SimpleNamespace(remote=lambda: answer(dec.info())))
    ingress._allow = lambda who, **kw: answer(SimpleNamespace(jti="j"))
    ingress._knows = lambda **kw: answer(None)
    ingress.store = dec.store
    with pytest.raises(ApiError) as e:
        asyncio.run(Ingress.func_or_class.add_item(ingress, ItemIn(item_id="new-1", title="A new film"), None))
    assert e.value.status == 409 and "trained without item text" in e.value.detail
    assert dec.store.count_items() == 0


def test_the_ingress_and_the_records_it_unpickles_need_no_torch():
    """An Ingress replica starts (and reads the Combiner's answers) without importing torch."""
    code = "import sys, ray_app.serve.ingress, ray_app.serve.records; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
