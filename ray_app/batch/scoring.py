"""A model actor of the batch job: users' packed events -> states -> the Combiner's ranking -> rows.

A state is built as the online Decomposer builds one that is not stored: one `advance` over the
last `max_len` events from no state (users of equal window length together), the first event's gap
from the event before it, then `interest_state`. The ranking is `ray_app.serve.ranking.rank`, the
function the Combiner runs (exact scores over the catalogue), at the job's moment, without words.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from models.data.batching import BatchBuilder
from ray_app.batch.histories import Histories, from_arrow
from ray_app.batch.inputs import PreparedInput
from ray_app.serve.catalogue import extend
from ray_app.serve.ranking import rank
from ray_app.serve.records import RankJob, UserState
from ray_app.serve.served_model import ServedModel
from ray_app.store.base import AddedItem

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),  # the source user id
        pa.field("rank", pa.int32()),  # 1 = best
        pa.field("item_id", pa.string()),  # the source item id, as the dataset writes it
        pa.field("score", pa.float32()),  # the model's score, as /recommend returns it
        pa.field("model_version", pa.string()),  # the checkpoint's digest, as /recommend returns it
    ]
)


@dataclass(frozen=True)
class ScoreSettings:
    """What every model actor is built with."""

    checkpoint: str  # the resolved model.pt
    k: int  # items per user
    exclude_seen: bool  # leave out the items of each user's log
    at: float  # the moment recommended for (epoch seconds)
    users_per_call: int  # users ranked in one call of the model
    threads: int  # torch threads of an actor
    added: tuple[AddedItem, ...] = ()  # the items added while serving, in the store's order
    genre_names: tuple[str, ...] = ()  # the dataset's genres (the added items' genre rows)


STATE_BATCH = 256  # users advanced together (of one window length): bounds the LSTM's activations


@torch.no_grad()
def user_states(served: ServedModel, h: Histories, with_seen: bool) -> list[UserState]:
    """Each user's interest state from its window, as the Decomposer rebuilds one."""
    m, dev = served.model, served.device
    starts, ends = h.window_starts(m.cfg.max_len), h.offsets[1:]  # (B,), (B,)
    lengths = ends - starts
    # One trailing row, so that the builder's look-ahead (the next event's moment) stays inside.
    builder = BatchBuilder(np.append(h.items, 0), np.append(h.ratings, 1.0), np.append(h.timestamps, 0))
    z = np.zeros((len(h), m.state_dim), np.float32)
    for T in np.unique(lengths):
        same = np.flatnonzero(lengths == T)
        for lo in range(0, len(same), STATE_BATCH):
            rows = same[lo : lo + STATE_BATCH]
            batch = builder(starts[rows], ends[rows], h.offsets[:-1][rows], supervise_all=False)  # (B_T, T) each
            parts = m.advance(None, *(batch[key].to(dev) for key in ("items", "ratings", "event_feats")))
            z[rows] = m.interest_state(parts).cpu().numpy()  # (B_T, S)
    last = h.timestamps[ends - 1]
    return [
        UserState(
            served.version,
            str(served.path),
            z[b],
            int(h.n_events[b]),
            float(last[b]),
            h.seen[h.seen_offsets[b] : h.seen_offsets[b + 1]] if with_seen else None,
        )
        for b in range(len(h))
    ]


def recommend(
    served: ServedModel, users: np.ndarray, states: list[UserState], s: ScoreSettings, item_ids: np.ndarray
) -> pa.Table:
    """Users' top-k from their states, as OUTPUT_SCHEMA rows, best first."""
    rankings = rank(served, [RankJob(state, None, s.k, s.exclude_seen, False, s.at) for state in states])
    counts = [len(r.items) for r in rankings]
    index = np.array([i for r in rankings for i, _ in r.items], np.int64)
    return pa.table(
        {
            "user_id": pa.array(np.repeat(users, counts), pa.string()),
            "rank": pa.array(np.concatenate([np.arange(1, c + 1) for c in counts] or [[]]), pa.int32()),
            "item_id": pa.array(item_ids[index], pa.string()),
            "score": pa.array([v for r in rankings for _, v in r.items], pa.float32()),
            "model_version": pa.array([served.version] * len(index), pa.string()),
        },
        schema=OUTPUT_SCHEMA,
    )


class Scorer:
    """The callable class of the actor pool: the checkpoint loaded once per actor (with the items
    added while serving, when the job read any), then batches of users (prepared input: ranges of
    users it reads itself) ranked `users_per_call` at a time."""

    def __init__(self, settings: ScoreSettings, prepared: PreparedInput | None = None):
        torch.set_num_threads(settings.threads)
        self.settings, self.prepared = settings, prepared
        # A prepared dataset's items are the catalogue, as the Combiner's data_dir: another vocabulary is refused.
        catalogue = prepared.item_ids() if prepared is not None else None
        self.served = ServedModel.load(settings.checkpoint, catalogue)
        extend(self.served, list(settings.added), list(settings.genre_names))
        self.item_ids = np.asarray(self.served.item_source_ids, dtype=object)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        if self.prepared is None:
            yield from self._score(from_arrow(batch))
            return
        for r in batch.to_pylist():
            yield from self._score(self.prepared.read(r, self.served.model.cfg.max_len))

    def _score(self, h: Histories) -> Iterator[pa.Table]:
        states = user_states(self.served, h, self.settings.exclude_seen)
        step = self.settings.users_per_call
        for lo in range(0, len(h), step):
            part = slice(lo, lo + step)
            yield recommend(self.served, h.user_ids[part], states[part], self.settings, self.item_ids)
