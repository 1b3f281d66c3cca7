"""Model shapes, a tiny-data overfit, the incremental update, checkpoints, and the shared loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.nn import checkpoint
from models.data.batching import make_split, training_windows
from models.nn.checkpoint import CheckpointError
from models.nn.decomposer import DecomposerConfig
from models.training.loop import TrainConfig, fit, new_model
from models.data.batching import batch_builder
from models.evaluation.evaluate import evaluate


@pytest.fixture(scope="module")
def split(tiny_data):
    return make_split(tiny_data.user_offsets, 1)


def first_batch(data, split, n=8, intent_rate=0.0):
    starts, ends, rows = training_windows(split, 200)
    return batch_builder(data)(
        starts[:n], ends[:n], split.user_start[rows[:n]], intent_rate=intent_rate, rng=np.random.default_rng(0)
    )


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


@pytest.mark.parametrize("kind", ["decomposer", "lstm", "gru4rec", "sasrec"])
def test_overfits_a_tiny_batch(tiny_data, split, kind):
    torch.manual_seed(0)
    over = {"dropout": 0.0}
    if kind == "decomposer":
        over["aux_weight"] = 0.0
    m = new_model(kind, tiny_data, split, **over)
    batch = first_batch(tiny_data, split, n=4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, _ = m(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first


def test_sampled_softmax_trains(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, loss="sampled", n_negatives=16)
    loss, _ = m(first_batch(tiny_data, split))
    loss.backward()
    assert torch.isfinite(loss) and m.items.emb.weight.grad is not None


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


def test_checkpoint_round_trip_and_bad_files(tiny_data, split, tmp_path):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, lstm_units=48, dims=("topic",), n_latent=2).eval()
    path = checkpoint.save(tmp_path / "best.pt", m, {"valid_ndcg@10": 0.5})
    loaded, meta = checkpoint.load(path)
    assert loaded.cfg == m.cfg and meta == {"valid_ndcg@10": 0.5}
    batch = first_batch(tiny_data, split)
    torch.testing.assert_close(loaded.score(batch), m.score(batch))

    (tmp_path / "corrupt.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "corrupt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_args"]["lstm_units"] = 64
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        checkpoint.load(tmp_path / "mismatch.pt")
    torch.save({"format": checkpoint.FORMAT, "evil": object()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="corrupt"):  # arbitrary objects are never unpickled
        checkpoint.load(tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="no such"):
        checkpoint.load(tmp_path / "missing.pt")


def test_a_checkpoint_from_before_a_field_existed_loads_as_the_model_it_was(tiny_data, split, tmp_path):
    """Fields added later (the residual readout, the profiles) mean "off" when a checkpoint lacks them."""
    torch.manual_seed(0)
    old = new_model("decomposer", tiny_data, split, residual=False, profile_decays=()).eval()
    ckpt = checkpoint.to_bytes_dict(old)
    for added in checkpoint.ABSENT_MEANS["decomposer"]:
        del ckpt["model_args"][added]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, _ = checkpoint.load(tmp_path / "old.pt")
    assert loaded.direct is None and loaded.cfg.profile_decays == ()
    assert DecomposerConfig().residual and DecomposerConfig().profile_decays  # today's defaults differ
    batch = first_batch(tiny_data, split)
    torch.testing.assert_close(loaded.score(batch), old.score(batch))


@pytest.mark.parametrize(
    "kind",
    [
        "popular",
        "seen-popular",
        "intent-text",
        "intent-popular",
        "history-text",
        "lstm",
        "gru4rec",
        "sasrec",
        "decomposer",
    ],
)
def test_fit_and_evaluate_every_model(tiny_data, split, kind):
    m = new_model(kind, tiny_data, split)
    result = fit(m, tiny_data, split, TrainConfig(epochs=2, patience=2), progress=False)
    assert 0.0 <= result.best_valid["ndcg@10"] <= 1.0
    ev = evaluate(m, tiny_data, split, "test", with_intent=True)
    assert len(ev["users"]) == tiny_data.n_users
    for metrics in (ev["masked"], ev["unmasked"]):
        assert ((metrics["ndcg@10"] >= 0) & (metrics["ndcg@10"] <= 1)).all()
    # masking history can only move targets up
    assert ev["masked"]["mrr"].mean() >= ev["unmasked"]["mrr"].mean()


def test_seen_then_popular_ranks_the_window_first_and_under_the_mask_a_seen_target_first(tiny_data, split):
    from models.evaluation.metrics import target_ranks
    from models.evaluation.evaluate import history_mask

    m = new_model("seen-popular", tiny_data, split)
    pop = new_model("popular", tiny_data, split)
    batch = batch_builder(tiny_data)(split.user_start[:4], split.test_pos[:4], split.user_start[:4])
    scores, base = m.score(batch), pop.score(batch)
    for row in range(4):
        seen = set(batch["items"][row].tolist()) - {0}
        top = torch.argsort(scores[row], descending=True)[: len(seen)].tolist()
        assert set(top) == seen  # the window's items come first
        rest = [i for i in range(1, tiny_data.n_items + 1) if i not in seen]
        assert torch.equal(
            torch.argsort(scores[row, rest], descending=True), torch.argsort(base[row, rest], descending=True)
        )  # then by popularity
    # A target seen before is ranked first once the mask removes the other seen items.
    targets = torch.as_tensor(tiny_data.items[split.test_pos[:4]])
    batch["items"][:, -1] = targets
    history = history_mask(tiny_data.items, split.user_start[:4], split.test_pos[:4], tiny_data.n_items)
    history[torch.arange(4), targets] = True
    assert target_ranks(m.score(batch), targets, history).tolist() == [0.0] * 4


def test_intent_rules_rank_by_the_words(tiny_data, split):
    """Text retrieval ranks by similarity to the words; phrase popularity puts the phrase's items first."""
    rng = np.random.default_rng(0)
    batch = batch_builder(tiny_data)(
        split.user_start[:6], split.test_pos[:6], split.user_start[:6], supervise_all=False, intent_rate=1.0, rng=rng
    )
    last = batch["lengths"] - 1
    z = batch["intent"][torch.arange(6), last]  # (6, 384)
    assert batch["intent_mask"][torch.arange(6), last].all()
    text = torch.as_tensor(tiny_data.item_emb)
    sim = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    retrieval = new_model("intent-text", tiny_data, split).score(batch)
    assert torch.equal(retrieval[:, 1:].argmax(1), sim[:, 1:].argmax(1))
    phrase = new_model("intent-popular", tiny_data, split)
    scores, pop = phrase.score(batch), new_model("popular", tiny_data, split).score(batch)
    emb = torch.as_tensor(tiny_data.intent_emb)
    for row in range(6):
        pid = int(torch.argmax(z[row] @ emb.T))
        carriers = [i for i in range(1, tiny_data.n_items + 1) if pid in tiny_data.item_intents(i)]
        top = torch.argsort(scores[row], descending=True)[: len(carriers)].tolist()
        assert carriers and set(top) == set(carriers)
        others = [i for i in range(1, tiny_data.n_items + 1) if i not in carriers]
        assert scores[row, carriers].min() > scores[row, others].max()
        lift = scores[row, carriers[0]] - pop[row, carriers[0]]
        torch.testing.assert_close(scores[row, carriers] - lift, pop[row, carriers])  # by popularity
        torch.testing.assert_close(scores[row, others], pop[row, others])
    no_words = batch_builder(tiny_data)(
        split.user_start[:6], split.test_pos[:6], split.user_start[:6], supervise_all=False
    )
    assert torch.equal(phrase.score(no_words), pop) and torch.equal(
        new_model("intent-text", tiny_data, split).score(no_words), pop
    )  # no words: most-popular


