import numpy as np
import pytest

from models.data.batching import INTENT_REGIMES, BatchBuilder, IntentTable, eval_samples, make_split, training_windows
from models.data.features import moment_features, rating_bucket

# two users: 5 events and 12 events
OFFSETS = np.array([0, 5, 17])


def test_leave_one_out_split():
    s = make_split(OFFSETS, n_test=1)
    assert s.valid_pos.tolist() == [3, 15]
    assert s.test_pos.tolist() == [4, 16]
    assert s.test_user.tolist() == [0, 1]


def test_last_n_split_keeps_two_training_events():
    s = make_split(OFFSETS, n_test=10)
    # user 0 has 5 events: at most 3 test targets, then validation, leaving 1 training event
    assert s.test_pos[s.test_user == 0].tolist() == [2, 3, 4]
    assert s.valid_pos.tolist() == [1, 6]
    assert s.test_pos[s.test_user == 1].tolist() == list(range(7, 17))


def test_a_validation_window_before_the_test_window():
    # two users: 30 and 16 events; 10 test targets each, validation the events before them
    s = make_split(np.array([0, 30, 46]), n_test=10, n_valid=10)
    assert s.test_pos[s.test_user == 0].tolist() == list(range(20, 30))
    assert s.valid_targets[s.valid_user == 0].tolist() == list(range(10, 20))
    # user 1 keeps half of what the test leaves (6 events) to train on: 3 validation targets
    assert s.valid_targets[s.valid_user == 1].tolist() == [33, 34, 35]
    assert s.valid_pos.tolist() == [10, 33]  # training events end at the first validation target
    assert make_split(np.array([0, 3]), n_test=10, n_valid=10).valid_targets.tolist() == [1]


def test_split_rejects_short_users_and_bad_n():
    with pytest.raises(ValueError, match="at least 3"):
        make_split(np.array([0, 2, 9]))
    with pytest.raises(ValueError, match="n_test"):
        make_split(OFFSETS, 0)
    with pytest.raises(ValueError, match="n_valid"):
        make_split(OFFSETS, 1, 0)


def test_training_windows_cover_every_training_target_once():
    s = make_split(OFFSETS, n_test=1)
    starts, ends, rows = training_windows(s, max_len=4)
    targets = sorted(t for a, b in zip(starts, ends) for t in range(a + 1, b + 1))
    # user 0 trains on events 0..2 (targets 1, 2); user 1 on 5..14 (targets 6..14)
    assert targets == [1, 2] + list(range(6, 15))
    assert ((ends - starts) <= 4).all()
    assert (ends < s.valid_pos[rows]).all()


def test_batch_contents():
    items = np.arange(1, 18)
    ratings = np.full(17, 4.5, dtype=np.float32)
    ts = 1_600_000_000 + np.arange(17) * 3600
    table = IntentTable(
        offsets=np.concatenate([np.zeros(11, int), np.ones(9, int)]),
        ids=np.array([0]),
        emb=np.ones((1, 384), np.float32),
    )
    b = BatchBuilder(items, ratings, ts, table)
    batch = b(np.array([5, 0]), np.array([9, 2]), np.array([5, 0]), supervise_all=True)
    assert batch["items"].tolist() == [[6, 7, 8, 9], [1, 2, 0, 0]]
    assert batch["targets"].tolist() == [[7, 8, 9, 10], [2, 3, 0, 0]]
    assert batch["ratings"][0, 0].item() == rating_bucket(np.array([4.5]))[0] == 9
    # first event of a user has gap 0; the others one hour
    np.testing.assert_allclose(
        batch["event_feats"][0, :, 4].numpy(), [0, np.log1p(1), np.log1p(1), np.log1p(1)], rtol=1e-6
    )
    np.testing.assert_allclose(batch["ctx_feats"][0, 3].numpy(), moment_features(ts[9], 3600), rtol=1e-6)
    last = b(np.array([5]), np.array([9]), np.array([5]), supervise_all=False, intent_rate=1.0)
    assert last["targets"].tolist() == [[0, 0, 0, 10]]
    assert last["intent_mask"].tolist() == [[False, False, False, True]]  # item 10 has phrase 0


def test_eval_samples_truncate_to_max_len():
    s = make_split(OFFSETS, n_test=1)
    starts, ends = eval_samples(s, s.test_pos, s.test_user, max_len=3)
    assert starts.tolist() == [1, 13] and ends.tolist() == [4, 16]


def regime_table():
    """Items 1..12 with phrases: odd items carry phrase 0 and 1, even items phrase 2, item 12 phrase 3."""
    phrases = {i: ([0, 1] if i % 2 else [2]) for i in range(1, 12)}
    phrases[12] = [3]
    counts = [0] + [len(phrases[i]) for i in range(1, 13)] + [0]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ids = np.concatenate([phrases[i] for i in range(1, 13)])
    emb = np.eye(4, 384, dtype=np.float32)  # phrase p is the unit vector e_p
    return IntentTable(offsets=offsets, ids=ids, emb=emb), phrases


