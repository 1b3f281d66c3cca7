"""The rule-based baselines (seen-then-popular, intent text and phrase popularity, history text),
the equally informed SASRec, and the fusion of a model with text retrieval."""

from __future__ import annotations

import numpy as np
import torch

from models.data.batching import batch_builder, training_windows
from models.training.loop import new_model
from model_helpers import first_batch


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
