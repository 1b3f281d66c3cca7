"""The event-log format, the documented way in for your own data: a folder with `events.parquet` or
`events.csv` and `items.parquet` or `items.csv` → `RawData` (docs/data-and-evaluation.md).

The two schemas below are the format, written once: a non-nullable field is a required column, the
others are optional. Every check is vectorised; an error names the file, the line (CSV, the header
being line 1) or row (Parquet, from 1), the column and the fix. Nothing is skipped silently: a
malformed value, a missing column or an event whose item has no row in the items file is refused.
MovieTweetings is read through the same checks (`movietweetings.py`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models.data.errors import DataFormatError, DataSourceError
from models.data.features import IMPLICIT_RATING, stars_from_weight
from models.data.raw import ITEMS_SCHEMA, RATINGS_SCHEMA, RawData

EVENTS_FILE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),  # text; integers are read as their decimal text
        pa.field("item_id", pa.string(), nullable=False),  # text or integers, as user_id; a row in the items file
        # Epoch seconds (integers, or decimals, floored), ISO 8601 text ("2013-02-28T12:00:00+01:00"; no
        # zone: UTC) or a Parquet timestamp or date.
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("rating", pa.float64()),  # stars, 0.5..5; empty (or no column): an implicit event
        pa.field("weight", pa.float64()),  # instead of rating: an implicit event's strength, 0..1
    ]
)
ITEMS_FILE_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),  # one row per item
        pa.field("title", pa.string()),
        pa.field("text", pa.string()),  # what the encoder reads; empty: "Title. Genres: a, b" from the others
        pa.field("categories", pa.list_(pa.string())),  # genres, which the topic dimension predicts; CSV: "a|b"
    ]
)
CATEGORY_SEPARATOR = "|"
MAX_TIMESTAMP = 100_000_000_000  # year 5138, the API's bound: a larger value is milliseconds or a mistake
FORMAT_DOC = "docs/data-and-evaluation.md"
NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"  # what a numeric field in a CSV file may hold


# ---- where a row came from -------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """A table's file, for messages, and how its rows are named: by line (text files) or by row (Parquet)."""

    file: str
    line_of: Callable[[int], int] | None = None  # 0-based row -> 1-based line; None: Parquet rows

    def error(self, reason: str, row: int | None = None, column: str | None = None) -> DataFormatError:
        if row is None:
            return DataFormatError(self.file, reason, column=column)
        if self.line_of is None:
            return DataFormatError(self.file, reason, row=row + 1, column=column)
        return DataFormatError(self.file, reason, self.line_of(row), column=column)


def csv_line_of(path: Path) -> Callable[[int], int]:
    """A CSV file's 0-based data row -> its 1-based line (pyarrow skips empty lines): read only for a message."""

    def line_of(row: int) -> int:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            next(reader, None)  # the header
            seen = -1
            for fields in reader:
                if fields:
                    seen += 1
                    if seen == row:
                        return reader.line_num
        return row + 2

    return line_of


def first(mask) -> int | None:
    """The first row where a boolean array (nulls count as false) is true, or None."""
    at = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if at < 0 else at


# ---- reading the files -----------------------------------------------------------------------


def find_file(folder: Path, stem: str) -> Path:
    """`folder/stem.parquet` or `folder/stem.csv`, exactly one of them."""
    found = [p for p in (folder / f"{stem}.parquet", folder / f"{stem}.csv") if p.is_file()]
    if not found:
        raise DataSourceError(
            f"{folder}: no {stem}.parquet or {stem}.csv; an event log is a folder with events and items files "
            f"(the format: {FORMAT_DOC})"
        )
    if len(found) > 1:
        raise DataSourceError(f"{folder}: both {stem}.parquet and {stem}.csv; keep the one to read")
    return found[0]


