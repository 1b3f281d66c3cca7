"""Training data on a Ray cluster: the prepared Parquet → one Ray Data shard of users per worker.

The driver never holds the events: it checks the prepared folder and finds every user's event
offsets by streaming two integer columns of `interactions.parquet` (`models.data.dataset.index_prepared`),
builds the split from those offsets, counts the items' training events in a second stream, and cuts
the users into contiguous ranges with about the same number of training windows each, so DDP
workers take about the same number of steps. Ray Data reads `interactions.parquet` (sorted by
user) in file order, in its own tasks, and splits it exactly at those user boundaries: every user
lands on exactly one worker, which Train's default split (`streaming_split(equal=True)`, which may
drop rows) does not promise. A worker reads the item tables itself (`load_prepared(events=False)`)
and turns its shard into an `InteractionData` holding only its users' events.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.data.batching import Split, training_windows
from models.data import DATASETS, DataError, InteractionData, prepare_source
from models.data.dataset import EVENT_COLUMNS, PreparedIndex, event_batches, index_prepared
from models.nn.items import NEVER, first_seen_times


class SetupError(ValueError):
    """Bad input found before training starts (dataset, storage, resources, settings)."""


def resolve_dataset(
    dataset: str,
    data_dir: Path | None = None,
    prepared_dir: Path | None = None,
    progress: bool = True,
    min_user_events: int | None = None,
) -> Path:
    """A dataset name (`models.data.DATASETS`) → prepared into `prepared_dir`; anything else is a prepared folder."""
    if dataset in DATASETS:
        out = prepared_dir or Path("runs/data") / dataset
        try:
            return prepare_source(
                dataset, out, data_dir=data_dir, progress=progress, min_user_events=min_user_events
            ).resolve()
        except (OSError, ValueError, DataError) as e:  # a DataError's message is one line with its fix
            raise SetupError(str(e) if str(e).startswith("--") else f"--dataset {dataset}: {e}") from e
    path = Path(dataset).expanduser()
    if not path.exists():
        raise SetupError(f"--dataset {dataset}: no such folder, and not a known dataset name ({', '.join(DATASETS)})")
    if not path.is_dir():
        raise SetupError(f"--dataset {dataset}: not a folder (expected a prepared dataset folder)")
    return path.resolve()


def load_checked(path: Path) -> PreparedIndex:
    """`index_prepared` (the folder checked, the users' event offsets; no events held), with its errors
    (missing file, malformed table or manifest) as SetupError."""
    try:
        return index_prepared(path)
    except (OSError, ValueError) as e:
        raise SetupError(f"--dataset {path}: not a usable prepared dataset: {e}") from e
    except Exception as e:  # pyarrow raises its own types for a corrupt Parquet file
        raise SetupError(f"--dataset {path}: unreadable prepared dataset ({type(e).__name__}: {e})") from e


def item_counts(index: PreparedIndex, split: Split, batch_rows: int = 1 << 16) -> np.ndarray:
    """(N+1,) training events of each item (`models.training.loop.training_counts`), the item
    column streamed `batch_rows` at a time: a row is a training event when it lies before its
    user's first validation target."""
    counts = np.zeros(index.n_items + 1, np.int64)
    ends = index.user_offsets[1:]  # (U,) each user's end row
    for at, batch in event_batches(index.path, ["item_idx"], batch_rows):
        rows = np.arange(at, at + batch.num_rows)
        user = np.searchsorted(ends, rows, side="right")  # (R,) 0-based user of each row
        train = rows < split.valid_pos[user]
        counts += np.bincount(batch.column(0).to_numpy()[train], minlength=index.n_items + 1)
    return counts


def item_first_seen(index: PreparedIndex, split: Split, batch_rows: int = 1 << 16) -> np.ndarray:
    """(N+1,) time of each item's first training event (`models.training.loop.training_first_seen`),
    streamed as `item_counts` streams: what the new-item bias reads (models/nn/items.py)."""
    first = first_seen_times(np.zeros(0, np.int64), np.zeros(0, np.int64), index.n_items)
    ends = index.user_offsets[1:]  # (U,) each user's end row
    for at, batch in event_batches(index.path, ["item_idx", "timestamp"], batch_rows):
        rows = np.arange(at, at + batch.num_rows)
        user = np.searchsorted(ends, rows, side="right")  # (R,) 0-based user of each row
        train = rows < split.valid_pos[user]
        items, times = batch.column(0).to_numpy()[train], batch.column(1).to_numpy()[train]
        first = np.minimum(first, first_seen_times(items, times, index.n_items))
    first[0] = -int(NEVER)
    return first


@dataclass
class UserRanges:
    """Shard r holds users [bounds[r] + 1, bounds[r + 1] + 1) (1-based), events [events[r], events[r + 1])."""

    bounds: np.ndarray  # (R+1,) user counts at the cuts, 0 … U
    events: np.ndarray  # (R+1,) event offsets at the cuts, 0 … E
    windows: np.ndarray  # (R,) training windows per shard

    def users(self, r: int) -> tuple[int, int]:
        return int(self.bounds[r]) + 1, int(self.bounds[r + 1]) + 1


def user_ranges(user_offsets: np.ndarray, split: Split, max_len: int, n_shards: int) -> UserRanges:
    """Contiguous user ranges with about the same number of training windows each."""
    n_users = len(user_offsets) - 1
    if n_users < n_shards:
        raise SetupError(f"{n_users} users cannot be shared among {n_shards} workers")
    _, _, rows = training_windows(split, max_len)
    per_user = np.bincount(rows, minlength=n_users)  # (U,) windows of each user
    cum = np.cumsum(per_user)
    bounds = [0]
    for r in range(1, n_shards):  # at least one user per shard
        cut = int(np.searchsorted(cum, cum[-1] * r / n_shards)) + 1
        bounds.append(min(max(cut, bounds[-1] + 1), n_users - (n_shards - r)))
    bounds = np.array(bounds + [n_users], np.int64)
    windows = np.add.reduceat(per_user, bounds[:-1])
    return UserRanges(bounds, user_offsets[bounds].astype(np.int64), windows.astype(np.int64))


def read_shards(prepared: Path, ranges: UserRanges) -> list:
    """Ray Data reads interactions.parquet in file order and splits it at the user boundaries."""
    import ray.data

    ds = ray.data.read_parquet(str(prepared / "interactions.parquet")).select_columns(EVENT_COLUMNS)
    # Cuts are row positions: the file order (sorted by user, then time) must survive the read.
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    if len(ranges.windows) == 1:
        return [ds.materialize()]
    return ds.split_at_indices([int(e) for e in ranges.events[1:-1]])


def shard_data(batches, items: InteractionData, users: tuple[int, int]) -> InteractionData:
    """Numpy batches of one shard (users [lo, hi), in file order) and the dataset without its events
    (`load_prepared(events=False)`) → an `InteractionData` of those users."""
    lo, hi = users
    cols = {c: np.concatenate([b[c] for b in batches]) if batches else np.zeros(0) for c in EVENT_COLUMNS}
    user = cols["user_idx"].astype(np.int64)
    if user.size == 0 or np.any(np.diff(user) < 0) or user[0] != lo or user[-1] != hi - 1:
        raise RuntimeError(f"shard for users [{lo}, {hi}) arrived out of order or incomplete")
    counts = np.bincount(user - lo, minlength=hi - lo)  # (U_r,) events per user
    offsets = np.zeros(hi - lo + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return dataclasses.replace(
        items,
        n_users=hi - lo,
        user_offsets=offsets,
        # Arrays fetched from the object store are read-only; torch wants writable ones.
        item_emb=np.array(items.item_emb),
        item_genres=np.array(items.item_genres),
        items=cols["item_idx"].astype(np.int64),
        ratings=cols["rating"].astype(np.float32),
        timestamps=cols["timestamp"].astype(np.int64),
        user_source_ids=np.concatenate([np.array([""], object), items.user_source_ids[lo:hi]]),
    )
