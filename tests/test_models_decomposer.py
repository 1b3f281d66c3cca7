"""The decomposer: shapes and gates, its configuration, the incremental update against the full
sequence for every backbone, the profiles, and how the dimensions rank (the per-dimension soft
maximum and its base, the words as a member, the mixture, gate scaling, the residual readout)."""

from __future__ import annotations

import pytest
import torch

from models.nn.decomposer import DecomposerConfig
from models.nn.items import last_position
from models.training.loop import new_model
from model_helpers import first_batch


DIMS = ["topic", "sentiment", "time", "latent_1", "latent_2"]


@pytest.mark.parametrize(
    "combine, members", [("concat", DIMS), ("sum", DIMS), ("mixture", DIMS), ("max", [*DIMS, "base"])]
)
def test_decomposer_shapes(tiny_data, split, combine, members):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine=combine, n_latent=2)
    batch = first_batch(tiny_data, split, intent_rate=0.5)
    loss, parts = m(batch)
    assert torch.isfinite(loss) and set(parts) == {"next_item", "topic", "sentiment", "time"}
    loss.backward()
    m.eval()
    scores = m.score(batch)
    assert scores.shape == (8, tiny_data.n_items + 1)
    h = m.last_hidden(batch)
    ex = m.explain(h, batch["ctx_feats"][:, 0], top_k=3)
    M = len(members)
    assert ex["dims"] == members
    assert ex["alpha"].shape == (8, M) and ex["top_items"].shape == (8, M, 3)
    torch.testing.assert_close(ex["alpha"].sum(-1), torch.ones(8))
    assert (ex["top_items"] > 0).all()  # padding is never recommended


def test_config_validation():
    with pytest.raises(ValueError, match="dims"):
        DecomposerConfig(n_items=5, dims=("topic", "mood"))
    with pytest.raises(ValueError, match="at least one"):
        DecomposerConfig(n_items=5, dims=(), n_latent=0)
    with pytest.raises(ValueError, match="combine"):
        DecomposerConfig(n_items=5, combine="maximum")
    with pytest.raises(ValueError, match="backbone"):
        DecomposerConfig(n_items=5, backbone="rnn")
    with pytest.raises(ValueError, match="heads"):
        DecomposerConfig(n_items=5, backbone="transformer", lstm_units=30, heads=4)
    with pytest.raises(ValueError, match="intent_member"):
        DecomposerConfig(n_items=5, intent_member=True)
    with pytest.raises(ValueError, match="tau"):
        DecomposerConfig(n_items=5, combine="max", tau=0.0)
    base_alone = DecomposerConfig(n_items=5, combine="max", dims=(), n_latent=0)
    assert base_alone.member_names == ("base",)


@pytest.mark.parametrize(
    "over",
    [
        {"profile_decays": ()},
        {},
        {"backbone": "gru"},
        {"backbone": "transformer", "max_len": 6, "lstm_units": 16, "heads": 2},
        {"backbone": "transformer", "max_len": 200, "lstm_units": 16},
    ],
    ids=[
        "lstm state",
        "lstm, profiles (default)",
        "gru",
        "transformer, window shorter than the history",
        "transformer",
    ],
)
def test_incremental_state_equals_full_sequence(tiny_data, split, over):
    """A state advanced event by event (the serving path) is the training path's at the last event;
    the transformer's is the one over its last max_len events, as an evaluation sample is read."""
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="max", **over).eval()
    batch = first_batch(tiny_data, split)
    row = int(batch["lengths"].argmax())  # the longest history of the batch
    batch = {k: v[row : row + 1] for k, v in batch.items()}
    T = int(batch["lengths"][0])
    L = m.cfg.max_len
    assert T > 6  # the short window drops events
    items, ratings, feats = batch["items"][:, :T], batch["ratings"][:, :T], batch["event_feats"][:, :T]
    state = None
    for t in range(T):  # one step per new event
        state = m.advance(state, items[:, t : t + 1], ratings[:, t : t + 1], feats[:, t : t + 1])
    assert [x.shape[-1] for x in state] == list(m.state_sizes())
    if m.cfg.backbone != "transformer":
        full = m.encoder(batch)[:, T - 1]
        torch.testing.assert_close(m.encoder.output(state), full, atol=1e-5, rtol=1e-5)
    else:  # the last max_len events, read as an evaluation sample reads them
        window = {k: batch[k][:, max(T - L, 0) : T] for k in ("items", "ratings", "event_feats")}
        torch.testing.assert_close(m.encoder.output(state), m.encoder(window)[:, -1], atol=1e-5, rtol=1e-5)
        if T > L:  # the rest reads the whole history (the profile), which the window has not
            return
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