def _bad_csv_line(path: Path) -> tuple[int, str] | None:
    """The first line whose field count differs from the header's, and the problem (the slow, exact scan)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for fields in reader:
            if fields and len(fields) != len(header):
                return reader.line_num, f"expected {len(header)} fields (the header's), got {len(fields)}"
    return None


def read_csv(path: Path, schema: pa.Schema) -> tuple[pa.Table, Origin]:
    """A CSV file with the schema's columns read as text (ids keep their leading zeros; values are
    checked with their line), any other column as pyarrow infers it."""
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in schema.names}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            raise DataFormatError(path.name, "file is empty", line=1) from None
        bad = _bad_csv_line(path)
        if bad is not None:
            raise DataFormatError(path.name, bad[1], bad[0]) from None
        raise DataFormatError(path.name, f"cannot be read as CSV ({str(e).splitlines()[0]})") from None
    return table, Origin(path.name, csv_line_of(path))


def read_parquet(path: Path) -> tuple[pa.Table, Origin]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataFormatError(path.name, f"cannot be read as Parquet ({str(e).splitlines()[0]})") from None
    return table, Origin(path.name)


def read_file(path: Path, schema: pa.Schema) -> tuple[pa.Table, Origin]:
    return read_csv(path, schema) if path.suffix == ".csv" else read_parquet(path)


# ---- column checks ---------------------------------------------------------------------------


def require_columns(table: pa.Table, schema: pa.Schema, origin: Origin) -> None:
    missing = [f.name for f in schema if not f.nullable and f.name not in table.column_names]
    if missing:
        raise origin.error(
            f"no {', '.join(map(repr, missing))} column (it has {', '.join(table.column_names) or 'none'}; "
            f"the format: {FORMAT_DOC})"
        )


def text_column(table: pa.Table, name: str, origin: Origin, integers: bool = False) -> pa.ChunkedArray:
    """A text column as string (dictionary-encoded text decoded; with `integers`, integers as their
    decimal text); another type is refused."""
    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_large_string(col.type) or pa.types.is_null(col.type) or (integers and pa.types.is_integer(col.type)):
        col = col.cast(pa.string())
    if not pa.types.is_string(col.type):
        raise origin.error(f"has type {col.type}, expected text{' or integers' if integers else ''}", column=name)
    return col


def id_column(table: pa.Table, name: str, origin: Origin) -> pa.ChunkedArray:
    """Ids as text, spaces trimmed: integers become their decimal text; a missing or empty id is refused."""
    col = pc.utf8_trim_whitespace(text_column(table, name, origin, integers=True))
    row = first(pc.or_kleene(pc.is_null(col), pc.equal(col, "")))
    if row is not None:
        raise origin.error("empty id", row, name)
    return col


def number_column(table: pa.Table, name: str, origin: Origin) -> np.ndarray:
    """(R,) float64 of a numeric column (or a text one, as CSV gives), NaN where it is empty."""
    col = table.column(name)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type):
        values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
        nan = np.isnan(values) & ~col.is_null().to_numpy(zero_copy_only=False)
        if nan.any():
            raise origin.error("NaN is not a value; leave the field empty for none", int(np.argmax(nan)), name)
        return values
    if pa.types.is_null(col.type):
        return np.full(len(col), np.nan)
    text = pc.utf8_trim_whitespace(text_column(table, name, origin))
    empty = pc.fill_null(pc.equal(text, ""), True)
    row = first(pc.and_(pc.invert(empty), pc.invert(pc.match_substring_regex(text, NUMBER))))
    if row is not None:
        raise origin.error(f"{text[row].as_py()!r} is not a number", row, name)
    return pc.if_else(empty, pa.scalar(None, pa.string()), text).cast(pa.float64()).to_numpy(zero_copy_only=False)


def epoch_seconds(table: pa.Table, origin: Origin) -> np.ndarray:
    """(R,) int64 seconds since the epoch (UTC) from the timestamp column, whatever form it has."""
    name = "timestamp"
    col = table.column(name)
    if col.null_count:
        raise origin.error("empty timestamp", first(pc.is_null(col)), name)
    kind = col.type
    if pa.types.is_timestamp(kind):
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[kind.unit]
        secs = np.floor_divide(col.cast(pa.int64()).to_numpy(), per_second)  # instants: the zone changes nothing
    elif pa.types.is_date(kind):
        secs = col.cast(pa.date32()).cast(pa.int32()).to_numpy().astype(np.int64) * 86_400
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        values = number_column(table, name, origin)
        secs = np.floor(values).astype(np.int64)
    else:
        secs = text_times(text_column(table, name, origin), origin)
    row = first(pa.array(secs < 0))
    if row is not None:
        raise origin.error(f"{secs[row]} is before 1970", row, name)
    row = first(pa.array(secs >= MAX_TIMESTAMP))
    if row is not None:
        raise origin.error(f"{secs[row]} is after the year 5000: milliseconds? give seconds", row, name)
    return secs


def text_times(text: pa.ChunkedArray, origin: Origin) -> np.ndarray:
    """Epoch seconds or ISO 8601 times, as text -> (R,) int64 seconds; a value that is neither is refused."""
    import pandas as pd

    text = pc.utf8_trim_whitespace(text)
    numeric = pc.match_substring_regex(text, NUMBER).to_numpy(zero_copy_only=False)
    secs = np.zeros(len(text), np.int64)
    if numeric.any():
        secs[numeric] = np.floor(text.filter(pa.array(numeric)).cast(pa.float64()).to_numpy())
    other = np.flatnonzero(~numeric)
    if other.size:
        values = pd.Series(text.take(pa.array(other)).to_numpy(zero_copy_only=False))
        times = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
        bad = times.isna().to_numpy()
        if bad.any():
            row = int(other[np.argmax(bad)])
            raise origin.error(f"{text[row].as_py()!r} is neither epoch seconds nor an ISO 8601 time", row, "timestamp")
        secs[other] = ((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    return secs


def stars(table: pa.Table, origin: Origin) -> tuple[np.ndarray, dict]:
    """(R,) float32 ratings on the model's 0.5..5 star scale, and how they were read (for the manifest).

    A rating is taken as it is; a weight w in 0..1 becomes 0.5 + 4.5·w stars (rating buckets 1..10);
    an event with neither, an implicit one, reads as IMPLICIT_RATING, as the API reads one.
    """
    has = [c for c in ("rating", "weight") if c in table.column_names]
    if len(has) == 2:
        raise origin.error("has both a rating and a weight column; keep one (a weight is an implicit event's strength)")
    if not has:
        return np.full(table.num_rows, IMPLICIT_RATING, np.float32), {"column": None, "implicit": table.num_rows}
    name = has[0]
    values = number_column(table, name, origin)
    given = ~np.isnan(values)
    lo, hi, fix = (
        (0.5, 5.0, "stars are 0.5..5: divide a 0–10 rating by 2, or give a strength as a weight column")
        if name == "rating"
        else (0.0, 1.0, "a weight is 0..1: divide by the largest weight")
    )
    outside = given & ((values < lo) | (values > hi))
    if outside.any():
        row = int(np.argmax(outside))
        raise origin.error(f"{values[row]:g} is outside {lo:g}..{hi:g}; {fix}", row, name)
    mapped = values if name == "rating" else stars_from_weight(values)
    out = np.where(given, mapped, IMPLICIT_RATING).astype(np.float32)
    return out, {"column": name, "implicit": int((~given).sum())}


def categories(table: pa.Table, origin: Origin) -> list[list[str]]:
    """Each item's categories: a list column, or text split at CATEGORY_SEPARATOR; blanks dropped."""
    if "categories" not in table.column_names:
        return [[] for _ in range(table.num_rows)]
    col = table.column("categories")
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lists = col.cast(pa.list_(pa.string())).to_pylist()
    else:
        text = text_column(table, "categories", origin).to_pylist()
        lists = [None if t is None else t.split(CATEGORY_SEPARATOR) for t in text]
    return [[c.strip() for c in cs if c and c.strip()] if cs else [] for cs in lists]


