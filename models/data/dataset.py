"""Load a prepared dataset (see `prepare.py`) into numpy arrays, or read its events a part at a time.

Events are stored CSR-style by user: user u (1..U) owns events
``user_offsets[u - 1] : user_offsets[u]`` of `items` / `ratings` / `timestamps`, in time order.
Item-indexed arrays have N + 1 rows; row 0 is padding.

`interactions.parquet` is sorted by user, so a range of users is a range of its rows: `index_prepared`
finds every user's offsets by streaming two integer columns (memory in the users, not the events),
and `table_rows` reads one range, touching only the row groups it lies in. A reader of many events
(a Ray Train driver, the batch job) plans with the first and reads with the second.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.data.errors import DataFormatError
from models.data.prepare import FORMAT_VERSION, MANIFEST, TABLE_FILES
from models.files import sha256_file


@dataclass
class InteractionData:
    n_users: int  # U; user indices are 1..U
    n_items: int  # N; item indices are 1..N, 0 is padding
    user_offsets: np.ndarray  # (U+1,) int64; user u's events: [offsets[u-1], offsets[u])
    items: np.ndarray  # (E,) int64 item index per event, by user then time
    ratings: np.ndarray  # (E,) float32
    timestamps: np.ndarray  # (E,) int64 seconds since the epoch
    item_genres: np.ndarray  # (N+1, G) float32 multi-hot; row 0 zeros
    genre_names: list[str]  # (G,) column names of item_genres
    item_emb: np.ndarray  # (N+1, D) float32 text embeddings; row 0 zeros
    titles: list[str]  # (N+1,) titles[0] == "<pad>"
    item_source_ids: np.ndarray  # (N+1,) object: source item ids (str); [0] == "" (padding)
    user_source_ids: np.ndarray  # (U+1,) object: source user ids (str); [0] == "" (padding)
    intent_emb: np.ndarray  # (P, D) float32 embeddings of the intent phrases
    intent_phrases: list[str]  # (P,)
    item_intent_offsets: np.ndarray  # (N+2,) int64; item i's intents: ids[off[i]:off[i+1]]
    item_intent_ids: np.ndarray  # (M,) int64 intent indices
    manifest: dict = field(repr=False)
    path: Path = Path()

    @property
    def n_events(self) -> int:
        return len(self.items)

    def user_events(self, u: int) -> slice:
        """The slice of the event arrays that belongs to user u (1-based)."""
        return slice(int(self.user_offsets[u - 1]), int(self.user_offsets[u]))

    def item_intents(self, i: int) -> np.ndarray:
        return self.item_intent_ids[self.item_intent_offsets[i] : self.item_intent_offsets[i + 1]]


def _emb(table: pa.Table, fname: str) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise DataFormatError(fname, f"column 'embedding' has type {col.type}, expected a fixed-size list")
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), dim)


def _read(path: Path, fname: str, columns: list[str]) -> pa.Table:
    file = path / fname
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing from the prepared dataset")
    table = pq.read_table(file)
    absent = [c for c in columns if c not in table.column_names]
    if absent:
        raise DataFormatError(fname, f"missing columns {absent}")
    return table


def _rows(path: Path, fname: str, columns: list[str]) -> int:
    """A table's row count from its footer, its columns checked the same way; no row is read."""
    file = path / fname
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing from the prepared dataset")
    f = pq.ParquetFile(file)
    absent = [c for c in columns if c not in f.schema_arrow.names]
    if absent:
        raise DataFormatError(fname, f"missing columns {absent}")
    return f.metadata.num_rows


def read_manifest(path: Path, verify_checksums: bool) -> dict:
    """The manifest of the prepared folder `path`, of this format version (and its files' checksums checked)."""
    mfile = path / MANIFEST
    if not mfile.is_file():
        raise FileNotFoundError(f"{mfile}: not a prepared dataset (no {MANIFEST})")
    try:
        manifest = json.loads(mfile.read_text())
    except ValueError as e:
        raise DataFormatError(MANIFEST, f"not valid JSON: {e}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataFormatError(
            MANIFEST, f"format_version {version!r} is not supported (expected {FORMAT_VERSION}); prepare the data again"
        )
    if verify_checksums:
        for fname, info in manifest.get("files", {}).items():
            if not (path / fname).is_file():
                raise FileNotFoundError(f"{path / fname}: listed in {MANIFEST} but missing")
            if sha256_file(path / fname) != info.get("sha256"):
                raise DataFormatError(fname, f"checksum does not match {MANIFEST}")
    return manifest


