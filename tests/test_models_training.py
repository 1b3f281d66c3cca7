"""Training every model: a tiny-data overfit, the sampled and the masked softmax, fit and evaluate,
the learning-rate schedule and the weight average of the shared loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data.batching import batch_builder, training_windows
from models.training.loop import TrainConfig, fit, new_model
from models.evaluation.evaluate import evaluate
from model_helpers import first_batch


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


@pytest.mark.parametrize("pool, tau, chunk", [("max", 1.0, 1 << 20), ("max", 0.3, 300), ("mixture", 1.0, 300)])
def test_the_chunked_pooled_loss_matches_autograd(monkeypatch, pool, tau, chunk):
    """The pooled softmax loss forms its gradients itself, chunk by chunk: the same loss and the
    same gradients as the plain autograd formula, masks included, whatever the chunk size."""
    import models.nn.losses as L

    monkeypatch.setattr(L, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    P, K, D, N = 37, 3, 8, 50
    U, V = torch.randn(P, K, D, requires_grad=True), torch.randn(N + 1, D, requires_grad=True)
    gate_logits = torch.randn(P, K, requires_grad=True)
    t = torch.randint(1, N + 1, (P,))
    rows, items = torch.sort(torch.randint(0, P, (60,)))[0], torch.randint(1, N + 1, (60,))
    keep = items != t[rows]
    seen = (rows[keep], items[keep])

    def reference():
        logits = torch.einsum("pkd,nd->pkn", U, V)
        la = torch.log_softmax(gate_logits, 1)
        mask = torch.zeros(P, N + 1, dtype=torch.bool)
        mask[:, 0] = True
        mask[seen] = True
        if pool == "max":
            s = tau * torch.logsumexp((logits + la[:, :, None]) / tau, 1)
            return torch.nn.functional.cross_entropy(s.masked_fill(mask, -torch.inf), t)
        logp = torch.log_softmax(logits.masked_fill(mask[:, None, :], -1e9), -1)
        return torch.nn.functional.nll_loss(torch.logsumexp(la[:, :, None] + logp, 1), t)

    got = L.pooled_softmax_ce(U, V, t, torch.log_softmax(gate_logits, 1), seen, pool, tau)
    want = reference()
    g_got = torch.autograd.grad(got, [U, V, gate_logits])
    g_want = torch.autograd.grad(want, [U, V, gate_logits])
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


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


def test_max_steps_caps_the_batches_of_an_epoch(tiny_data, split):
    from models.training.loop import run_epoch

    class Counting(torch.optim.AdamW):
        steps = 0

        def step(self, closure=None):
            Counting.steps += 1
            return super().step(closure)

    m = new_model("decomposer", tiny_data, split)
    starts, ends, rows = training_windows(split, 200)
    windows = (starts, ends, split.user_start[rows])
    for max_steps, expected in ((None, -(-len(starts) // 4)), (2, 2)):
        Counting.steps = 0
        cfg = TrainConfig(batch_size=4, max_steps=max_steps)
        run_epoch(m, Counting(m.parameters()), batch_builder(tiny_data), windows, cfg, np.random.default_rng(0))
        assert Counting.steps == expected


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


def test_large_catalogues_default_to_the_sampled_softmax():
    from models.training.loop import SAMPLED_SOFTMAX_ABOVE, default_loss

    assert default_loss("decomposer", SAMPLED_SOFTMAX_ABOVE + 1) == "sampled"
    assert default_loss("sasrec", SAMPLED_SOFTMAX_ABOVE + 1) == "sampled"
    assert default_loss("decomposer", SAMPLED_SOFTMAX_ABOVE) is None  # ml-latest-small's 9,724 stay full
    assert default_loss("popular", 10**6) is None  # a rule has no softmax