def test_history_text_ranks_by_the_recent_items_text(tiny_data, split):
    """The content-based rule: similarity of each item's text to the mean text of the last ten inputs."""
    batch = batch_builder(tiny_data)(
        split.user_start[:6], split.test_pos[:6], split.user_start[:6], supervise_all=False
    )
    text = torch.nn.functional.normalize(torch.as_tensor(tiny_data.item_emb), dim=1)
    scores = new_model("history-text", tiny_data, split).score(batch)
    for row in range(6):
        n = int(batch["lengths"][row])
        recent = batch["items"][row, max(0, n - 10) : n]
        profile = torch.nn.functional.normalize(text[recent].sum(0), dim=0)
        assert int(scores[row, 1:].argmax()) + 1 == int((text[1:] @ profile).argmax()) + 1
        older = batch["items"].clone()
        older[row, : max(0, n - 10)] = 1  # what came before the last ten does not count
        torch.testing.assert_close(
            new_model("history-text", tiny_data, split).score({**batch, "items": older})[row], scores[row]
        )


def test_seen_pairs_mask_consumed_items_but_never_the_target():
    from models.nn.losses import full_softmax_ce, seen_pairs

    items = torch.tensor([[3, 5, 3, 7, 0], [2, 4, 0, 0, 0]])  # (B, T) windows
    targets = torch.tensor([[5, 3, 7, 0, 0], [4, 0, 0, 0, 0]])  # next item at each position
    rows, cols = seen_pairs(items, targets > 0, targets)
    assert set(zip(rows.tolist(), cols.tolist())) == {(0, 3), (1, 5), (2, 3), (2, 5), (3, 2)}
    # The masked loss is the cross-entropy with those logits removed by hand.
    torch.manual_seed(0)
    u, vecs = torch.randn(4, 6), torch.randn(9, 6)
    flat_targets = targets[targets > 0]
    logits = u @ vecs.T
    logits[:, 0] = -torch.inf
    for r, c in [(0, 3), (1, 5), (2, 3), (2, 5), (3, 2)]:
        logits[r, c] = -torch.inf
    expected = torch.nn.functional.cross_entropy(logits, flat_targets)
    assert torch.allclose(full_softmax_ce(u, vecs, flat_targets, (rows, cols)), expected)
    assert full_softmax_ce(u, vecs, flat_targets, (rows, cols)) < full_softmax_ce(u, vecs, flat_targets) + 1e-6


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