def check_counts(manifest: dict, items_t: pa.Table, n_interactions: int, n_intents: int, users_t: pa.Table) -> None:
    """Items and users numbered 1..N and 1..U in order, and every table as long as the manifest says."""
    n_items, n_users = items_t.num_rows, users_t.num_rows
    if not np.array_equal(items_t.column("item_idx").to_numpy(), np.arange(1, n_items + 1)):
        raise DataFormatError(TABLE_FILES[0], "item_idx is not 1..N in order")
    if not np.array_equal(users_t.column("user_idx").to_numpy(), np.arange(1, n_users + 1)):
        raise DataFormatError(TABLE_FILES[3], "user_idx is not 1..U in order")
    counts = manifest.get("counts", {})
    for key, n, fname in (
        ("items", n_items, TABLE_FILES[0]),
        ("users", n_users, TABLE_FILES[3]),
        ("interactions", n_interactions, TABLE_FILES[1]),
        ("intents", n_intents, TABLE_FILES[2]),
    ):
        if counts.get(key) != n:
            raise DataFormatError(fname, f"has {n} {key}, {MANIFEST} says {counts.get(key)}")


def user_csr(inter_t: pa.Table, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """interactions.parquet -> (user_offsets (U+1,), items (E,)): events CSR by user."""
    user_idx = inter_t.column("user_idx").to_numpy().astype(np.int64)
    items = inter_t.column("item_idx").to_numpy().astype(np.int64)
    if user_idx.size and (np.any(np.diff(user_idx) < 0) or user_idx[0] < 1 or user_idx[-1] > n_users):
        raise DataFormatError(TABLE_FILES[1], "user_idx is not sorted within 1..U")
    if items.size and (items.min() < 1 or items.max() > n_items):
        raise DataFormatError(TABLE_FILES[1], "item_idx is outside 1..N")
    user_offsets = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(user_idx, minlength=n_users + 1)[1:], out=user_offsets[1:])
    return user_offsets, items


def genre_matrix(items_t: pa.Table, genre_names: list[str]) -> np.ndarray:
    """(N+1, G) float32 multi-hot genres; row 0 (padding) zeros."""
    genres = items_t.column("genres").combine_chunks()
    flat = pc.list_flatten(genres)
    rows = pc.list_parent_indices(genres).to_numpy() + 1
    cols = pc.index_in(flat, value_set=pa.array(genre_names, pa.string()))
    if cols.null_count:
        bad = flat.filter(pc.is_null(cols))[0].as_py()
        raise DataFormatError(TABLE_FILES[0], f"genre {bad!r} is not in the {MANIFEST} genres")
    item_genres = np.zeros((items_t.num_rows + 1, len(genre_names)), np.float32)
    item_genres[rows, cols.to_numpy(zero_copy_only=False)] = 1.0
    return item_genres


def intent_csr(items_t: pa.Table, n_intents: int) -> tuple[np.ndarray, np.ndarray]:
    """items.parquet's intent_ids -> (offsets (N+2,), ids (M,)): item i's intents are ids[off[i]:off[i+1]]."""
    intent_ids = items_t.column("intent_ids").combine_chunks()
    lengths = pc.list_value_length(intent_ids).fill_null(0).to_numpy()
    offsets = np.zeros(items_t.num_rows + 2, np.int64)
    np.cumsum(lengths, out=offsets[2:])
    ids = pc.list_flatten(intent_ids).to_numpy().astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_intents):
        raise DataFormatError(TABLE_FILES[0], "intent_ids refer to phrases not in intents.parquet")
    return offsets, ids


def source_ids(column: pa.ChunkedArray) -> np.ndarray:
    """A column of source ids (K,) -> (K+1,) object array of str, [0] == "" for the padding row."""
    return np.array(["", *column.cast(pa.string()).to_pylist()], dtype=object)


EVENT_COLUMNS = ["user_idx", "item_idx", "rating", "timestamp"]


def load_prepared(path: str | Path, verify_checksums: bool = False, events: bool = True) -> InteractionData:
    """Read a folder written by `prepare`; raise naming the file if anything is off.

    `events=False` reads everything but the events (their file's footer only): the item side and
    every user's source id, with no users' events (n_users 0), for a reader that adds its own users'
    events to it (`ray_app.train.data.shard_data`).
    """
    path = Path(path).expanduser()
    manifest = read_manifest(path, verify_checksums)
    items_t = _read(path, TABLE_FILES[0], ["item_idx", "source_id", "title", "genres", "embedding", "intent_ids"])
    inter_t = _read(path, TABLE_FILES[1], EVENT_COLUMNS) if events else None
    n_interactions = inter_t.num_rows if events else _rows(path, TABLE_FILES[1], EVENT_COLUMNS)
    intents_t = _read(path, TABLE_FILES[2], ["intent_idx", "phrase", "embedding"])
    users_t = _read(path, TABLE_FILES[3], ["user_idx", "source_user"])
    check_counts(manifest, items_t, n_interactions, intents_t.num_rows, users_t)
    n_items, n_users = items_t.num_rows, users_t.num_rows
    if events:
        user_offsets, items = user_csr(inter_t, n_users, n_items)
        ratings = inter_t.column("rating").to_numpy().astype(np.float32)
        timestamps = inter_t.column("timestamp").to_numpy().astype(np.int64)
    else:
        user_offsets, items = np.zeros(1, np.int64), np.zeros(0, np.int64)
        ratings, timestamps = np.zeros(0, np.float32), np.zeros(0, np.int64)
    genre_names = list(manifest.get("genres", []))

    emb = _emb(items_t, TABLE_FILES[0])
    item_emb = np.zeros((n_items + 1, emb.shape[1]), np.float32)  # row 0 = padding
    item_emb[1:] = emb
    intent_emb = _emb(intents_t, TABLE_FILES[2]) if intents_t.num_rows else np.zeros((0, emb.shape[1]), np.float32)
    item_intent_offsets, item_intent_ids = intent_csr(items_t, intents_t.num_rows)
    return InteractionData(
        n_users=n_users if events else 0,
        n_items=n_items,
        user_offsets=user_offsets,
        items=items,
        ratings=ratings,
        timestamps=timestamps,
        item_genres=genre_matrix(items_t, genre_names),
        genre_names=genre_names,
        item_emb=item_emb,
        titles=["<pad>"] + items_t.column("title").to_pylist(),
        item_source_ids=source_ids(items_t.column("source_id")),
        user_source_ids=source_ids(users_t.column("source_user")),
        intent_emb=intent_emb,
        intent_phrases=intents_t.column("phrase").to_pylist(),
        item_intent_offsets=item_intent_offsets,
        item_intent_ids=item_intent_ids,
        manifest=manifest,
        path=path,
    )


