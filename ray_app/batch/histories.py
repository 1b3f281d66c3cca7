"""Users' recent events, packed: what a model actor of the batch job scores, from either input.

A user is scored from the events the online path rebuilds a state from when none is stored
(`Decomposer._advance_users`): the last `max_len` events of the log and the one before them, whose
time gives the first one its gap; the items to exclude are every item of the log, as the store's
seen set holds. `pack` cuts those out of events sorted by user and time; a Ray Data block carries
them as list columns (`to_arrow` / `from_arrow`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.data.batching import flat_ranges


@dataclass
class Histories:
    """B users: user b's window is rows offsets[b]:offsets[b+1] of the event arrays, its seen items
    seen[seen_offsets[b]:seen_offsets[b+1]]."""

    user_ids: np.ndarray  # (B,) object: source user ids (str)
    n_events: np.ndarray  # (B,) int64 events in each user's whole log
    offsets: np.ndarray  # (B+1,) int64
    items: np.ndarray  # (W,) int64 model item index; 0: an item the checkpoint does not know
    ratings: np.ndarray  # (W,) float32 stars
    timestamps: np.ndarray  # (W,) int64 seconds since the epoch
    seen_offsets: np.ndarray  # (B+1,) int64
    seen: np.ndarray  # (S,) int64 distinct model indices of the items in each user's log, ascending

    def __len__(self) -> int:
        return len(self.user_ids)

    def window_starts(self, max_len: int) -> np.ndarray:
        """(B,) the row of each user's first scored event: the window's second row when it holds the
        event before the last `max_len` (kept for its gap), else its first."""
        return self.offsets[:-1] + (self.n_events > max_len)


def pack(
    users: np.ndarray, names: np.ndarray, items: np.ndarray, ratings: np.ndarray, times: np.ndarray, max_len: int
) -> Histories:
    """Events (E,) grouped by user and in time order within each (`users` any comparable key,
    `names` the user's source id) -> each user's last max_len + 1 events and seen set."""
    n = len(users)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Histories(
            np.zeros(0, object),
            empty,
            np.zeros(1, np.int64),
            empty,
            np.zeros(0, np.float32),
            empty,
            np.zeros(1, np.int64),
            empty,
        )
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])  # (B,) each user's first row
    ends = np.r_[starts[1:], n]  # (B,)
    first = np.maximum(ends - (max_len + 1), starts)  # (B,)
    _, rows = flat_ranges(first, ends - first)
    owner = np.repeat(np.arange(len(starts)), ends - starts)  # (E,)
    width = int(items.max()) + 1
    key = np.unique(owner * width + items.astype(np.int64))  # (S,) distinct (user, item), sorted
    seen_owner = key // width
    return Histories(
        np.asarray(names, dtype=object)[starts],
        (ends - starts).astype(np.int64),
        np.concatenate([[0], np.cumsum(ends - first)]).astype(np.int64),
        items[rows].astype(np.int64),
        ratings[rows].astype(np.float32),
        times[rows].astype(np.int64),
        np.concatenate([[0], np.cumsum(np.bincount(seen_owner, minlength=len(starts)))]).astype(np.int64),
        (key % width).astype(np.int64),
    )


def _lists(offsets: np.ndarray, values: np.ndarray, kind: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, kind))


def to_arrow(h: Histories) -> pa.Table:
    """One row per user, the events and the seen set as list columns."""
    return pa.table(
        {
            "user_id": pa.array(h.user_ids, pa.string()),
            "n_events": pa.array(h.n_events, pa.int64()),
            "items": _lists(h.offsets, h.items, pa.int64()),
            "ratings": _lists(h.offsets, h.ratings, pa.float32()),
            "timestamps": _lists(h.offsets, h.timestamps, pa.int64()),
            "seen": _lists(h.seen_offsets, h.seen, pa.int64()),
        }
    )


def from_arrow(t: pa.Table) -> Histories:
    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
        col = t.column(name)
        sizes = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.concatenate([[0], np.cumsum(sizes)]), pc.list_flatten(col).to_numpy(zero_copy_only=False)

    offsets, items = flat("items")
    _, ratings = flat("ratings")
    _, times = flat("timestamps")
    seen_offsets, seen = flat("seen")
    return Histories(
        np.asarray(t.column("user_id").to_pylist(), dtype=object),
        t.column("n_events").to_numpy().astype(np.int64),
        offsets.astype(np.int64),
        items.astype(np.int64),
        ratings.astype(np.float32),
        times.astype(np.int64),
        seen_offsets.astype(np.int64),
        seen.astype(np.int64),
    )
