"""The Combiner's HNSW option without Ray: its top-10 against the exact one on a catalogue of a few
thousand items from a model, exclude_seen with it, a mixture checkpoint refused, the option's schema."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.nn import checkpoint
from ray_app.serve.ann import IndexSettings, item_index
from ray_app.serve.app import AppArgs
from ray_app.serve.deployments import Combiner
from ray_app.serve.records import RankJob, UserState
from ray_app.serve.served_model import ServedModel, ServingSetupError

N_ITEMS = 3000
HNSW = IndexSettings(kind="hnsw", ef_search=64)


def _checkpoint(tmp_path_factory, name: str, **overrides):
    """A randomly initialised decomposer over N_ITEMS items with random text vectors, saved."""
    torch.manual_seed(0)
    args = {"n_items": N_ITEMS, "lstm_units": 24, "item_dim": 16, "dim_size": 8, "profile_decays": (), **overrides}
    model = checkpoint.build("decomposer", args)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((N_ITEMS + 1, model.cfg.text_dim)).astype(np.float32)
    model.set_item_data(text / np.linalg.norm(text, axis=1, keepdims=True), np.zeros((N_ITEMS + 1, 1), np.float32))
    ids = torch.arange(-1, N_ITEMS)  # source id i - 1 for index i; [0] = -1, the padding
    return checkpoint.save(tmp_path_factory.mktemp(name) / "model.pt", model.eval(), {"item_source_ids": ids})


@pytest.fixture(scope="module")
def concat_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "concat")


@pytest.fixture(scope="module")
def max_ckpt(tmp_path_factory):
    """Per-dimension scoring: four members (three dimensions and the base), a soft maximum."""
    return _checkpoint(tmp_path_factory, "max", combine="max", n_latent=0)


def _states(served: ServedModel, n: int, seen: np.ndarray | None = None) -> list[UserState]:
    rng = np.random.default_rng(1)
    H = rng.standard_normal((n, served.model.state_dim)).astype(np.float32)
    return [UserState(served.version, str(served.path), h, 5, 1.6e9, seen) for h in H]


@pytest.mark.parametrize("mode", ["concat", "max"])
def test_hnsw_top10_matches_exact(concat_ckpt, max_ckpt, mode):
    """One vector searched (concat), or each member's searched and their candidates scored exactly (max)."""
    ckpt = concat_ckpt if mode == "concat" else max_ckpt
    exact, ann = Combiner.func_or_class(), Combiner.func_or_class(index=HNSW)
    for comb in (exact, ann):
        comb.reconfigure({"checkpoint": str(ckpt)})
    jobs = [RankJob(s, None, 10, False, False, 1.6e9 + 60) for s in _states(exact.current, 200)]
    want, got = exact._rank(exact.current, jobs), ann._rank(ann.current, jobs)
    recall = np.mean([len({i for i, _ in w.items} & {i for i, _ in g.items}) / 10 for w, g in zip(want, got)])
    assert recall >= 0.95
    assert all(len(g.items) == 10 and 0 not in {i for i, _ in g.items} for g in got)
    for g, w in zip(got, want):
        assert g.gates.keys() == w.gates.keys()
        np.testing.assert_allclose(list(g.gates.values()), list(w.gates.values()), rtol=1e-5)
    # The scores are the ones the exact path computes, for the items the graph found.
    exact_scores = {i: s for i, s in want[0].items}
    shared = [(s, exact_scores[i]) for i, s in got[0].items if i in exact_scores]
    np.testing.assert_allclose(*zip(*shared), rtol=1e-4)
    assert ann.current.indexes[HNSW] is item_index(ann.current, HNSW)  # built once per version


def test_hnsw_excludes_seen_items(concat_ckpt, monkeypatch):
    ann = Combiner.func_or_class(index=HNSW)
    ann.reconfigure({"checkpoint": str(concat_ckpt)})
    (plain,) = _states(ann.current, 1)
    first = [i for i, _ in ann._rank(ann.current, [RankJob(plain, None, 10, False, False, 1.6e9)])[0].items]
    seen = np.array(sorted(first[:6] + list(range(1, 300))), np.int64)  # its own top items among 300 seen
    state = UserState(plain.model_version, plain.checkpoint, plain.h, 5, 1.6e9, seen)
    jobs = [RankJob(state, None, 10, True, True, 1.6e9), RankJob(state, None, 10, False, False, 1.6e9)]
    excluding, keeping = ann._rank(ann.current, jobs)
    got = [i for i, _ in excluding.items]
    assert len(got) == 10 and not set(got) & set(seen.tolist())
    assert set(first[:6]) <= {i for i, _ in keeping.items}
    for items in excluding.explanation.values():  # explanations are exact, with the same exclusion
        assert not {i for i, _ in items} & set(seen.tolist())
    # A user whose seen set is over the graph's candidate limit is ranked by a matmul, still excluding.
    small = Combiner.func_or_class(index=HNSW.model_copy(update={"max_candidates": 100}))
    small.reconfigure({"checkpoint": str(concat_ckpt)})
    exact = Combiner.func_or_class()
    exact.reconfigure({"checkpoint": str(concat_ckpt)})
    from ray_app.serve.ann import HNSWIndex

    calls = []
    matmul = HNSWIndex.exact
    monkeypatch.setattr(HNSWIndex, "exact", lambda self, u, k: calls.append(len(u)) or matmul(self, u, k))
    fallback, want = small._rank(small.current, jobs[:1])[0], exact._rank(exact.current, jobs[:1])[0]
    assert [i for i, _ in fallback.items] == [i for i, _ in want.items]
    assert calls == [1]  # the row went to the matmul, not to the graph


