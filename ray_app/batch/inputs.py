"""Where the batch job reads the users' events: a prepared dataset folder or an event log.

- **Prepared** (`interactions.parquet`, sorted by user and time): the driver finds every user's
  event offsets by streaming two integer columns (`models.data.dataset.index_prepared`) and cuts
  the users into ranges of about `events_per_task` events; each range is one row of a Ray Data
  dataset, and the model actor that takes it reads those rows itself (`table_rows`). The file's
  order is the users' order and the events' order, same-second ties included: the order the
  online store was loaded in.
- **Event log** (`events.csv` / `events.parquet`, docs/data-and-evaluation.md): Ray Data reads it
  in parallel, each block is checked and mapped onto the checkpoint's items (`normalize`, the
  format's own column checks), and `groupby("user_id").map_groups` packs each user's events,
  sorted by time (same-second events by item id, then rating). The packed users are materialized
  before the model actors start: a grouping has read everything before its first group anyway,
  and actors holding every CPU would leave none to its tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from models.data.dataset import EVENT_COLUMNS, PreparedIndex, index_prepared, table_rows
from models.data.errors import DataFormatError, DataSourceError
from models.data.events import EVENTS_FILE_SCHEMA, Origin, epoch_seconds, find_file, id_column, require_columns, stars
from models.data.prepare import MANIFEST, TABLE_FILES
from ray_app.batch.histories import Histories, pack, to_arrow

RANGE_COLUMNS = ("user_lo", "user_hi", "row_lo", "row_hi")


# ---- prepared --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedInput:
    """A prepared folder: users [user_lo, user_hi) (1-based) own rows [row_lo, row_hi) of its events."""

    path: Path
    index: PreparedIndex

    @property
    def n_users(self) -> int:
        return self.index.n_users

    def ranges(self, events_per_task: int) -> list[dict]:
        """Contiguous users of about `events_per_task` events each (a user is never split)."""
        offsets = self.index.user_offsets
        cuts = np.searchsorted(offsets, np.arange(events_per_task, offsets[-1], events_per_task), side="left")
        bounds = np.unique(np.r_[0, cuts, self.n_users])  # user counts at the cuts
        return [
            {"user_lo": int(a) + 1, "user_hi": int(b) + 1, "row_lo": int(offsets[a]), "row_hi": int(offsets[b])}
            for a, b in zip(bounds[:-1], bounds[1:])
        ]

    def item_ids(self) -> np.ndarray:
        """(N+1,) the dataset's source item ids; [0] = "" (padding)."""
        col = table_rows(self.path / TABLE_FILES[0], 0, self.index.n_items, ["source_id"]).column(0)
        return np.array(["", *col.cast(pa.string()).to_pylist()], dtype=object)

    def genre_names(self) -> list[str]:
        """(G,) the dataset's genres, as its manifest lists them."""
        return list(self.index.manifest.get("genres", []))

    def read(self, r: dict, max_len: int) -> Histories:
        """One range's users, packed: the events read from their rows, the user ids from the user table."""
        events = table_rows(self.path / TABLE_FILES[1], r["row_lo"], r["row_hi"], EVENT_COLUMNS)
        names = table_rows(self.path / TABLE_FILES[3], r["user_lo"] - 1, r["user_hi"] - 1, ["source_user"])
        users = events.column("user_idx").to_numpy().astype(np.int64)
        ids = np.asarray(names.column(0).cast(pa.string()).to_pylist(), dtype=object)
        return pack(
            users,
            ids[users - r["user_lo"]],
            events.column("item_idx").to_numpy(),  # the dataset's numbering is the checkpoint's (checked on load)
            events.column("rating").to_numpy(),
            events.column("timestamp").to_numpy(),
            max_len,
        )


# ---- event log -------------------------------------------------------------------------------


class BlockOrigin(Origin):
    """A file read by Ray Data in blocks: a block's row is not the file's, so errors name the file,
    the column and the value, not a line."""

    def error(self, reason: str, row: int | None = None, column: str | None = None) -> DataFormatError:
        return DataFormatError(self.file, reason, column=column)


def normalize(block: pa.Table, file: str, vocabulary: pa.Array) -> pa.Table:
    """A block of the event log, checked as preparation checks it -> user_id, item_id (source ids),
    item (model index; 0: an item the checkpoint does not know), rating (stars), timestamp (seconds)."""
    origin = BlockOrigin(file)
    require_columns(block, EVENTS_FILE_SCHEMA, origin)
    users = id_column(block, "user_id", origin)
    items = id_column(block, "item_id", origin)
    times = epoch_seconds(block, origin)
    ratings, _ = stars(block, origin)
    model = pc.fill_null(pc.add(pc.index_in(items, value_set=vocabulary), 1), 0).cast(pa.int64())
    return pa.table(
        {"user_id": users, "item_id": items, "item": model, "rating": pa.array(ratings), "timestamp": pa.array(times)}
    )


def pack_user(group: pa.Table, max_len: int) -> pa.Table:
    """One user's events (a group of `groupby("user_id")`) -> its packed row."""
    group = group.sort_by([("timestamp", "ascending"), ("item_id", "ascending"), ("rating", "ascending")])
    users = np.asarray(group.column("user_id").to_pylist(), dtype=object)
    h = pack(
        users,
        users,
        group.column("item").to_numpy(),
        group.column("rating").to_numpy(),
        group.column("timestamp").to_numpy(),
        max_len,
    )
    return to_arrow(h)


@dataclass(frozen=True)
class EventLogInput:
    """An event-log file (`events.csv` or `events.parquet`)."""

    file: Path

    def users(self, vocabulary: np.ndarray, max_len: int):
        """The packed users, one row each, materialized in the object store (see the module's note)."""
        import ray.data

        if self.file.stat().st_size == 0:
            raise DataFormatError(self.file.name, "file is empty", line=1)
        if self.file.suffix == ".csv":
            # As `models.data.events.read_csv`: the format's columns as text, ids keep their leading zeros.
            types = {name: pa.string() for name in EVENTS_FILE_SCHEMA.names}
            options = pacsv.ConvertOptions(column_types=types, strings_can_be_null=False)
            ds = ray.data.read_csv(str(self.file), convert_options=options)
        else:
            ds = ray.data.read_parquet(str(self.file))
        vocab = pa.array(list(vocabulary[1:]), pa.string())
        ds = ds.map_batches(normalize, batch_format="pyarrow", fn_kwargs={"file": self.file.name, "vocabulary": vocab})
        packed = ds.groupby("user_id").map_groups(pack_user, batch_format="pyarrow", fn_kwargs={"max_len": max_len})
        return packed.materialize()


def open_input(path: Path) -> PreparedInput | EventLogInput:
    """`--data`: a prepared folder (it has manifest.json), an event-log folder, or an events file."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix not in (".csv", ".parquet"):
            raise DataSourceError(f"--data {path}: an event log is events.csv or events.parquet")
        return EventLogInput(path.resolve())
    if not path.is_dir():
        raise DataSourceError(f"--data {path}: no such file or folder")
    if (path / MANIFEST).is_file():
        return PreparedInput(path.resolve(), index_prepared(path))
    try:
        return EventLogInput(find_file(path, "events").resolve())
    except DataSourceError:
        raise DataSourceError(
            f"--data {path}: neither a prepared dataset ({MANIFEST}) nor an event log (events.csv or events.parquet)"
        ) from None