def test_lr_is_halved_on_a_validation_plateau(tiny_data, split):
    # A rate too small to move the ranking (and above the scheduler's eps of 1e-8): a plateau for certain.
    m = new_model("lstm", tiny_data, split)
    result = fit(m, tiny_data, split, TrainConfig(epochs=6, patience=6, lr=1e-6, lr_decay_patience=0), progress=False)
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == 1e-6 and all(b in (a, a / 2) for a, b in zip(lrs, lrs[1:]))
    assert min(lrs) < 1e-6  # a plateau happened, so the checks below are not vacuous
    # With patience 0 every epoch that is not a new best halves the rate for the next one.
    best = -1.0
    for h, nxt in zip(result.history, lrs[1:]):
        improved = h["valid_ndcg@10"] > best
        best = max(best, h["valid_ndcg@10"])
        assert nxt == (h["lr"] if improved else h["lr"] / 2)
    constant = fit(
        new_model("lstm", tiny_data, split),
        tiny_data,
        split,
        TrainConfig(epochs=3, patience=3, lr=1e-2),
        progress=False,
    )
    assert {h["lr"] for h in constant.history} == {1e-2}


def test_weight_average_is_the_moving_average_of_every_step(tiny_data, split):
    from models.training.loop import run_epoch, weight_average

    class Recording(torch.optim.AdamW):  # the real optimizer, remembering the weights after each step
        seen: list = []

        def step(self, closure=None):
            out = super().step(closure)
            self.seen.append([p.detach().clone() for p in self.param_groups[0]["params"]])
            return out

    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split)
    cfg = TrainConfig(lr=1e-2, batch_size=4, ema_decay=0.8)
    ema = weight_average(m, cfg)
    opt = Recording(m.parameters(), lr=cfg.lr)
    starts, ends, rows = training_windows(split, 200)
    run_epoch(
        m, opt, batch_builder(tiny_data), (starts, ends, split.user_start[rows]), cfg, np.random.default_rng(0), ema=ema
    )
    assert len(opt.seen) >= 3
    expected = opt.seen[0]  # the first update copies, later ones blend
    for step in opt.seen[1:]:
        expected = [0.8 * e + 0.2 * s for e, s in zip(expected, step)]
    averaged = list(ema.module.parameters())
    for a, e in zip(averaged, expected):
        torch.testing.assert_close(a, e)
    assert any(not torch.allclose(a, p) for a, p in zip(averaged, m.parameters()))  # not the live weights
    with pytest.raises(ValueError, match="ema_decay"):
        weight_average(m, TrainConfig(ema_decay=1.0))


