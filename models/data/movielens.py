"""MovieLens readers (CSV, `::` and ml-100k formats, folder or zip) and a verified download.

Every reader returns a `RawData`. Ratings go through pyarrow's CSV parser and vectorised checks;
only when those find a problem is the file scanned line by line, so that the error names the
exact line and reason. Nothing is ever skipped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from models.data.errors import DataFormatError
from models.files import atomic_path, sha256_file
from models.data.raw import ITEMS_SCHEMA, RATINGS_SCHEMA, TAG_EVENTS_SCHEMA, RawData, rank_tags

MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
KNOWN_DATASETS = ("ml-latest-small", "ml-100k", "ml-1m", "ml-10m", "ml-25m", "ml-32m")
KNOWN_SHA256 = {
    "ml-1m": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"  # 5,917,549 bytes
}
RATING_RANGE = (0.5, 5.0)
# Folder names inside the official archives that differ from the dataset name.
_FOLDER_ALIASES = {"ml-10m100k": "ml-10m"}
# The files each format needs, in detection order.
_FORMATS = {
    "csv": ("ratings.csv", "movies.csv"),  # ml-latest(-small), ml-20m, ml-25m, ml-32m
    "dat": ("ratings.dat", "movies.dat"),  # ml-1m, ml-10m
    "100k": ("u.data", "u.item", "u.genre"),  # ml-100k
}
_NO_GENRES = {"(no genres listed)", ""}


class DownloadError(RuntimeError):
    """A download failed or its checksum did not match."""


# ---- where the files are ------------------------------------------------------------------


class _Source:
    """The files of one release, in a folder or inside a zip archive, by lower-cased basename."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir():
            dirs = [path] + sorted(p for p in path.iterdir() if p.is_dir())
            groups = {d: {p.name.lower(): p for p in d.iterdir() if p.is_file()} for d in dirs}
            self.kind, self.folder, files = self._detect(groups)
            self._files = {k: str(v) for k, v in files.items()}
        elif path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise DataFormatError(path.name, "not a zip archive and not a folder") from None
            groups: dict[str, dict[str, str]] = {}
            for member in self.zip.namelist():
                if member.endswith("/") or "__MACOSX" in member:
                    continue
                folder, _, base = member.rpartition("/")
                groups.setdefault(folder, {})[base.lower()] = member
            self.kind, folder, self._files = self._detect(groups)
            self.folder = Path(folder) if folder else Path(path.stem)
        else:
            raise FileNotFoundError(f"{path}: no such folder or archive")

    def _detect(self, groups):
        # Shallowest folder first, so that a folder holding several releases is not guessed at.
        for folder, files in sorted(groups.items(), key=lambda kv: len(str(kv[0]).split("/"))):
            for kind, needed in _FORMATS.items():
                if all(n in files for n in needed):
                    return kind, folder, files
        for files in groups.values():
            for needed in _FORMATS.values():
                if needed[0] in files:
                    missing = ", ".join(n for n in needed if n not in files)
                    raise DataFormatError(self.path.name, f"has {needed[0]} but no {missing}")
        raise DataFormatError(
            self.path.name,
            "no MovieLens files found (expected ratings.csv + "
            "movies.csv, ratings.dat + movies.dat, or u.data + u.item + u.genre)",
        )

    def has(self, name: str) -> bool:
        return name in self._files

    def display(self, name: str) -> str:
        if self.zip is not None:
            return f"{self.path.name}:{self._files[name]}"
        return name

    def local_path(self, name: str) -> str | None:
        return None if self.zip is not None else self._files[name]

    def open(self, name: str):
        if self.zip is not None:
            return self.zip.open(self._files[name])
        return open(self._files[name], "rb")

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        """UTF-8, falling back to latin-1 (ml-1m and ml-100k are latin-1)."""
        data = self.read_bytes(name)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        if not text.strip():
            raise DataFormatError(self.display(name), "file is empty", line=1)
        return text


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


def _check_header(src: _Source, name: str, rows, expected: list[str]) -> None:
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


def _scan_ratings(src: _Source, kind: str, item_ids: set[int], movies_file: str) -> None:
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


