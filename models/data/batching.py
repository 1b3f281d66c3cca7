"""Splits and padded batches over the CSR event arrays of `InteractionData`.

A *sample* is a slice of one user's events `[start, end)` used as input; its targets are the
events one step later, `[start + 1, end + 1)`. Training samples supervise every position;
evaluation samples only the last one (target = event `end`). Everything is index arithmetic
in numpy: no per-row Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.data.features import hour_bucket, log_gap_hours, moment_features, rating_bucket


def flat_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ranges [starts[i], starts[i] + counts[i]) -> (owner row (M,), index (M,))."""
    rows = np.repeat(np.arange(len(counts)), counts)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.repeat(starts, counts) + within


@dataclass
class Split:
    """Per-user held-out positions, as absolute indices into the event arrays."""

    n_test: int  # test targets per user (1 = leave-one-out)
    user_start: np.ndarray  # (U,) first event of each user
    valid_pos: np.ndarray  # (U,) first validation target; training events are [user_start, valid_pos)
    test_pos: np.ndarray  # (M,) test targets, each predicted from everything before it
    test_user: np.ndarray  # (M,) row of the user owning each test target
    valid_targets: np.ndarray  # (V,) validation targets, each predicted from everything before it
    valid_user: np.ndarray  # (V,) row of the user owning each validation target
    n_valid: int = 1  # validation targets per user (at most)