def test_a_version_a_request_brings_is_ranked_exactly_while_its_graph_builds(concat_ckpt, monkeypatch):
    """A request from a Decomposer already on a version this Combiner replica has not swapped to:
    the version is loaded, its HNSW graph is built in a thread, and meanwhile the request is ranked
    by the exact matmul instead of waiting for the graph; once built, the graph ranks, and the
    replica's own swap to that version adopts it instead of building a second one."""
    from ray_app.serve.ann import HNSWIndex

    exact = Combiner.func_or_class()
    exact.reconfigure({"checkpoint": str(concat_ckpt)})
    ann = Combiner.func_or_class(index=HNSW)  # holds no version yet
    release, builds, build = threading.Event(), [], HNSWIndex.__init__

    def held_build(self, *args, **kwargs):
        builds.append(threading.current_thread().name)
        assert release.wait(60), "the test never released the build"
        build(self, *args, **kwargs)

    monkeypatch.setattr(HNSWIndex, "__init__", held_build)
    states = _states(exact.current, 3)
    jobs = [RankJob(s, None, 10, False, False, 1.6e9) for s in states]
    served = ann._model_for(states[0].model_version, states[0].checkpoint)
    assert ann._index_for(served) is None and HNSW not in served.indexes  # building
    assert [r.items for r in ann._rank(served, jobs)] == [r.items for r in exact._rank(exact.current, jobs)]
    release.set()
    ann._building[served.version].result(timeout=60)
    assert isinstance(ann._index_for(served), HNSWIndex) and ann._index_for(served) is served.indexes[HNSW]
    ann.reconfigure({"checkpoint": str(concat_ckpt)})
    assert ann.current.indexes[HNSW] is served.indexes[HNSW]
    assert len(builds) == 1 and builds[0].startswith("item-index")  # one build, off the event loop


def test_a_failed_graph_build_leaves_the_version_on_the_exact_matmul(concat_ckpt, monkeypatch, caplog):
    from ray_app.serve.ann import HNSWIndex

    def no_memory(self, *args, **kwargs):
        raise MemoryError("no room for the graph")

    monkeypatch.setattr(HNSWIndex, "__init__", no_memory)
    ann, exact = Combiner.func_or_class(index=HNSW), Combiner.func_or_class()
    exact.reconfigure({"checkpoint": str(concat_ckpt)})
    (state,) = _states(exact.current, 1)
    served = ann._model_for(state.model_version, state.checkpoint)
    jobs = [RankJob(state, None, 10, False, False, 1.6e9)]
    with caplog.at_level("ERROR", logger="ray.serve"):
        ann._rank(served, jobs)
        ann._building[served.version].result(timeout=60)
    assert "building the item graph" in caplog.text and "no room for the graph" in caplog.text
    for _ in range(2):  # answered, exactly, and the build is not tried again on every request
        assert [r.items for r in ann._rank(served, jobs)] == [r.items for r in exact._rank(exact.current, jobs)]
    assert ann._index_for(served) is None and len(ann._building) == 1


def test_a_row_the_graph_answers_short_is_ranked_exactly():
    from ray_app.serve.ann import HNSWIndex, IndexSettings

    rng = np.random.default_rng(0)
    vecs = np.vstack([np.zeros((1, 16)), rng.normal(size=(1500, 16))]).astype(np.float32)  # row 0: padding
    index = HNSWIndex(vecs, IndexSettings(kind="hnsw", ef_search=16))
    u = rng.normal(size=(8, 16)).astype(np.float32)
    seen = [np.sort(rng.choice(np.arange(1, 1501), 1480, replace=False)) for _ in range(8)]  # 20 unseen each
    got, _ = index.top(u, seen, 10)
    want, _ = index.exact(u, 1500)
    for row, s, w in zip(got, seen, want):
        assert row == [i for i in w.tolist() if i not in set(s.tolist())][:10]  # ten, the exact ten


def test_mixture_checkpoint_is_refused(tmp_path_factory):
    ckpt = _checkpoint(tmp_path_factory, "mixture", combine="mixture")
    with pytest.raises(ServingSetupError, match="index.kind 'hnsw'.*mixture"):
        Combiner.func_or_class(index=HNSW).reconfigure({"checkpoint": str(ckpt)})
    Combiner.func_or_class().reconfigure({"checkpoint": str(ckpt)})  # exact serves it


def test_index_settings_schema():
    with pytest.raises(ValidationError, match=r"index\.kind") as err:
        AppArgs(checkpoint="x", data_dir="y", index={"kind": "ivf"})
    assert "'exact' or 'hnsw'" in str(err.value)
    with pytest.raises(ValidationError, match=r"index\.efsearch"):
        AppArgs(checkpoint="x", data_dir="y", index={"kind": "hnsw", "efsearch": 64})
    assert AppArgs(checkpoint="x", data_dir="y").index.kind == "exact"


def test_a_user_who_has_seen_almost_everything_gets_only_finite_scores(concat_ckpt):
    """Fewer unseen items than k: the items and each dimension's explanation list only what is left,
    no excluded item with a score of -inf (which JSON would carry as null)."""
    comb = Combiner.func_or_class()
    comb.reconfigure({"checkpoint": str(concat_ckpt)})
    (plain,) = _states(comb.current, 1)
    seen = np.arange(1, N_ITEMS - 2, dtype=np.int64)  # all but the last three items
    state = UserState(plain.model_version, plain.checkpoint, plain.h, 5, 1.6e9, seen)
    (got,) = comb._rank(comb.current, [RankJob(state, None, 10, True, True, 1.6e9)])
    assert sorted(i for i, _ in got.items) == [N_ITEMS - 2, N_ITEMS - 1, N_ITEMS]
    for items in got.explanation.values():
        assert 0 < len(items) <= 3 and all(np.isfinite(s) and i >= N_ITEMS - 2 for i, s in items)
