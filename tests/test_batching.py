import numpy as np
import pytest

from models.batching import BatchBuilder, IntentTable, eval_samples, make_split, training_windows
from models.features import moment_features, rating_bucket

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


def test_split_rejects_short_users_and_bad_n():
    with pytest.raises(ValueError, match="at least 3"):
        make_split(np.array([0, 2, 9]))
    with pytest.raises(ValueError, match="n_test"):
        make_split(OFFSETS, 0)


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
    table = IntentTable(offsets=np.concatenate([np.zeros(11, int), np.ones(9, int)]), ids=np.array([0]),
                        emb=np.ones((1, 384), np.float32))
    b = BatchBuilder(items, ratings, ts, table)
    batch = b(np.array([5, 0]), np.array([9, 2]), np.array([5, 0]), supervise_all=True)
    assert batch["items"].tolist() == [[6, 7, 8, 9], [1, 2, 0, 0]]
    assert batch["targets"].tolist() == [[7, 8, 9, 10], [2, 3, 0, 0]]
    assert batch["ratings"][0, 0].item() == rating_bucket(np.array([4.5]))[0] == 9
    # first event of a user has gap 0; the others one hour
    np.testing.assert_allclose(batch["event_feats"][0, :, 4].numpy(), [0, np.log1p(1), np.log1p(1), np.log1p(1)], rtol=1e-6)
    np.testing.assert_allclose(batch["ctx_feats"][0, 3].numpy(), moment_features(ts[9], 3600), rtol=1e-6)
    last = b(np.array([5]), np.array([9]), np.array([5]), supervise_all=False, intent_rate=1.0)
    assert last["targets"].tolist() == [[0, 0, 0, 10]]
    assert last["intent_mask"].tolist() == [[False, False, False, True]]  # item 10 has phrase 0


def test_eval_samples_truncate_to_max_len():
    s = make_split(OFFSETS, n_test=1)
    starts, ends = eval_samples(s, s.test_pos, s.test_user, max_len=3)
    assert starts.tolist() == [1, 13] and ends.tolist() == [4, 16]
