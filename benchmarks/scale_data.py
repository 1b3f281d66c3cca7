"""MovieLens-shaped data at any size, as the CSV files of a MovieLens release (ratings.csv,
movies.csv, tags.csv), so that the scale benchmark measures the real reader and preparation.

The shape follows ml-latest-small (610 users, 9,742 movies, 100,836 ratings, 3,683 tags):
per-user history lengths log-normal with a median near 70 and at least 20 draws (a user's
repeated draws of an item are dropped, so a few end below 20), item
popularity a power law over a random order of the catalogue, MovieLens's rating distribution,
sessions of a few events minutes apart between gaps of days, tags applied to popular items at
3.7 % of the rating count, from a power-law vocabulary.

    python benchmarks/scale_data.py --events 1000000 --items 60000 --out runs/scale/1M-60k
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.cli import add_settings, setting, settings_from  # noqa: E402
from models.files import write_json  # noqa: E402

GENRES = (
    "Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy Film-Noir Horror IMAX "
    "Musical Mystery Romance Sci-Fi Thriller War Western"
).split()
RATINGS = np.arange(1, 11) / 2.0  # 0.5 … 5.0
RATING_P = np.array([1.4, 2.8, 1.8, 7.5, 5.5, 19.9, 13.0, 26.6, 8.5, 13.0]) / 100.0  # ml-latest-small's shares
MEDIAN_EVENTS, SIGMA_EVENTS, MIN_EVENTS = 70.0, 1.1, 20
TAG_SHARE = 0.037  # tag applications per rating
FIRST, LAST = 828_000_000, 1_537_000_000  # 1996-03 … 2018-09, ml-latest-small's span


@dataclass(frozen=True)
class ScaleConfig:
    events: int = setting(100_000, "ratings to write (about: a user's repeated draws are dropped)")
    items: int = setting(10_000, "catalogue size")
    tag_vocabulary: int = setting(1_600, "distinct tags")
    popularity_exponent: float = setting(0.9, "item i of the popularity order is drawn ∝ (i + 1)^-exponent")
    seed: int = setting(0, "random seed")


def history_lengths(n_users: int, cfg: ScaleConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_users,) draws per user, log-normal (median ~70, at least 20)."""
    lengths = np.maximum(MIN_EVENTS, rng.lognormal(np.log(MEDIAN_EVENTS), SIGMA_EVENTS, n_users)).astype(np.int64)
    return np.minimum(lengths, cfg.items)