def test_intent_regimes_relate_the_words_to_the_target_as_named():
    table, phrases = regime_table()
    items = np.array([1, 3, 5, 2, 12, 7, 9, 11, 4, 6, 8, 10, 12, 1])  # one user; the last event is item 1
    b = BatchBuilder(items, np.full(len(items), 4.0, np.float32), 1_600_000_000 + np.arange(len(items)) * 60, table)
    starts, ends, ustart = np.array([0, 2, 6]), np.array([8, 12, 13]), np.zeros(3, int)
    targets = items[ends]  # 4, 12, 1
    for seed in range(5):
        got = {
            r: b(starts, ends, ustart, supervise_all=False, intent_rate=1.0, rng=np.random.default_rng(seed), intent=r)
            for r in INTENT_REGIMES
        }
        last = ends - starts - 1
        rows = np.arange(3)
        vec = {r: got[r]["intent"][rows, last].numpy() for r in got}
        chosen = {r: [{int(p) for p in np.nonzero(row)[0]} for row in v] for r, v in vec.items()}
        for i, t in enumerate(targets):
            assert chosen["oracle"][i] <= set(phrases[t])  # one of the target's own
            assert chosen["wrong"][i] and not chosen["wrong"][i] & set(phrases[t])
            own = chosen["noisy"][i] & set(phrases[t])
            assert len(own) == 1 and len(chosen["noisy"][i]) == 2  # one of its own and one it lacks
            np.testing.assert_allclose(np.linalg.norm(vec["noisy"][i]), 1.0, rtol=1e-6)
    # history: the most frequent phrase of the last five inputs, ties to the newest item's phrase
    hist = {int(p) for p in np.nonzero(vec["history"][0])[0]}  # inputs 3,4,5,6,7 = items 2,12,7,9,11
    assert hist == {0} or hist == {1}  # phrases 0 and 1 three times each
    assert {int(p) for p in np.nonzero(vec["history"][1])[0]} == {2}  # items 11,4,6,8,10: phrase 2 four times
    assert {int(p) for p in np.nonzero(vec["history"][2])[0]} == {2}  # items 4,6,8,10,12: phrase 2 four times


def test_history_words_ignore_the_target():
    """The history regime reads the inputs only: a target that carries other phrases changes nothing."""
    table, _ = regime_table()
    items = np.array([1, 3, 5, 2, 4, 6])
    other = items.copy()
    other[-1] = 12  # the target: phrase 2 -> phrase 3
    out = [
        BatchBuilder(x, np.full(6, 4.0, np.float32), np.arange(6) * 60, table)(
            np.array([0]),
            np.array([5]),
            np.array([0]),
            supervise_all=False,
            intent_rate=1.0,
            rng=np.random.default_rng(0),
            intent="history",
        )["intent"].numpy()
        for x in (items, other)
    ]
    np.testing.assert_array_equal(out[0], out[1])
    assert out[0][0, -1].argmax() in (0, 1)  # items 1, 3, 5 outnumber 2, 4


def test_unknown_intent_regime_is_named():
    table, _ = regime_table()
    b = BatchBuilder(np.arange(1, 7), np.full(6, 4.0, np.float32), np.arange(6) * 60, table)
    with pytest.raises(ValueError, match="intent must be one of"):
        b(np.array([0]), np.array([4]), np.array([0]), supervise_all=False, intent_rate=1.0, intent="psychic")


def test_wrong_rate_gives_that_share_of_training_words_a_phrase_the_target_lacks():
    table, phrases = regime_table()
    items = np.array([1, 3, 5, 2, 12, 7, 9, 11, 4, 6, 8, 10, 12, 1])
    b = BatchBuilder(items, np.full(len(items), 4.0, np.float32), 1_600_000_000 + np.arange(len(items)) * 60, table)
    starts, ends, ustart = np.array([0, 2, 6]), np.array([8, 12, 13]), np.zeros(3, int)
    targets = items[ends]
    last, rows = ends - starts - 1, np.arange(3)
    for rate, own in ((0.0, True), (1.0, False)):
        got = b(
            starts, ends, ustart, supervise_all=False, intent_rate=1.0, rng=np.random.default_rng(0), wrong_rate=rate
        )
        for i, row in enumerate(got["intent"][rows, last].numpy()):
            chosen = {int(p) for p in np.nonzero(row)[0]}
            assert len(chosen) == 1 and bool(chosen & set(phrases[targets[i]])) == own