# ---- the events a part at a time ---------------------------------------------------------------


@dataclass
class PreparedIndex:
    """A prepared folder as a planner sees it: its counts and every user's event offsets, no events."""

    path: Path
    manifest: dict = field(repr=False)
    n_users: int  # U
    n_items: int  # N
    user_offsets: np.ndarray  # (U+1,) int64; user u's events are rows [offsets[u-1], offsets[u]) of the file

    @property
    def n_events(self) -> int:
        return int(self.user_offsets[-1])


def event_batches(path: Path, columns: list[str], batch_rows: int = 1 << 16) -> Iterator[tuple[int, pa.RecordBatch]]:
    """interactions.parquet's `columns`, `batch_rows` rows at a time, each with the position of its first row."""
    at = 0
    for batch in pq.ParquetFile(Path(path) / TABLE_FILES[1]).iter_batches(batch_size=batch_rows, columns=columns):
        yield at, batch
        at += batch.num_rows


def index_prepared(path: str | Path, batch_rows: int = 1 << 16) -> PreparedIndex:
    """The checks of `load_prepared` that need no item vectors (manifest, each table's columns and
    length, ids in order) and the users' event offsets, from the events streamed `batch_rows` at a
    time: user_idx sorted within 1..U, item_idx within 1..N. Memory: O(U + N + batch_rows)."""
    path = Path(path).expanduser()
    manifest = read_manifest(path, False)
    _rows(path, TABLE_FILES[0], ["item_idx", "source_id", "title", "genres", "embedding", "intent_ids"])
    items_t = pq.read_table(path / TABLE_FILES[0], columns=["item_idx"])  # not the embeddings
    n_interactions = _rows(path, TABLE_FILES[1], EVENT_COLUMNS)
    n_intents = _rows(path, TABLE_FILES[2], ["intent_idx", "phrase", "embedding"])
    users_t = _read(path, TABLE_FILES[3], ["user_idx", "source_user"]).select(["user_idx"])
    check_counts(manifest, items_t, n_interactions, n_intents, users_t)
    n_users, n_items = users_t.num_rows, items_t.num_rows
    counts = np.zeros(n_users + 1, np.int64)
    last = 0
    for _, batch in event_batches(path, ["user_idx", "item_idx"], batch_rows):
        users = batch.column(0).to_numpy().astype(np.int64)
        items = batch.column(1).to_numpy()
        if users.size and (users[0] < last or np.any(np.diff(users) < 0) or users[0] < 1 or users[-1] > n_users):
            raise DataFormatError(TABLE_FILES[1], "user_idx is not sorted within 1..U")
        if items.size and (items.min() < 1 or items.max() > n_items):
            raise DataFormatError(TABLE_FILES[1], "item_idx is outside 1..N")
        counts += np.bincount(users, minlength=n_users + 1)
        last = int(users[-1]) if users.size else last
    offsets = np.zeros(n_users + 1, np.int64)
    np.cumsum(counts[1:], out=offsets[1:])
    return PreparedIndex(path, manifest, n_users, n_items, offsets)


def table_rows(file: str | Path, lo: int, hi: int, columns: list[str]) -> pa.Table:
    """Rows [lo, hi) of a Parquet file's `columns`, reading only the row groups they lie in."""
    f = pq.ParquetFile(file)
    sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])  # (G+1,)
    groups = [g for g in range(len(sizes)) if starts[g] < hi and starts[g + 1] > lo]
    if not groups or hi <= lo:
        return f.schema_arrow.empty_table().select(columns)
    return f.read_row_groups(groups, columns=columns).slice(lo - int(starts[groups[0]]), hi - lo)