def test_mixture_is_a_distribution_over_the_catalogue(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="mixture", n_latent=2).eval()
    z, ctx = torch.randn(3, m.state_dim), torch.randn(3, 5)
    log_p = m.score_state(z, ctx)  # (P, N+1)
    p = log_p.exp()
    assert (p[:, 0] == 0).all()  # the padding is never predicted
    torch.testing.assert_close(p.sum(-1), torch.ones(3))


def test_the_base_alone_is_the_backbone_readout(tiny_data, split):
    """K = 1 (no dimension, the base member alone) reproduces the backbone's own scores and its
    plain softmax loss exactly: what the dimensions add is measured against this."""
    from models.nn.losses import full_softmax_ce, seen_pairs

    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="max", dims=(), n_latent=0, tau=0.5).eval()
    z, ctx = torch.randn(4, m.state_dim), torch.randn(4, 5)
    V = m.items.all()
    torch.testing.assert_close(m.score_state(z, ctx), m.direct(z) @ V.T)
    torch.testing.assert_close(m.gates(z, ctx), torch.ones(4, 1))
    batch = first_batch(tiny_data, split)
    loss, _ = m(batch)
    sup = batch["targets"] > 0
    u = m.direct(m.states(batch)[sup])
    expected = full_softmax_ce(u, V, batch["targets"][sup], seen_pairs(batch["items"], sup, batch["targets"]))
    torch.testing.assert_close(loss, expected)


def test_the_soft_maximum_ranks_two_interests_above_their_midpoint(tiny_data, split):
    """Two members pointing at two item clusters: "max" ranks both clusters above an item at their
    midpoint, which one combined vector (their weighted sum) cannot do."""
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="max", dims=(), n_latent=2, tau=0.1).eval()
    D = m.cfg.item_dim
    a, b = torch.zeros(D), torch.zeros(D)
    a[0], b[1] = 1.0, 1.0
    V = torch.stack([torch.zeros(D), 3 * a, 3 * b, 1.6 * (a + b)])  # padding, cluster A, cluster B, the midpoint
    U = torch.stack([3 * a, 3 * b, torch.zeros(D)])[None]  # the two dimensions and a silent base
    log_alpha = torch.log(torch.tensor([[0.5, 0.5, 1e-6]]))
    s = m.pool_scores(U, log_alpha, V)[0]
    assert s[1] > s[3] and s[2] > s[3]
    one = (log_alpha.exp()[0, :, None] * U[0]).sum(0)  # the single-vector reading of the same interests
    single = V @ one
    assert single[3] > single[1] and single[3] > single[2]


@pytest.mark.parametrize("item_bias", [False, True])
def test_ranking_without_gradients_scores_as_training_does(tiny_data, split, item_bias):
    """The soft maximum's in-place path (no autograd) gives the training path's scores."""
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="max", n_latent=2, tau=0.3, item_bias=item_bias).eval()
    V = m.items.output().detach() + torch.randn(m.items.output().shape)  # a learnt-looking bias column too
    assert V.shape[1] == m.cfg.item_dim + item_bias
    M = len(m.cfg.member_names)
    U = torch.randn(3, M, m.cfg.item_dim) * 4
    log_alpha = torch.randn(3, M).log_softmax(-1)
    with torch.no_grad():
        ranked = m.pool_scores(U, log_alpha, V)
    trained = m.pool_scores(U.requires_grad_(), log_alpha, V)
    assert trained.requires_grad and not ranked.requires_grad
    torch.testing.assert_close(ranked, trained.detach())