def _read_ratings(src: _Source, kind: str, items: pa.Table, movies_file: str) -> pa.Table:
    name, delim, header = _RATING_LAYOUT[kind]
    disp = src.display(name)
    cols = ["user", "item", "rating", "timestamp"]
    types = {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
    item_ids = items.column("source_id")

    def slow(reason: str):
        _scan_ratings(src, kind, set(item_ids.to_pylist()), movies_file)
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


def _items_table(ids: list[int], titles: list[str], genres: list[list[str]], tags: dict[int, list[str]]) -> pa.Table:
    return pa.table(
        {"source_id": ids, "title": titles, "genres": genres, "tags": [tags.get(i, []) for i in ids]},
        schema=ITEMS_SCHEMA,
    )


def _check_unique(seen: dict[int, int], mid: int, field: str, disp: str, line: int) -> None:
    if mid in seen:
        raise DataFormatError(disp, f"{field} {mid} appears twice (first on line {seen[mid]})", line)
    seen[mid] = line


def _read_movies_csv(src: _Source):
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


def _read_movies_dat(src: _Source):
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


def _read_movies_100k(src: _Source):
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


def _read_tags(src: _Source, kind: str, item_ids: set[int], movies_file: str) -> pa.Table | None:
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
            out_items.append(item)
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
    src = _Source(path)
    try:
        movies_file = _FORMATS[src.kind][1]
        ids, titles, genres = _MOVIE_READERS[src.kind](src)
        if not ids:
            raise DataFormatError(src.display(movies_file), "no movies in the file", line=1)
        item_set = set(ids)
        tag_events = _read_tags(src, src.kind, item_set, movies_file)
        tags = (
            {}
            if tag_events is None
            else rank_tags(tag_events.column("item").to_numpy(), tag_events.column("tag").to_pylist())
        )
        items = _items_table(ids, titles, genres, tags)
        ratings = _read_ratings(src, src.kind, items, movies_file)
    finally:
        if src.zip is not None:
            src.zip.close()
    if name is None:
        stem = path.stem if src.zip is not None else Path(src.folder).name
        name = _FOLDER_ALIASES.get(stem.lower(), stem)
    return RawData(name=name, items=items, ratings=ratings, source=str(path.resolve()), tag_events=tag_events)


def download(
    name: str, dest_dir: Path, url: str | None = None, sha256: str | None = None, progress: bool = True
) -> Path:
    """Download `{name}.zip` into dest_dir (streamed to a temp file, renamed when verified).

    The SHA-256 is checked when given or known; on a mismatch nothing is left behind. An
    archive already in place that passes the check is returned without downloading.
    """
    import httpx

    if url is None:
        if name not in KNOWN_DATASETS:
            raise ValueError(f"unknown MovieLens dataset {name!r}; known: {', '.join(KNOWN_DATASETS)} (or pass url=)")
        url = MOVIELENS_URL.format(name=name)
    expected = (sha256 or KNOWN_SHA256.get(name) or "").lower() or None
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}.zip"
    if dest.exists():
        if expected is None or sha256_file(dest) == expected:
            return dest
        dest.unlink()  # a damaged earlier copy
    try:
        h = hashlib.sha256()
        with (
            atomic_path(dest) as tmp,
            open(tmp, "wb") as out,
            httpx.stream("GET", url, follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0)) as resp,
        ):
            resp.raise_for_status()
            total = int(resp.headers.get("content-length", 0)) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress
            ) as bar:
                for chunk in resp.iter_bytes(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            digest = h.hexdigest()
            if expected is not None and digest != expected:  # raised inside: the file is discarded
                raise DownloadError(
                    f"{url}: SHA-256 mismatch (expected {expected}, got {digest}); the download was discarded"
                )
    except httpx.HTTPStatusError as e:
        raise DownloadError(f"cannot download {url}: HTTP {e.response.status_code}") from None
    except httpx.TransportError as e:
        raise DownloadError(
            f"cannot download {url}: {type(e).__name__}: {e} (no network? put "
            f"{dest.name} in {dest_dir} or pass a local folder)"
        ) from None
    return dest