def test_fit_keeps_the_averaged_weights(tiny_data, split):
    from models.evaluation.metrics import summarize

    def trained(**train):
        torch.manual_seed(0)
        m = new_model("sasrec", tiny_data, split)
        return m, fit(m, tiny_data, split, TrainConfig(epochs=1, patience=1, batch_size=4, **train), progress=False)

    live, _ = trained()  # one epoch: the kept weights are the last live ones
    averaged, result = trained(ema_decay=0.9)  # the same steps (the average does not touch training)
    assert any(not torch.allclose(a, b) for a, b in zip(averaged.parameters(), live.parameters()))
    averaged.eval()
    kept = summarize(evaluate(averaged, tiny_data, split, "valid")["masked"])
    assert kept["ndcg@10"] == pytest.approx(result.best_valid["ndcg@10"])  # what was validated is what is kept


def test_sasrec_with_text_and_events_reads_them(tiny_data, split):
    """The equally informed SASRec: its scores move with the item text and the event ratings,
    the id-only one ignores both."""
    batch = first_batch(tiny_data, split, n=4)
    for flags, reads in [({"use_text": True, "use_events": True}, True), ({}, False)]:
        torch.manual_seed(0)
        m = new_model("sasrec", tiny_data, split, **flags).eval()
        before = m.score(batch)
        rated = {**batch, "ratings": torch.where(batch["ratings"] > 0, 1, 0)}
        assert (not torch.allclose(m.score(rated), before)) == reads
        m.set_item_data(np.asarray(tiny_data.item_emb)[::-1].copy(), tiny_data.item_genres)
        assert (not torch.allclose(m.score(batch), before)) == reads
    loss, _ = new_model("sasrec", tiny_data, split, use_text=True, use_events=True, mask_seen=True)(batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_fusion_with_text_keeps_rows_without_words(tiny_data, split):
    from models.nn.baselines import FusedWithText

    torch.manual_seed(0)
    model = new_model("sasrec", tiny_data, split).eval()
    text = new_model("intent-text", tiny_data, split)
    starts, ends, rows = training_windows(split, 200)
    batch = batch_builder(tiny_data)(
        starts[:6],
        ends[:6],
        split.user_start[rows[:6]],
        supervise_all=False,
        intent_rate=1.0,
        rng=np.random.default_rng(0),
    )
    batch["intent_mask"][:3] = False  # three rows without words
    batch["intent"][:3] = 0.0
    has = text.last_intent(batch)[1]
    assert has.any() and (~has).any()
    plain = FusedWithText(model, text, 0.0).score(batch)
    assert torch.equal(
        plain.argsort(1, descending=True)[:, :10], model.score(batch).argsort(1, descending=True)[:, :10]
    )  # weight 0: the model's order
    fused = FusedWithText(model, text, 4.0).score(batch)
    assert torch.equal(fused[~has], plain[~has]) and not torch.allclose(fused[has], plain[has])