def test_the_words_are_a_member_only_when_a_request_has_them(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="max", intent_member=True).eval()
    assert m.cfg.member_names[-2:] == ("base", "intent")
    z, ctx = torch.randn(2, m.state_dim), torch.randn(2, 5)
    words = torch.zeros(2, m.cfg.text_dim)
    words[0] = torch.randn(m.cfg.text_dim)
    alpha = m.gates(z, ctx, words)
    assert alpha[0, -1] > 0 and alpha[1, -1] == 0
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2))
    # a request without words is scored as if the words member did not exist
    torch.testing.assert_close(m.score_state(z[1:], ctx[1:], words[1:]), m.score_state(z[1:], ctx[1:]))
    loss, _ = m(first_batch(tiny_data, split, intent_rate=0.5))
    loss.backward()
    assert m.words_out.weight.grad.abs().sum() > 0


def test_separation_penalty_is_zero_for_orthogonal_and_one_for_equal_vectors():
    from models.nn.interests import separation_penalty

    eye = torch.eye(4)[None]  # (1, M=4, D=4)
    assert float(separation_penalty(eye)) == 0.0
    same = torch.ones(2, 3, 5)
    torch.testing.assert_close(separation_penalty(same), torch.tensor(1.0))


def test_scale_gates_gives_uniform_gates_weight_one(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, scale_gates=True, residual=False).eval()
    z, I = torch.randn(3, m.state_dim), torch.randn(3, m.K, m.cfg.dim_size)
    uniform = torch.full((3, m.K), 1.0 / m.K).log()
    torch.testing.assert_close(m.combined(z, I, uniform), m.out(I.flatten(-2)))
    m.cfg.scale_gates = False
    torch.testing.assert_close(m.combined(z, I, uniform), m.out(I.flatten(-2) / m.K))


def test_residual_readout_adds_the_direct_vector(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, residual=True).eval()
    h, ctx = torch.randn(3, m.state_dim), torch.randn(3, 5)  # z_t: h_t and the profiles
    u, I, alpha = m.user_vectors(h, ctx)
    torch.testing.assert_close(u, m.out((alpha[..., None] * I).flatten(-2)) + m.direct(h))
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
    emb, vectors, text = m.items.emb.weight, m.items.all, m.items.proj(m.items.text)
    with torch.no_grad():
        torch.testing.assert_close(vectors()[3], text[3])  # no id vector
        assert not torch.allclose(vectors()[4], text[4])  # a known item keeps its own
        batch = first_batch(tiny_data, split)
        before = m.score(batch)
        emb[3] += 5.0  # whatever training did to the cold item's id vector has no effect
        torch.testing.assert_close(m.score(batch), before)