def user_items(cfg: ScaleConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(E,) users and (E,) items, sorted by (user, item), one row per pair, E = `cfg.events` (the
    last user cut short). Users are added until repeated draws, dropped, leave enough rows."""
    p = popularity(cfg, rng)
    mean = MEDIAN_EVENTS * np.exp(SIGMA_EVENTS**2 / 2)
    keys, have, next_user, kept_per_draw = [], 0, 1, 1.0
    while have < cfg.events:
        n_users = max(1, int(np.ceil((cfg.events - have) / (mean * kept_per_draw))))
        lengths = history_lengths(n_users, cfg, rng)
        users = np.repeat(np.arange(next_user, next_user + n_users, dtype=np.int64), lengths)
        items = rng.choice(cfg.items, size=users.size, p=p).astype(np.int64) + 1
        key = np.unique(users * (cfg.items + 1) + items)
        kept_per_draw = key.size / users.size
        keys.append(key)
        have += key.size
        next_user += n_users
    key = np.concatenate(keys)[: cfg.events]
    return key // (cfg.items + 1), key % (cfg.items + 1)


def popularity(cfg: ScaleConfig, rng: np.random.Generator) -> np.ndarray:
    """(N,) drawing probability of each item id 1..N: a power law over a random order."""
    p = (np.arange(cfg.items) + 1.0) ** -cfg.popularity_exponent
    return (p / p.sum())[rng.permutation(cfg.items)]


def ratings_table(cfg: ScaleConfig, rng: np.random.Generator) -> pa.Table:
    """userId, movieId, rating, timestamp; sorted by user and movie like a MovieLens release."""
    users, items = user_items(cfg, rng)
    # Time: a start per user, then sessions of events minutes apart separated by gaps of days.
    n = users.size
    new_session = rng.random(n) < 0.3
    gaps = np.where(new_session, rng.exponential(3 * 86400, n), rng.exponential(600, n)).astype(np.int64)
    first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])  # each user's first row
    gaps[first] = 0
    csum = np.cumsum(gaps)
    since_start = csum - np.repeat(csum[first], np.diff(np.r_[first, n]))
    span = np.maximum(since_start[np.r_[first[1:], n] - 1], 1)  # each user's own span
    start = FIRST + (rng.random(first.size) * np.maximum(LAST - FIRST - span, 0)).astype(np.int64)
    times = np.repeat(start, np.diff(np.r_[first, n])) + since_start  # (E,) increasing within a user
    # Rows are in (user, movie) order; a user's times go to its movies in a random order.
    shuffled = np.argsort(users + rng.random(n), kind="stable")
    return pa.table(
        {
            "userId": users,
            "movieId": items,
            "rating": rng.choice(RATINGS, size=n, p=RATING_P),
            "timestamp": times[shuffled],
        }
    )


def movies_table(cfg: ScaleConfig, rng: np.random.Generator) -> pa.Table:
    """movieId, title (with a year), genres (1-3, '|'-joined)."""
    ids = np.arange(1, cfg.items + 1)
    years = rng.integers(1920, 2019, cfg.items)
    n_genres = rng.choice([1, 2, 3], size=cfg.items, p=[0.35, 0.4, 0.25])
    picks = rng.random((cfg.items, len(GENRES))).argsort(axis=1)
    genres = ["|".join(GENRES[g] for g in sorted(picks[i, : n_genres[i]])) for i in range(cfg.items)]
    titles = [f"Film {i} ({y})" for i, y in zip(ids.tolist(), years.tolist())]
    return pa.table({"movieId": ids, "title": titles, "genres": genres})


def tags_table(cfg: ScaleConfig, ratings: pa.Table, rng: np.random.Generator) -> pa.Table:
    """userId, movieId, tag, timestamp: applications to rated items, from a power-law vocabulary."""
    n = max(1, int(round(ratings.num_rows * TAG_SHARE)))
    rows = rng.integers(0, ratings.num_rows, n)
    vocab_p = (np.arange(cfg.tag_vocabulary) + 1.0) ** -1.0
    words = rng.choice(cfg.tag_vocabulary, size=n, p=vocab_p / vocab_p.sum())
    pick = pa.array(rows)
    return pa.table(
        {
            "userId": ratings.column("userId").take(pick),
            "movieId": ratings.column("movieId").take(pick),
            "tag": [f"tag {w}" for w in words.tolist()],
            "timestamp": ratings.column("timestamp").take(pick),
        }
    )


def write_release(cfg: ScaleConfig, out: Path) -> dict:
    """Write the three CSV files and `scale.json` (the config and the counts) into `out` -> the record."""
    rng = np.random.default_rng(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    ratings = ratings_table(cfg, rng)
    tables = {"ratings.csv": ratings, "movies.csv": movies_table(cfg, rng), "tags.csv": tags_table(cfg, ratings, rng)}
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    for name, table in tables.items():
        with open(out / name, "wb") as f:  # MovieLens's header is not quoted; pyarrow's would be
            f.write((",".join(table.column_names) + "\n").encode())
            pacsv.write_csv(table, f, options)
    record = {
        "config": asdict(cfg),
        "users": int(np.unique(ratings.column("userId").to_numpy()).size),
        "items": cfg.items,
        "events": ratings.num_rows,
        "tags": tables["tags.csv"].num_rows,
    }
    write_json(out / "scale.json", record, indent=2)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, ScaleConfig)
    p.add_argument("--out", type=Path, required=True, help="folder for the CSV files")
    ns = p.parse_args(argv)
    record = write_release(settings_from(ScaleConfig, ns), ns.out)
    print(
        f"{ns.out}: {record['users']} users, {record['items']} items, {record['events']} ratings, {record['tags']} tags"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
