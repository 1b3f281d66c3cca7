import numpy as np
import pytest
import torch

from models.evaluation.metrics import paired_bootstrap, per_user_mean, rank_metrics, summarize, target_ranks


def test_ranks_with_ties_and_history_mask():
    # items 1..4 (column 0 is padding)
    scores = torch.tensor([[9.0, 0.1, 0.4, 0.3, 0.2], [9.0, 0.5, 0.5, 0.9, 0.1]])
    targets = torch.tensor([3, 1])
    r = target_ranks(scores, targets)
    assert r.tolist() == [1.0, 1.5]  # row 0: item 2 beats it; row 1: item 3 beats, item 2 ties (half)
    history = torch.zeros(2, 5, dtype=torch.bool)
    history[0, 2] = True  # removing item 2 makes the target first
    history[1, 1] = True  # the target itself is never removed
    history[1, 3] = True
    r = target_ranks(scores, targets, history)
    assert r.tolist() == [0.0, 0.5]


def test_a_nan_score_is_an_error_not_a_metric_above_one():
    scores = torch.tensor([[0.0, 0.3, float("nan"), 0.1], [0.0, 0.2, 0.5, 0.1]])
    with pytest.raises(ValueError, match="NaN in 1 of 2 rows .first: row 0"):
        target_ranks(scores, torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="NaN"):  # a NaN elsewhere in the row too
        target_ranks(scores, torch.tensor([1, 1]))
    scores[0, 2] = 0.4
    assert target_ranks(scores, torch.tensor([2, 1])).tolist() == [0.0, 1.0]


def test_metric_values_by_hand():
    m = rank_metrics(np.array([0.0, 1.0, 9.0, 10.0, 25.0]))
    assert m["hr@10"].tolist() == [1, 1, 1, 0, 0]
    assert m["hr@20"].tolist() == [1, 1, 1, 1, 0]
    expected = [1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0, 0.0]
    np.testing.assert_allclose(m["ndcg@10"], expected)
    np.testing.assert_allclose(m["mrr"], [1, 1 / 2, 1 / 10, 1 / 11, 1 / 26])
    assert summarize(m)["hr@10"] == pytest.approx(0.6)


def test_per_user_mean_and_bootstrap():
    v = per_user_mean(np.array([1.0, 0.0, 0.5, 0.5]), np.array([3, 3, 7, 7]))
    np.testing.assert_allclose(v, [0.5, 0.5])
    a = np.full(200, 0.3)
    b = np.full(200, 0.1) + np.random.default_rng(0).normal(0, 0.05, 200)
    ci = paired_bootstrap(a, b)
    assert ci["lo"] < ci["mean"] < ci["hi"]
    assert 0.18 < ci["lo"] and ci["hi"] < 0.22
    tie = paired_bootstrap(a, a)
    assert tie["lo"] == tie["hi"] == 0.0


def test_seed_user_bootstrap_holds_the_seed_variance():
    from models.evaluation.metrics import seed_user_bootstrap

    rng = np.random.default_rng(0)
    users = rng.normal(0.3, 0.1, 300)  # per-user level shared by every run
    steady = users[None] + rng.normal(0, 0.01, (3, 300))  # three seeds that agree
    shaky = users[None] + np.array([[-0.05], [0.0], [0.05]]) + rng.normal(0, 0.01, (3, 300))
    base = users[None] - 0.02 + rng.normal(0, 0.01, (3, 300))
    calm, wild = seed_user_bootstrap(steady, base), seed_user_bootstrap(shaky, base)
    assert calm["lo"] > 0 and calm["hi"] - calm["lo"] < 0.01  # users paired: only noise is left
    assert wild["hi"] - wild["lo"] > 3 * (calm["hi"] - calm["lo"])  # seeds that disagree widen it
    assert wild["seeds"] == [3, 3] and wild["users"] == 300
    same = seed_user_bootstrap(steady[:1], steady[:1])
    assert same["lo"] == same["hi"] == 0.0
    with pytest.raises(ValueError, match="same users"):
        seed_user_bootstrap(steady, base[:, :10])