@pytest.mark.parametrize("kind, flags", [("decomposer", {"combine": "max"}), ("sasrec", {"use_text": True})])
def test_item_tower_levers(tiny_data, split, kind, flags):
    """The id part bounded to its radius; a bias per item, one shared by the cold items; a share of
    known items cold for a training epoch on both sides; the text projection frozen."""
    import numpy as np

    torch.manual_seed(0)
    levers = {"residual_radius": 0.05, "item_bias": True, "cold_share": 0.5, "freeze_text": True}
    m = new_model(kind, tiny_data, split, **flags, **levers)
    counts = np.ones(tiny_data.n_items + 1, np.int64)
    counts[3] = 0
    m.set_item_data(tiny_data.item_emb, tiny_data.item_genres, counts)
    tower = m.items
    with torch.no_grad():
        tower.emb.weight.mul_(100.0)  # far outside the radius
        tower.bias.copy_(torch.arange(tiny_data.n_items + 1, dtype=torch.float32))
        tower.cold_bias.fill_(-7.0)
    m.eval()
    ids = tower.all() - tower.proj(tower.text)
    assert ids.norm(dim=1).max() <= 0.05 + 1e-6
    V = tower.output()
    assert V.shape[1] == tower.emb.weight.shape[1] + 1  # the bias column
    assert V[3, -1] == -7.0 and V[4, -1] == 4.0  # the cold item has the cold items' bias
    assert not tower.proj.weight.requires_grad
    m.train()  # an epoch: half the known items are cold, on the input and the output side
    cold = tower.simulated.bool()
    assert 0 < int(cold.sum()) < tiny_data.n_items and not cold[3]
    V = tower.output()
    text = tower.proj(tower.text)
    torch.testing.assert_close(V[cold][:, :-1], text[cold])
    assert (V[cold][:, -1] == -7.0).all()
    items = torch.nonzero(cold)[:2].T  # (1, 2)
    torch.testing.assert_close(tower(items)[0], text[items[0]])
    loss, _ = m(first_batch(tiny_data, split))
    loss.backward()
    assert tower.bias.grad is not None and tower.cold_bias.grad is not None
    m.eval()
    assert not tower.simulated.any()


@pytest.mark.parametrize(
    "kind, flags", [("decomposer", {}), ("decomposer", {"combine": "max"}), ("sasrec", {"use_text": True})]
)
def test_normalised_vectors_score_cosines_over_the_temperature(tiny_data, split, kind, flags):
    """With cosine_tau, a score is cos(u, q_i)/τ: item vectors of unit length on the output side,
    and scores within ±1/τ however long the vectors grow (as popular items' id parts do)."""
    torch.manual_seed(0)
    m = new_model(kind, tiny_data, split, **flags, cosine_tau=0.1).eval()
    batch = first_batch(tiny_data, split)
    with torch.no_grad():
        m.items.emb.weight.mul_(50.0)
        m.items.proj.weight.mul_(50.0)  # every item vector 50 times as long
    torch.testing.assert_close(m.items.output()[1:].norm(dim=1), torch.ones(tiny_data.n_items))
    s = m.score(batch)
    assert s.abs().max() <= 10.0 + 1e-4 and s.std() > 0.1
    if kind == "sasrec":  # one vector per user: the score is exactly its cosine with the item over τ
        u = last_position(m.encode(batch), batch["lengths"])
        q = m.items.all()
        cos = torch.nn.functional.cosine_similarity(u[:, None, :], q[None, 1:, :], dim=-1)
        torch.testing.assert_close(m.score(batch)[:, 1:], cos / 0.1, atol=1e-4, rtol=1e-4)


def test_an_old_text_sasrec_checkpoint_loads_into_the_item_tower(tiny_data, split, tmp_path):
    from models.nn import checkpoint

    m = new_model("sasrec", tiny_data, split, use_text=True).eval()
    ckpt = checkpoint.to_bytes_dict(m)
    old = {"items.emb.": "item_emb.", "items.proj.": "text_proj.", "items.text": "text", "items.known": "known"}
    state = {}
    for name, value in ckpt["state_dict"].items():
        new = next((to + name[len(frm) :] for frm, to in old.items() if name.startswith(frm)), name)
        state[new] = value
    assert "text_proj.weight" in state and "item_emb.weight" in state
    loaded, _ = checkpoint.from_dict({**ckpt, "state_dict": state})
    batch = first_batch(tiny_data, split)
    torch.testing.assert_close(loaded.score(batch), m.score(batch))


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


