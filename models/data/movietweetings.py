"""MovieTweetings (`ratings.dat` and `movies.dat`, fields separated by `::`) read as an event log.

Its lines become the event-log tables and go through the same checks (`events.event_log`), with
errors naming the file and line. Item ids are IMDb ids kept as written (7 digits, leading zeros:
`0133093`); ratings are integers 0..10, read as stars by `features.stars_from_ten`; the genres come
from movies.dat. `users.dat` is not read (nothing here needs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.data.errors import DataFormatError, DataSourceError
from models.data.events import CATEGORY_SEPARATOR, Origin, event_log
from models.data.features import stars_from_ten
from models.data.raw import RawData

RATINGS_FILE, MOVIES_FILE = "ratings.dat", "movies.dat"
RATING_FIELDS = ("user_id", "movie_id", "rating", "rating_timestamp")
MOVIE_FIELDS = ("movie_id", "title", "genres")


def dat_lines(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(1-based line, its fields stripped) for each non-blank line, each with exactly len(fields) fields."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataFormatError(path.name, "is not UTF-8 text") from None
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): it also breaks at '\x85' and the like
        if line.strip():
            parts = [p.strip() for p in line.rstrip("\r").split("::")]
            if len(parts) != len(fields):
                raise DataFormatError(
                    path.name, f"expected {len(fields)} fields ({'::'.join(fields)}), got {len(parts)}", n
                )
            yield n, parts


def read_movietweetings(folder: str | Path, name: str = "movietweetings") -> RawData:
    """Read a MovieTweetings snapshot folder; raise naming file, line and column on any malformed line."""
    folder = Path(folder).expanduser()
    for file in (RATINGS_FILE, MOVIES_FILE):
        if not (folder / file).is_file():
            raise DataSourceError(
                f"{folder}: no {file}; pass the MovieTweetings folder that holds ratings.dat and movies.dat"
            )

    lines, users, items, ratings, times = [], [], [], [], []
    for n, (user, item, rating, when) in dat_lines(folder / RATINGS_FILE, RATING_FIELDS):
        if not (rating.isdecimal() and 0 <= int(rating) <= 10):
            raise DataFormatError(RATINGS_FILE, f"{rating!r} is not an integer 0..10", n, column="rating")
        lines.append(n)
        users.append(user)
        items.append(item)
        ratings.append(int(rating))
        times.append(when)
    if not lines:
        raise DataFormatError(RATINGS_FILE, "no ratings in the file", line=1)
    events = pa.table(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": times,  # text: the event-log checks read it, and name the line of a bad one
            "rating": stars_from_ten(np.array(ratings)),
        }
    )

    movie_lines, ids, titles, genres = [], [], [], []
    for n, (movie, title, genre) in dat_lines(folder / MOVIES_FILE, MOVIE_FIELDS):
        movie_lines.append(n)
        ids.append(movie)
        titles.append(title)
        genres.append(genre.split(CATEGORY_SEPARATOR) if genre else [])
    movies = pa.table({"item_id": ids, "title": titles, "categories": pa.array(genres, pa.list_(pa.string()))})

    return event_log(
        events,
        movies,
        Origin(RATINGS_FILE, line_of=lambda row: lines[row]),
        Origin(MOVIES_FILE, line_of=lambda row: movie_lines[row]),
        name=name,
        source=str(folder.resolve()),
        details={"rating_scale": "integers 0..10, read as r / 2 stars (0 as 0.5)"},
    )