def make_split(user_offsets: np.ndarray, n_test: int = 1, n_valid: int = 1) -> Split:
    """The last `n_test` events of each user are test targets (at most L − 2) and the `n_valid`
    before them validation targets (at most half of what is left, and at least one), so a search
    is judged on many targets per user while short users keep events to train on."""
    if n_test < 1 or n_valid < 1:
        raise ValueError(f"n_test and n_valid must be >= 1, got {n_test} and {n_valid}")
    start, end = user_offsets[:-1], user_offsets[1:]
    length = end - start
    if (length < 3).any():
        raise ValueError("every user needs at least 3 events (prepare drops shorter users)")
    k = np.minimum(n_test, length - 2)  # (U,)
    v = np.clip(np.minimum(n_valid, (length - k) // 2), 1, None)  # (U,)
    valid_pos = end - k - v
    test_user, test_pos = flat_ranges(end - k, k)  # (M,), (M,)
    valid_user, valid_targets = flat_ranges(valid_pos, v)  # (V,), (V,)
    return Split(
        n_test,
        start.astype(np.int64),
        valid_pos.astype(np.int64),
        test_pos.astype(np.int64),
        test_user.astype(np.int64),
        valid_targets.astype(np.int64),
        valid_user.astype(np.int64),
        n_valid,
    )


def training_windows(split: Split, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each user's training events into windows of `max_len` predictions, newest first.

    Returns (starts, ends, user_rows); a window's inputs are [start, end), targets [start+1, end+1).
    """
    n_pred = split.valid_pos - split.user_start - 1  # (U,) supervised positions per user
    n_win = np.maximum(0, -(-n_pred // max_len))  # ceil division
    rows, w = flat_ranges(np.zeros_like(n_win), n_win)
    ends = split.valid_pos[rows] - 1 - w * max_len
    starts = np.maximum(split.user_start[rows], ends - max_len)
    return starts, ends, rows


def eval_samples(split: Split, targets: np.ndarray, users: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs for predicting event `targets[i]`: the last `max_len` events before it."""
    return np.maximum(split.user_start[users], targets - max_len), targets


# How the words of an evaluated request relate to its target (DESIGN §5):
# - oracle: one of the target's own phrases (its genre words or tags): built from the answer;
# - noisy: one of the target's phrases mixed with an unrelated one (the mean of both vectors);
# - wrong: a phrase the target does not carry (the model must not fall far below no words);
# - history: the phrase most frequent among the user's last HISTORY_ITEMS items before the
#   target (what a UI could pre-fill; it uses nothing of the target).
INTENT_REGIMES = ("oracle", "noisy", "wrong", "history")
HISTORY_ITEMS = 5


@dataclass
class IntentTable:
    """Intent phrases of each item (CSR) and their text embeddings."""

    offsets: np.ndarray  # (N + 2,) item i's phrases are ids[offsets[i]:offsets[i + 1]]
    ids: np.ndarray  # (P_total,)
    emb: np.ndarray  # (P, 384)

    def carries(self, items: np.ndarray, phrase: np.ndarray) -> np.ndarray:
        """(M,) whether item items[j] carries phrase phrase[j]."""
        lo = self.offsets[items]
        rows, idx = flat_ranges(lo, self.offsets[items + 1] - lo)
        out = np.zeros(len(items), dtype=bool)
        np.logical_or.at(out, rows, self.ids[idx] == phrase[rows])
        return out

    def unrelated(self, items: np.ndarray, rng: np.random.Generator, tries: int = 20) -> np.ndarray:
        """(M,) one random phrase id per item that the item does not carry."""
        out = rng.integers(0, len(self.emb), size=len(items))
        for _ in range(tries):
            bad = self.carries(items, out)
            if not bad.any():
                return out
            out[bad] = rng.integers(0, len(self.emb), size=int(bad.sum()))
        raise ValueError("intents: could not draw a phrase the item does not carry (too few phrases)")

    def most_frequent(self, items: np.ndarray, owner: np.ndarray, n_rows: int) -> np.ndarray:
        """(n_rows,) the phrase most frequent among the items owned by each row (-1: none).

        items (M,) and owner (M,) row of each item, oldest first; ties go to the newest item's phrase.
        """
        lo = self.offsets[items]
        k, idx = flat_ranges(lo, self.offsets[items + 1] - lo)
        if not len(idx):
            return np.full(n_rows, -1, dtype=np.int64)
        row, phrase, when = owner[k], self.ids[idx].astype(np.int64), k
        key = row * len(self.emb) + phrase
        uniq, inv = np.unique(key, return_inverse=True)
        count = np.bincount(inv)
        latest = np.zeros(len(uniq), dtype=np.int64)
        np.maximum.at(latest, inv, when)
        u_row = uniq // len(self.emb)
        order = np.lexsort((latest, count, u_row))  # best of each row last
        last_of_row = np.r_[u_row[order][1:] != u_row[order][:-1], True]
        out = np.full(n_rows, -1, dtype=np.int64)
        best = order[last_of_row]
        out[u_row[best]] = uniq[best] % len(self.emb)
        return out

    def sample(self, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One random phrase id per item (-1 where the item has none)."""
        lo, hi = self.offsets[items], self.offsets[items + 1]
        count = hi - lo
        pick = lo + np.floor(rng.random(items.shape) * np.maximum(count, 1)).astype(np.int64)
        return np.where(count > 0, self.ids[np.minimum(pick, len(self.ids) - 1)], -1)


class BatchBuilder:
    """Turns (starts, ends) sample arrays into padded tensors (right padding, 0 = pad)."""

    def __init__(
        self, items: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray, intents: IntentTable | None = None
    ):
        self.items = items.astype(np.int64)
        self.rating_bucket = rating_bucket(ratings)
        self.ts = timestamps.astype(np.int64)
        self.intents = intents

    def __call__(
        self,
        starts: np.ndarray,
        ends: np.ndarray,
        user_starts: np.ndarray,
        supervise_all: bool = True,
        intent_rate: float = 0.0,
        rng: np.random.Generator | None = None,
        intent: str = "oracle",
        wrong_rate: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """`intent` (one of INTENT_REGIMES) picks the words of the supervised positions that get any;
        `wrong_rate` (training) gives that share of them a phrase the target does not carry instead."""
        lengths = ends - starts  # (B,)
        T = int(lengths.max())
        pos = np.arange(T)[None, :]
        mask = pos < lengths[:, None]  # (B, T)
        idx = np.where(mask, starts[:, None] + pos, starts[:, None])  # (B, T) safe gather index
        nxt = idx + 1  # target of each position
        ts, ts_next = self.ts[idx], self.ts[nxt]
        gap = np.where(idx > user_starts[:, None], ts - self.ts[np.maximum(idx - 1, 0)], 0)
        if supervise_all:
            sup = mask
        else:
            sup = pos == (lengths[:, None] - 1)
        batch = {
            "items": torch.from_numpy(np.where(mask, self.items[idx], 0)),
            "ratings": torch.from_numpy(np.where(mask, self.rating_bucket[idx], 0)),
            "event_feats": torch.from_numpy(moment_features(ts, gap) * mask[..., None]),
            "ctx_feats": torch.from_numpy(moment_features(ts_next, ts_next - ts) * mask[..., None]),
            "lengths": torch.from_numpy(lengths.astype(np.int64)),
            "targets": torch.from_numpy(np.where(sup, self.items[nxt], 0)),
            "next_rating": torch.from_numpy(np.where(sup, self.rating_bucket[nxt], 0)),
            "next_log_gap": torch.from_numpy(log_gap_hours(ts_next - ts)),
            "next_hour": torch.from_numpy(hour_bucket(ts_next)),
            "next_time": torch.from_numpy(np.where(mask, ts_next, 0)),  # (B, T) seconds: each position's moment
        }
        if intent_rate > 0 and self.intents is not None:
            rng = rng or np.random.default_rng(0)
            phrase = self.intents.sample(self.items[nxt], rng)  # (B, T)
            use = sup & (phrase >= 0) & (rng.random(phrase.shape) < intent_rate)
            vec = self.intents.emb[np.maximum(phrase, 0)] * use[..., None]  # (B, T, 384)
            if intent != "oracle":
                use, vec = self._regime(intent, use, vec, phrase, idx, mask, nxt, rng)
            elif wrong_rate > 0:  # words can be wrong: a model trained on oracle words alone trusts them all
                b, t = np.nonzero(use)
                pick = rng.random(len(b)) < wrong_rate
                b, t = b[pick], t[pick]
                vec[b, t] = self.intents.emb[self.intents.unrelated(self.items[nxt[b, t]], rng)]
            batch["intent"] = torch.from_numpy(vec.astype(np.float32))
            batch["intent_mask"] = torch.from_numpy(use)
        return batch

    def _regime(self, intent, use, vec, phrase, idx, mask, nxt, rng):
        """The words of the used positions under a non-oracle regime -> (use, vec)."""
        if intent not in INTENT_REGIMES:
            raise ValueError(f"intent must be one of {INTENT_REGIMES}, got {intent!r}")
        b, t = np.nonzero(use)  # (M,) used positions
        emb = self.intents.emb
        if intent in ("noisy", "wrong"):
            other = emb[self.intents.unrelated(self.items[nxt[b, t]], rng)]  # (M, 384)
            words = other if intent == "wrong" else emb[phrase[b, t]] + other
        else:  # history: inputs only
            back = np.arange(HISTORY_ITEMS)[None, :]
            pos = t[:, None] - back  # (M, H) positions ≤ t
            ok = (pos >= 0) & mask[b[:, None], np.maximum(pos, 0)]
            rows = np.broadcast_to(np.arange(len(b))[:, None], pos.shape)[ok][::-1]
            items = self.items[idx[b[:, None], np.maximum(pos, 0)]][ok][::-1]  # oldest first per row
            order = np.argsort(rows, kind="stable")
            best = self.intents.most_frequent(items[order], rows[order], len(b))
            keep = best >= 0
            use = use.copy()
            use[b[~keep], t[~keep]] = False
            words = emb[np.maximum(best, 0)] * keep[:, None]
        words = words / np.maximum(np.linalg.norm(words, axis=1, keepdims=True), 1e-12)
        vec = np.zeros_like(vec)
        vec[b, t] = words
        return use, vec


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of sample indices with similar lengths (less padding), in random order."""
    jitter = rng.random(len(lengths))
    order = np.lexsort((jitter, lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def intent_table(data) -> IntentTable:
    return IntentTable(data.item_intent_offsets, data.item_intent_ids, data.intent_emb)


def batch_builder(data) -> BatchBuilder:
    return BatchBuilder(data.items, data.ratings, data.timestamps, intent_table(data))