def test_items_added_while_serving_are_placed_by_their_text(tiny_data, split):
    """A new item gets its text's vector (no id part, the cold items' bias), ranks like any cold item,
    and events on it advance a state."""
    import numpy as np

    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="max", item_bias=True).eval()
    N = tiny_data.n_items
    before = m.items.output().clone()
    text = tiny_data.item_emb[[5, 7]]  # two new items with the texts of items 5 and 7
    new = m.add_items(text, tiny_data.item_genres[[5, 7]])
    assert list(new) == [N + 1, N + 2] and m.cfg.n_items == N + 2
    V = m.items.output()
    torch.testing.assert_close(V[: N + 1], before)  # the trained catalogue is unchanged
    torch.testing.assert_close(V[N + 1, :-1], m.items.proj(torch.as_tensor(text[0], dtype=torch.float32)))
    assert V[N + 1, -1] == m.items.cold_bias
    z, ctx = torch.randn(2, m.state_dim), torch.randn(2, 5)
    assert m.score_state(z, ctx).shape == (2, N + 3)
    state = m.advance(None, torch.tensor([[1, N + 1]]), torch.tensor([[8, 8]]), torch.zeros(1, 2, 5))
    assert torch.isfinite(m.interest_state(state)).all()
    assert not np.allclose(
        m.interest_state(state).numpy(),
        m.interest_state(m.advance(None, torch.tensor([[1]]), torch.tensor([[8]]), torch.zeros(1, 1, 5))).numpy(),
    )


@pytest.mark.parametrize("flags", [{}, {"combine": "max"}])
def test_profile_skip_adds_the_decayed_means_to_the_base_readout(tiny_data, split, flags):
    """With profile_skip, u_0 = W z_t + Σ_λ β_λ m_t^(λ): with β = 0 the scores are the plain model's."""
    torch.manual_seed(0)
    plain = new_model("decomposer", tiny_data, split, **flags).eval()
    skip = new_model("decomposer", tiny_data, split, **flags, profile_skip=True).eval()
    skip.load_state_dict({**plain.state_dict(), "skip": skip.skip.detach()})
    batch = first_batch(tiny_data, split)
    assert not torch.allclose(skip.score(batch), plain.score(batch))
    with torch.no_grad():
        skip.skip.zero_()
    torch.testing.assert_close(skip.score(batch), plain.score(batch))
    with pytest.raises(ValueError, match="profile_skip"):
        DecomposerConfig(n_items=5, profile_skip=True, profile_decays=())


def _moments(batch) -> torch.Tensor:
    return last_position(batch["next_time"], batch["lengths"])  # (B,) each row's moment


@pytest.mark.parametrize(
    "kind, flags", [("decomposer", {}), ("decomposer", {"combine": "max"}), ("sasrec", {"use_text": True})]
)
def test_the_new_item_bias_reads_only_training_events_before_the_moment(tiny_data, split, kind, flags):
    """An item is new at t when no training event before t holds it, and is scored then by its text
    and the new-item bias. Events planted after every moment scored change no score; events planted
    before them make no item new, and change the scores of the items that were new, and no other."""
    import numpy as np

    from models.nn.items import first_seen_times
    from models.training.loop import training_first_seen

    torch.manual_seed(0)
    m = new_model(kind, tiny_data, split, **flags, new_item_bias=True).eval()
    with torch.no_grad():
        m.items.new_w.copy_(torch.tensor([3.0, 0.0]))
    batch = first_batch(tiny_data, split)
    t = _moments(batch)
    first = training_first_seen(tiny_data, split)
    before = m.score(batch)

    def with_events(at: int) -> torch.Tensor:
        items = np.arange(1, tiny_data.n_items + 1)
        planted = np.minimum(first, first_seen_times(items, np.full(len(items), at), tiny_data.n_items))
        m.items.set_first_seen(planted)
        return m.score(batch)

    torch.testing.assert_close(with_events(int(t.max()) + 1), before)  # after every moment: no effect
    m.items.set_first_seen(first)
    earlier = with_events(int(t.min()) - 1)  # before every moment: no item is new any more
    new_then = torch.as_tensor(first)[None, :] >= t[:, None]  # (B, N+1)
    new_then[:, 0] = False
    assert new_then.any() and (~new_then[:, 1:]).any()
    torch.testing.assert_close(earlier[~new_then], before[~new_then])
    assert (earlier[new_then] != before[new_then]).all()