# ---- the two files together ------------------------------------------------------------------


def item_rows(items: pa.Table, origin: Origin) -> pa.Table:
    """The items file -> ITEMS_SCHEMA rows (no tags: an event log has none)."""
    require_columns(items, ITEMS_FILE_SCHEMA, origin)
    ids = id_column(items, "item_id", origin)
    distinct = pc.unique(ids)
    if len(distinct) < len(ids):
        codes = pc.index_in(ids, value_set=distinct).to_numpy()
        _, first_at = np.unique(codes, return_index=True)
        again = np.ones(len(codes), bool)
        again[first_at] = False
        row = int(np.argmax(again))
        earlier = int(first_at[codes[row]])
        where = f"line {origin.line_of(earlier)}" if origin.line_of else f"row {earlier + 1}"
        raise origin.error(f"item {ids[row].as_py()!r} appears twice (first at {where})", row, "item_id")
    n = items.num_rows
    title = text_column(items, "title", origin).to_pylist() if "title" in items.column_names else [""] * n
    text = text_column(items, "text", origin).to_pylist() if "text" in items.column_names else [None] * n
    return pa.table(
        {
            "source_id": ids,
            "title": [t or "" for t in title],
            "genres": categories(items, origin),
            "tags": [[] for _ in range(n)],
            "text": [t if t and t.strip() else None for t in text],
        },
        schema=ITEMS_SCHEMA,
    )


