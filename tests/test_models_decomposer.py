"""The decomposer: shapes and gates, its configuration, the incremental update against the full
sequence, the profiles, and the readout (mixture, gate scaling, residual)."""

from __future__ import annotations

import pytest
import torch

from models.nn.decomposer import DecomposerConfig
from models.training.loop import new_model
from model_helpers import first_batch


@pytest.mark.parametrize("combine", ["concat", "sum", "mixture"])
def test_decomposer_shapes(tiny_data, split, combine):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine=combine, n_latent=2)
    batch = first_batch(tiny_data, split, intent_rate=0.5)
    loss, parts = m(batch)
    assert torch.isfinite(loss) and set(parts) == {"next_item", "topic", "sentiment", "time"}
    m.eval()
    scores = m.score(batch)
    assert scores.shape == (8, tiny_data.n_items + 1)
    h = m.last_hidden(batch)
    ex = m.explain(h, batch["ctx_feats"][:, 0], top_k=3)
    assert ex["dims"] == ["topic", "sentiment", "time", "latent_1", "latent_2"]
    assert ex["alpha"].shape == (8, 5) and ex["top_items"].shape == (8, 5, 3)
    torch.testing.assert_close(ex["alpha"].sum(-1), torch.ones(8))
    assert (ex["top_items"] > 0).all()  # padding is never recommended


def test_config_validation():
    with pytest.raises(ValueError, match="dims"):
        DecomposerConfig(n_items=5, dims=("topic", "mood"))
    with pytest.raises(ValueError, match="at least one"):
        DecomposerConfig(n_items=5, dims=(), n_latent=0)
    with pytest.raises(ValueError, match="combine"):
        DecomposerConfig(n_items=5, combine="max")