@pytest.mark.parametrize("K, combine", [(1, "concat"), (3, "max")])
def test_the_new_item_bias_trains_as_plain_autograd_does(K, combine):
    """The chunked softmax with new items: the loss and every gradient (the bias's and the text
    vectors' too) equal those of the logits written out, u·q_i, or u·x_i + b(t) for an item new at t."""
    from models.nn.losses import pooled_softmax_ce

    torch.manual_seed(0)
    P, D, n = 7, 5, 30
    U = torch.randn(P, K, D, requires_grad=True)
    V = torch.randn(n, D, requires_grad=True)
    la = torch.log_softmax(torch.randn(P, K), 1).requires_grad_(True)
    o = torch.randn(P, requires_grad=True)
    X = torch.randn(n, D, requires_grad=True)  # the text vectors
    first = torch.randint(0, 100, (n,))
    first[0] = -(2**62)
    times = torch.randint(0, 100, (P,))
    targets = torch.randint(1, n, (P,))
    loss = pooled_softmax_ce(U, V, targets, la, pool="max", tau=0.5, new_items=(first, times, o, X))
    grads = torch.autograd.grad(loss, (U, V, la, o, X))
    new = first[None, :] >= times[:, None]  # (P, n)
    assert new[:, 1:].any() and (~new[:, 1:]).any()
    logits = torch.where(new[:, None, :], U @ X.T, U @ V.T)  # (P, K, n)
    s = 0.5 * torch.logsumexp((logits + la[..., None]) / 0.5, 1) if K > 1 else logits[:, 0] + la
    s = s + o[:, None] * new
    s = torch.cat([torch.full((P, 1), -torch.inf), s[:, 1:]], 1)
    ref = torch.nn.functional.cross_entropy(s, targets)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, (U, V, la, o, X))):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_the_new_item_bias_learns_and_serves_as_a_column(tiny_data, split, loss):
    """Training moves (w_0, w_1); serving, after every training event, gives the items no training
    event holds, and the items added since, the bias as a fixed column of the item vectors."""
    import numpy as np

    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, combine="max", loss=loss, new_item_bias=True, item_bias=True)
    l, _ = m(first_batch(tiny_data, split))
    l.backward()
    assert m.items.new_w.grad.abs().sum() > 0
    m.eval()
    counts = np.ones(tiny_data.n_items + 1, np.int64)
    counts[3] = 0
    first = np.zeros(tiny_data.n_items + 1, np.int64)
    first[3] = np.iinfo(np.int64).max  # item 3: never in training
    m.set_item_data(tiny_data.item_emb, tiny_data.item_genres, counts, first)
    with torch.no_grad():
        m.items.new_w.copy_(torch.tensor([2.0, 0.5]))
        m.items.cold_bias.fill_(-7.0)  # replaced, not added to: a new item's bias is the new-item bias alone
        m.items.bias.zero_()
    N = tiny_data.n_items
    new_bias = 2.0 + 0.5 * np.log(1 / N)
    V = m.items.output()
    assert V[3, -1].item() == pytest.approx(new_bias) and V[4, -1] == 0.0
    added = m.add_items(tiny_data.item_emb[1:3], tiny_data.item_genres[1:3])
    V = m.items.output()
    assert V[added.start, -1].item() == pytest.approx(2.0 + 0.5 * np.log(3 / (N + 2)))  # 3 new of N + 2
    batch = {k: v for k, v in first_batch(tiny_data, split).items() if k != "next_time"}
    torch.testing.assert_close(m.score(batch), m.score_state(m.last_hidden(batch), _ctx(batch)))


def _ctx(batch) -> torch.Tensor:
    return last_position(batch["ctx_feats"], batch["lengths"])