def event_log(
    events: pa.Table,
    items: pa.Table,
    events_origin: Origin,
    items_origin: Origin,
    name: str,
    source: str,
    details: dict | None = None,
) -> RawData:
    """The events and items tables of the format (however they were read) -> RawData, every value checked."""
    require_columns(events, EVENTS_FILE_SCHEMA, events_origin)
    catalogue = item_rows(items, items_origin)
    users = id_column(events, "user_id", events_origin)
    item = id_column(events, "item_id", events_origin)
    times = epoch_seconds(events, events_origin)
    ratings, rating_record = stars(events, events_origin)
    known = pc.is_in(item, value_set=catalogue.column("source_id"))
    row = first(pc.invert(known))
    if row is not None:
        absent = len(pc.unique(item.filter(pc.invert(known))))
        raise events_origin.error(
            f"item {item[row].as_py()!r} has no row in {items_origin.file} ({absent} item(s) have none); "
            "add a row for each (item_id alone will do)",
            row,
            "item_id",
        )
    context = [c for c in events.column_names if c not in EVENTS_FILE_SCHEMA.names]
    ratings_table = pa.table(
        {"user": users, "item": item, "rating": pa.array(ratings), "timestamp": pa.array(times)}, schema=RATINGS_SCHEMA
    )
    record = {
        "events": events_origin.file,
        "items": items_origin.file,
        "ratings": rating_record,
        "context_columns": context,  # carried in the files, not read by the model
        **(details or {}),
    }
    return RawData(name=name, items=catalogue, ratings=ratings_table, source=source, details=record)


def read_event_log(folder: str | Path, name: str = "events") -> RawData:
    """Read an event-log folder (`events.*` and `items.*`); raise DataFormatError naming file, line or
    row, and column on any malformed input, DataSourceError when a file is missing."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataSourceError(f"{folder}: not a folder; an event log is a folder with events and items files")
    events_path, items_path = find_file(folder, "events"), find_file(folder, "items")
    events, events_origin = read_file(events_path, EVENTS_FILE_SCHEMA)
    items, items_origin = read_file(items_path, ITEMS_FILE_SCHEMA)
    if events.num_rows == 0:
        raise events_origin.error("no events in the file")
    return event_log(events, items, events_origin, items_origin, name=name, source=str(folder.resolve()))