@pytest.mark.parametrize("over", [{"profile_decays": ()}, {}], ids=["lstm state", "profiles (default)"])
def test_incremental_state_equals_full_sequence(tiny_data, split, over):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, **over).eval()
    batch = first_batch(tiny_data, split, n=1)
    T = int(batch["lengths"][0])
    items, ratings, feats = batch["items"][:, :T], batch["ratings"][:, :T], batch["event_feats"][:, :T]
    _, full = m.encoder.run(items, ratings, feats)
    state = None
    for t in range(T):  # one LSTM step per new event
        state = m.advance(state, items[:, t : t + 1], ratings[:, t : t + 1], feats[:, t : t + 1])
    torch.testing.assert_close(state[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[1], full[1], atol=1e-5, rtol=1e-5)
    assert [x.shape[-1] for x in state] == list(m.state_sizes())
    # The stepped state is the training path's state at the last event, profile included,
    # and several events at once give the same state as one at a time.
    z = m.interest_state(state)
    torch.testing.assert_close(z, m.last_hidden(batch), atol=1e-5, rtol=1e-5)
    half = m.advance(
        m.advance(None, items[:, : T // 2], ratings[:, : T // 2], feats[:, : T // 2]),
        items[:, T // 2 :],
        ratings[:, T // 2 :],
        feats[:, T // 2 :],
    )
    torch.testing.assert_close(m.interest_state(half), z, atol=1e-5, rtol=1e-5)
    ctx = batch["ctx_feats"][:, T - 1]
    torch.testing.assert_close(m.score_state(z, ctx), m.score(batch), atol=1e-4, rtol=1e-4)


def test_profile_is_a_decayed_mean(tiny_data, split):
    """m_t^(1) is the plain mean of the item vectors so far; m_t^(λ) weighs event s by λ^(t−s)."""
    m = new_model("decomposer", tiny_data, split, profile_decays=(1.0, 0.5)).eval()
    batch = first_batch(tiny_data, split, n=2)
    with torch.no_grad():
        z = m.states(batch)  # (B, T, U + 2D)
        q = m.items(batch["items"])  # (B, T, D)
    U, D = m.cfg.lstm_units, m.cfg.item_dim
    t = 4
    torch.testing.assert_close(z[:, t, U : U + D], q[:, : t + 1].mean(1))
    w = 0.5 ** torch.arange(t, -1, -1, dtype=torch.float32)  # λ^(t−s), s = 0..t
    torch.testing.assert_close(z[:, t, U + D :], (w[None, :, None] * q[:, : t + 1]).sum(1) / w.sum())
    with pytest.raises(ValueError, match="profile_decays"):
        DecomposerConfig(n_items=5, profile_decays=(1.5,))


def test_mixture_leaves_seen_items_out_of_every_dimension(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="mixture", n_latent=2).eval()
    P, K = 3, m.K
    I, alpha = torch.randn(P, K, m.cfg.dim_size), torch.softmax(torch.randn(P, K), -1)
    seen = (torch.tensor([0, 0, 2]), torch.tensor([1, 4, 4]))
    log_p = m.mixture_log_probs(I, alpha, m.items.all(), seen)  # (P, N+1)
    p = log_p.exp()
    assert p[0, 1] < 1e-12 and p[0, 4] < 1e-12 and p[2, 4] < 1e-12 and p[1, 4] > 0
    torch.testing.assert_close(p.sum(-1), torch.ones(P))  # still a distribution


def test_scale_gates_gives_uniform_gates_weight_one(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, scale_gates=True).eval()
    I = torch.randn(3, m.K, m.cfg.dim_size)
    uniform = torch.full((3, m.K), 1.0 / m.K)
    torch.testing.assert_close(m.combine(I, uniform), m.out(I.flatten(-2)))
    m.cfg.scale_gates = False
    torch.testing.assert_close(m.combine(I, uniform), m.out(I.flatten(-2) / m.K))


def test_residual_readout_adds_the_direct_lstm_vector(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, residual=True).eval()
    h, ctx = torch.randn(3, m.heads.in_features), torch.randn(3, 5)  # z_t: h_t and the profiles
    u, I, alpha = m.user_vectors(h, ctx)
    torch.testing.assert_close(u, m.combine(I, alpha) + m.direct(h))
    assert new_model("decomposer", tiny_data, split, residual=False).direct is None
    loss, _ = m(first_batch(tiny_data, split))
    loss.backward()
    assert m.direct.weight.grad is not None


@pytest.mark.parametrize("kind, flags", [("decomposer", {}), ("sasrec", {"use_text": True})])
def test_an_item_no_training_event_holds_is_placed_by_its_text_alone(tiny_data, split, kind, flags):
    import numpy as np

    torch.manual_seed(0)
    m = new_model(kind, tiny_data, split, **flags).eval()
    counts = np.ones(tiny_data.n_items + 1, np.int64)
    counts[3] = 0  # item 3: never in training
    m.set_item_data(tiny_data.item_emb, tiny_data.item_genres, counts)
    emb = m.items.emb.weight if kind == "decomposer" else m.item_emb.weight
    vectors = (lambda: m.items.all()) if kind == "decomposer" else m.item_vectors
    text = m.items.proj(m.items.text) if kind == "decomposer" else m.text_proj(m.text)
    with torch.no_grad():
        torch.testing.assert_close(vectors()[3], text[3])  # no id vector
        assert not torch.allclose(vectors()[4], text[4])  # a known item keeps its own
        batch = first_batch(tiny_data, split)
        before = m.score(batch)
        emb[3] += 5.0  # whatever training did to the cold item's id vector has no effect
        torch.testing.assert_close(m.score(batch), before)


def test_an_id_only_model_keeps_every_id_vector(tiny_data, split):
    import numpy as np

    m = new_model("sasrec", tiny_data, split).eval()
    counts = np.ones(tiny_data.n_items + 1, np.int64)
    counts[3] = 0
    m.set_item_data(tiny_data.item_emb, tiny_data.item_genres, counts)
    torch.testing.assert_close(m.item_vectors()[3], m.item_emb.weight[3])


def test_id_dropout_leaves_out_id_vectors_in_training_only(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, id_dropout=1.0)
    text = m.items.proj(m.items.text)
    torch.testing.assert_close(m.items.all(), text)  # training, every id vector dropped
    m.eval()
    assert not torch.allclose(m.items.all()[1:], text[1:])
    assert new_model("decomposer", tiny_data, split, use_text=False, id_dropout=0.5).items.id_dropout == 0.0
