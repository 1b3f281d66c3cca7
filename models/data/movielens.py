"""MovieLens readers: CSV, `::` and ml-100k formats, from a folder or a zip (`download.py` fetches one).

Every reader returns a `RawData`. Ratings go through pyarrow's CSV parser and vectorised checks;
only when those find a problem is the file scanned line by line, so that the error names the
exact line and reason. Nothing is ever skipped silently.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from models.data.errors import DataFormatError
from models.data.release import FOLDER_ALIASES, FORMATS, Source
from models.data.raw import ITEMS_SCHEMA, RATINGS_SCHEMA, TAG_EVENTS_SCHEMA, RawData, rank_tags

RATING_RANGE = (0.5, 5.0)
_NO_GENRES = {"(no genres listed)", ""}


# ---- field parsing --------------------------------------------------------------------------


def _int(value: str, field: str, disp: str, line: int) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataFormatError(disp, f"{field} {value!r} is not an integer", line) from None


def _rating(value: str, field: str, disp: str, line: int) -> float:
    try:
        r = float(value.strip())
    except ValueError:
        raise DataFormatError(disp, f"{field} {value!r} is not a number", line) from None
    if not RATING_RANGE[0] <= r <= RATING_RANGE[1]:
        raise DataFormatError(
            disp, f"{field} {value.strip()} is out of range {RATING_RANGE[0]:g}..{RATING_RANGE[1]:g}", line
        )
    return r


def _lines(text: str, delimiter: str, quoted: bool):
    """(1-based line number, fields) per non-blank line."""
    if quoted:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        for row in reader:
            if row and any(f.strip() for f in row):
                yield reader.line_num, row
    else:
        # Split on '\n' only: str.splitlines() also breaks on characters such as '\x85',
        # which latin-1 text may hold.
        for n, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if line.strip():
                yield n, line.split(delimiter)


def _check_header(src: Source, name: str, rows, expected: list[str]) -> None:
    first = next(rows, None)
    if first is None:
        raise DataFormatError(src.display(name), "file is empty", line=1)
    line, fields = first
    if [f.strip() for f in fields] != expected:
        raise DataFormatError(
            src.display(name), f"expected the header {','.join(expected)!r}, got {','.join(fields)!r}", line
        )


# ---- ratings --------------------------------------------------------------------------------

_RATING_LAYOUT = {  # kind -> (file, delimiter, header or None)
    "csv": ("ratings.csv", ",", ["userId", "movieId", "rating", "timestamp"]),
    "dat": ("ratings.dat", "::", None),
    "100k": ("u.data", "\t", None),
}
_RATING_FIELDS = {
    "csv": ["userId", "movieId", "rating", "timestamp"],
    "dat": ["UserID", "MovieID", "Rating", "Timestamp"],
    "100k": ["user id", "item id", "rating", "timestamp"],
}


def _scan_ratings(src: Source, kind: str, item_ids: set[int], movies_file: str) -> None:
    """The slow, exact check: raise on the first bad line (the fast path found a problem)."""
    name, delim, header = _RATING_LAYOUT[kind]
    names = _RATING_FIELDS[kind]
    disp = src.display(name)
    rows = _lines(src.read_text(name), delim, quoted=kind == "csv")
    if header:
        _check_header(src, name, rows, header)
    for line, f in rows:
        if len(f) != 4:
            raise DataFormatError(disp, f"expected 4 fields, got {len(f)}", line)
        _int(f[0], names[0], disp, line)
        item = _int(f[1], names[1], disp, line)
        _rating(f[2], names[2], disp, line)
        ts = _int(f[3], names[3], disp, line)
        if ts < 0:
            raise DataFormatError(disp, f"{names[3]} {ts} is negative", line)
        if item not in item_ids:
            raise DataFormatError(disp, f"{names[1]} {item} is not in {movies_file}", line)


def _read_ratings(src: Source, kind: str, movie_ids: list[int], movies_file: str) -> pa.Table:
    """The ratings, checked, with the ids as the decimal strings of RATINGS_SCHEMA."""
    name, delim, header = _RATING_LAYOUT[kind]
    disp = src.display(name)
    cols = ["user", "item", "rating", "timestamp"]
    types = {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
    item_ids = pa.array(movie_ids, pa.int64())

    def slow(reason: str):
        _scan_ratings(src, kind, set(movie_ids), movies_file)
        raise DataFormatError(disp, reason)  # only if the exact scan disagrees with pyarrow

    if kind == "csv":
        with src.open(name) as f:
            first = f.readline().decode("utf-8-sig", "replace").strip()
        if not first:
            raise DataFormatError(disp, "file is empty", line=1)
        if first.split(",") != header:
            raise DataFormatError(disp, f"expected the header {','.join(header)!r}, got {first!r}", 1)
        data = src.local_path(name) or src.open(name)
        parse = pacsv.ParseOptions(delimiter=",")
    else:
        raw = src.read_bytes(name)
        if not raw.strip():
            raise DataFormatError(disp, "file is empty", line=1)
        # Numeric fields only, so '::' -> tab is exact; anything odd fails and is rescanned.
        data = pa.BufferReader(raw.replace(b"::", b"\t") if delim == "::" else raw)
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False)
    try:
        table = pacsv.read_csv(
            data,
            read_options=pacsv.ReadOptions(column_names=cols, skip_rows=1 if header else 0),
            parse_options=parse,
            convert_options=pacsv.ConvertOptions(column_types=types),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        slow(f"cannot be parsed: {e}")
    finally:
        if not isinstance(data, str):
            data.close()
    if table.num_rows == 0:
        raise DataFormatError(disp, "no ratings in the file", line=2 if header else 1)
    if any(table.column(c).null_count for c in cols):
        slow("a field is empty")
    r = table.column("rating")
    in_range = pc.and_(pc.greater_equal(r, RATING_RANGE[0]), pc.less_equal(r, RATING_RANGE[1]))
    if not pc.all(in_range).as_py():
        slow("a rating is out of range")
    if pc.any(pc.less(table.column("timestamp"), 0)).as_py():
        slow("a timestamp is negative")
    if not pc.all(pc.is_in(table.column("item"), value_set=item_ids)).as_py():
        slow(f"an item id is not in {movies_file}")
    return table.cast(RATINGS_SCHEMA)


# ---- movies ---------------------------------------------------------------------------------


def _items_table(ids: list[int], titles: list[str], genres: list[list[str]], tags: dict[str, list[str]]) -> pa.Table:
    keys = [str(i) for i in ids]
    return pa.table(
        {
            "source_id": keys,
            "title": titles,
            "genres": genres,
            "tags": [tags.get(k, []) for k in keys],
            "text": [None] * len(keys),
        },
        schema=ITEMS_SCHEMA,
    )


def _check_unique(seen: dict[int, int], mid: int, field: str, disp: str, line: int) -> None:
    if mid in seen:
        raise DataFormatError(disp, f"{field} {mid} appears twice (first on line {seen[mid]})", line)
    seen[mid] = line


def _read_movies_csv(src: Source):
    name, disp = "movies.csv", src.display("movies.csv")
    rows = _lines(src.read_text(name), ",", quoted=True)
    _check_header(src, name, rows, ["movieId", "title", "genres"])
    seen: dict[int, int] = {}
    ids, titles, genres = [], [], []
    for line, f in rows:
        if len(f) != 3:
            raise DataFormatError(disp, f"expected 3 fields, got {len(f)}", line)
        mid = _int(f[0], "movieId", disp, line)
        _check_unique(seen, mid, "movieId", disp, line)
        ids.append(mid)
        titles.append(f[1].strip())
        g = f[2].strip()
        genres.append([] if g in _NO_GENRES else [x.strip() for x in g.split("|") if x.strip()])
    if not ids:
        raise DataFormatError(disp, "no movies in the file", line=2)
    return ids, titles, genres


def _read_movies_dat(src: Source):
    name, disp = "movies.dat", src.display("movies.dat")
    seen: dict[int, int] = {}
    ids, titles, genres = [], [], []
    for line, f in _lines(src.read_text(name), "::", quoted=False):
        if len(f) != 3:
            raise DataFormatError(disp, f"expected 3 fields, got {len(f)}", line)
        mid = _int(f[0], "MovieID", disp, line)
        _check_unique(seen, mid, "MovieID", disp, line)
        ids.append(mid)
        titles.append(f[1].strip())
        g = f[2].strip()
        genres.append([] if g in _NO_GENRES else [x.strip() for x in g.split("|") if x.strip()])
    return ids, titles, genres


def _read_movies_100k(src: Source):
    gdisp = src.display("u.genre")
    genre_names: list[str] = []
    for line, f in _lines(src.read_text("u.genre"), "|", quoted=False):
        if len(f) != 2:
            raise DataFormatError(gdisp, f"expected 2 fields, got {len(f)}", line)
        if _int(f[1], "genre index", gdisp, line) != len(genre_names):
            raise DataFormatError(gdisp, f"genre index {f[1]!r} is out of order (expected {len(genre_names)})", line)
        genre_names.append(f[0].strip())
    disp = src.display("u.item")
    n_fields = 5 + len(genre_names)
    seen: dict[int, int] = {}
    ids, titles, genres = [], [], []
    for line, f in _lines(src.read_text("u.item"), "|", quoted=False):
        if len(f) != n_fields:
            raise DataFormatError(disp, f"expected {n_fields} fields, got {len(f)}", line)
        mid = _int(f[0], "movie id", disp, line)
        _check_unique(seen, mid, "movie id", disp, line)
        flags = [x.strip() for x in f[5:]]
        bad = next((x for x in flags if x not in ("0", "1")), None)
        if bad is not None:
            raise DataFormatError(disp, f"genre flag {bad!r} is not 0 or 1", line)
        ids.append(mid)
        titles.append(f[1].strip())
        # 'unknown' is ml-100k's way of saying "no genre", like "(no genres listed)".
        genres.append([g for g, x in zip(genre_names, flags) if x == "1" and g != "unknown"])
    return ids, titles, genres


# ---- tags -----------------------------------------------------------------------------------


def _read_tags(src: Source, kind: str, item_ids: set[int], movies_file: str) -> pa.Table | None:
    """Every tag application (item, normalised tag, time) in file order (TAG_EVENTS_SCHEMA); None without tags."""
    name = "tags.csv" if kind == "csv" else "tags.dat"
    if kind == "100k" or not src.has(name):
        return None
    disp = src.display(name)
    if kind == "csv":
        rows = _lines(src.read_text(name), ",", quoted=True)
        _check_header(src, name, rows, ["userId", "movieId", "tag", "timestamp"])
        names = ["userId", "movieId", "tag", "timestamp"]
    else:
        rows = _lines(src.read_text(name), "::", quoted=False)
        names = ["UserID", "MovieID", "Tag", "Timestamp"]
    out_items, out_tags, out_times = [], [], []
    for line, f in rows:
        if kind == "dat" and len(f) > 4:  # a tag that itself contains '::'
            f = [f[0], f[1], "::".join(f[2:-1]), f[-1]]
        if len(f) != 4:
            raise DataFormatError(disp, f"expected 4 fields, got {len(f)}", line)
        _int(f[0], names[0], disp, line)
        item = _int(f[1], names[1], disp, line)
        when = _int(f[3], names[3], disp, line)
        if item not in item_ids:
            raise DataFormatError(disp, f"{names[1]} {item} is not in {movies_file}", line)
        tag = " ".join(f[2].split()).lower()
        if tag:
            out_items.append(str(item))
            out_tags.append(tag)
            out_times.append(when)
    return pa.table({"item": out_items, "tag": out_tags, "timestamp": out_times}, schema=TAG_EVENTS_SCHEMA)


# ---- public ---------------------------------------------------------------------------------

_MOVIE_READERS: dict[str, Callable] = {"csv": _read_movies_csv, "dat": _read_movies_dat, "100k": _read_movies_100k}


def read_movielens(path: str | Path, name: str | None = None) -> RawData:
    """Read a MovieLens release from a folder or a .zip archive; the format is auto-detected.

    `name` defaults to the archive's or folder's name (e.g. "ml-latest-small").
    Raises `DataFormatError` naming file, line and reason on any malformed input.
    """
    path = Path(path).expanduser()
    src = Source(path)
    try:
        movies_file = FORMATS[src.kind][1]
        ids, titles, genres = _MOVIE_READERS[src.kind](src)
        if not ids:
            raise DataFormatError(src.display(movies_file), "no movies in the file", line=1)
        item_set = set(ids)
        tag_events = _read_tags(src, src.kind, item_set, movies_file)
        tags = (
            {}
            if tag_events is None
            else rank_tags(tag_events.column("item").to_pylist(), tag_events.column("tag").to_pylist())
        )
        items = _items_table(ids, titles, genres, tags)
        ratings = _read_ratings(src, src.kind, ids, movies_file)
    finally:
        if src.zip is not None:
            src.zip.close()
    if name is None:
        stem = path.stem if src.zip is not None else Path(src.folder).name
        name = FOLDER_ALIASES.get(stem.lower(), stem)
    return RawData(name=name, items=items, ratings=ratings, source=str(path.resolve()), tag_events=tag_events)
