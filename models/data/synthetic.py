"""The embedded default dataset: synthetic users whose interests drift and depend on the moment.

Each next event is drawn from one of three planted sources, mirroring the model's named
dimensions, with mixture weights π(context) that depend only on the request's context:

- topic:     an item of a genre drawn from the user's drifting genre preference θ_u;
             dominant in the evening.
- sentiment: the next item of a series the user just rated highly (binge-watching);
             dominant right after a previous event (short gap).
- time:      an item made for the current part of the day (morning show, late-night film);
             dominant in the morning.

The per-event weights π and the source actually drawn are saved beside the data (`truth`),
so tests can check that the learned gates recover the planted context dependence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from models.data.raw import ITEMS_SCHEMA, RATINGS_SCHEMA, RawData

GENRES = (
    "comedy",
    "drama",
    "thriller",
    "romance",
    "science fiction",
    "horror",
    "documentary",
    "animation",
    "mystery",
    "adventure",
    "western",
    "musical",
)
DAYPARTS = ("late night", "morning", "afternoon", "evening")  # hour // 6
ADJECTIVES = (
    "silent",
    "golden",
    "broken",
    "hidden",
    "last",
    "wild",
    "quiet",
    "electric",
    "lost",
    "bright",
    "dark",
    "little",
    "endless",
    "frozen",
    "secret",
    "burning",
)
NOUNS = (
    "river",
    "city",
    "garden",
    "signal",
    "summer",
    "road",
    "machine",
    "island",
    "letter",
    "winter",
    "kingdom",
    "mirror",
    "harbor",
    "forest",
    "station",
    "promise",
)
SOURCES = ("topic", "sentiment", "time")


@dataclass
class SyntheticConfig:
    n_users: int = 600
    n_items: int = 600
    n_genres: int = 8  # how many of GENRES are used
    series_len: int = 6  # items per series (the sentiment source walks a series)
    min_events: int = 20
    max_events: int = 100
    drift: float = 0.08  # per-event pull of the genre preference towards a new target
    seed: int = 0
    start: int = 1_577_836_800  # 2020-01-01T00:00:00Z
    version: int = 3  # of the generator: prepared data from another version is not reused


def planted_weights(hour: np.ndarray, log_gap: np.ndarray) -> np.ndarray:
    """(…,) hour of day and log1p(gap hours) -> (…, 3) planted mixture weights (topic, sentiment, time)."""
    topic = 1.6 * np.cos(2 * np.pi * (hour - 20.0) / 24.0)
    sentiment = 2.0 - 1.6 * log_gap
    time = 1.6 * np.cos(2 * np.pi * (hour - 8.0) / 24.0)
    z = np.stack([topic, sentiment, time], axis=-1)
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _items(cfg: SyntheticConfig, rng: np.random.Generator):
    n = cfg.n_items
    series = np.arange(n) // cfg.series_len
    n_series = int(series.max()) + 1
    # A series shares its part of the day; its episodes differ in genre, so that only the
    # sentiment source (binge the series just liked) explains series continuation.
    genre1 = rng.integers(0, cfg.n_genres, n)
    genre2 = np.where(rng.random(n) < 0.4, rng.integers(0, cfg.n_genres, n), -1)
    genre2 = np.where(genre2 == genre1, -1, genre2)
    daypart = rng.integers(0, len(DAYPARTS), n_series)[series]
    pop = rng.pareto(1.5, n) + 1.0  # long-tailed popularity
    quality = rng.normal(0, 0.6, n)
    titles, genres, tags = [], [], []
    for i in range(n):
        g = [GENRES[genre1[i]]] + ([GENRES[genre2[i]]] if genre2[i] >= 0 else [])
        titles.append(
            f"The {ADJECTIVES[series[i] % 16].title()} {NOUNS[(series[i] // 16) % 16].title()} {i % cfg.series_len + 1}"
        )
        genres.append(g)
        tags.append([f"{DAYPARTS[daypart[i]]} viewing"])
    onehot = np.zeros((n, cfg.n_genres))
    onehot[np.arange(n), genre1] = 1
    has2 = genre2 >= 0
    onehot[np.arange(n)[has2], genre2[has2]] = 1
    return titles, genres, tags, onehot, daypart, series, pop, quality


def _pick(pool: np.ndarray, pop: np.ndarray, rng: np.random.Generator) -> int:
    if len(pool) == 0:  # tiny catalogues: any item
        pool = np.arange(len(pop))
    w = pop[pool]
    return int(pool[rng.choice(len(pool), p=w / w.sum())])


@dataclass(frozen=True)
class _Catalogue:
    """The generated items and the pools the sources draw from."""

    titles: list[str]
    genres: list[list[str]]
    tags: list[list[str]]
    series: np.ndarray  # (N,) series of each item
    pop: np.ndarray  # (N,) popularity weight
    quality: np.ndarray  # (N,) the rating offset
    by_genre: list[np.ndarray]  # per genre: its items
    by_daypart: list[np.ndarray]  # per daypart: its items


TRUTH_COLUMNS = ("user", "seq", "timestamp", "item", "source", "hour", "log_gap", "pi_topic", "pi_sentiment", "pi_time")


def _catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> _Catalogue:
    titles, genres, tags, onehot, daypart, series, pop, quality = _items(cfg, rng)
    return _Catalogue(
        titles=titles,
        genres=genres,
        tags=tags,
        series=series,
        pop=pop,
        quality=quality,
        by_genre=[np.flatnonzero(onehot[:, g]) for g in range(cfg.n_genres)],
        by_daypart=[np.flatnonzero(daypart == d) for d in range(len(DAYPARTS))],
    )


def _next_item(src: int, liked: int, theta: np.ndarray, h: float, cfg: SyntheticConfig, cat: _Catalogue, rng) -> int:
    """The item that source `src` (0 topic, 1 sentiment, 2 time) picks at hour `h`."""
    if src == 0:
        return _pick(cat.by_genre[int(rng.choice(cfg.n_genres, p=theta))], cat.pop, rng)
    if src == 1:  # the next episode of the series just liked, or its first after the last
        nxt = (
            liked + 1
            if cat.series[min(liked + 1, cfg.n_items - 1)] == cat.series[liked]
            else liked - cfg.series_len + 1
        )
        return int(min(max(nxt, 0), cfg.n_items - 1))
    return _pick(cat.by_daypart[int(h // 6)], cat.pop, rng)


def _simulate_user(u: int, cfg: SyntheticConfig, cat: _Catalogue, rng, cols: dict, truth: dict) -> None:
    """Append user `u`'s events to `cols` and their planted causes to `truth`."""
    theta = rng.dirichlet(np.full(cfg.n_genres, 0.3))
    target = rng.dirichlet(np.full(cfg.n_genres, 0.3))
    habits = rng.choice(24, size=2, replace=False)  # two habitual session hours
    n_events = int(rng.integers(cfg.min_events, cfg.max_events + 1))
    t = cfg.start + int(rng.integers(0, 30 * 86400))
    liked = -1  # last item rated >= 4
    in_session = 0
    for s in range(n_events):
        if s == 0 or in_session == 0:  # a new session
            day = (t - cfg.start) // 86400 + int(rng.integers(1, 4))
            hour = float(rng.choice(habits)) + rng.normal(0, 1.0)
            t_new = cfg.start + day * 86400 + int((hour % 24) * 3600)
            gap = 0 if s == 0 else t_new - t
            t = t_new
            in_session = int(rng.integers(1, 6))
        else:
            gap = int(rng.integers(20, 90) * 60)
            t += gap
        in_session -= 1
        h = (t % 86400) / 3600.0
        lg = float(np.log1p(gap / 3600.0))
        pi = planted_weights(np.array(h), np.array(lg))
        src = int(rng.choice(3, p=pi))
        if src == 1 and liked < 0:
            src = 0  # nothing liked yet: fall back to topic
        item = _next_item(src, liked, theta, h, cfg, cat, rng)
        # The rating reflects the mood of the moment: high when binge-watching a liked series,
        # casual for daypart viewing; not the genre preference (that is the topic's business).
        mood = {0: 0.0, 1: 1.8, 2: -1.0}[src]
        score = 3.0 + cat.quality[item] + mood + rng.normal(0, 0.5)
        rating = float(np.clip(np.rint(score), 1, 5))
        if rating >= 4:
            liked = item
        for k, v in zip(cols, (str(u + 1), str(item + 1), rating, t)):
            cols[k].append(v)
        for k, v in zip(truth, (str(u + 1), s, t, str(item + 1), SOURCES[src], h, lg, *pi)):
            truth[k].append(v)
        theta = (1 - cfg.drift) * theta + cfg.drift * target
        if rng.random() < 0.05:
            target = rng.dirichlet(np.full(cfg.n_genres, 0.3))  # interests move


def generate(config: SyntheticConfig | None = None) -> RawData:
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    cat = _catalogue(cfg, rng)
    cols = {k: [] for k in ("user", "item", "rating", "timestamp")}
    truth = {k: [] for k in TRUTH_COLUMNS}
    for u in range(cfg.n_users):
        _simulate_user(u, cfg, cat, rng, cols, truth)
    items = pa.table(
        {
            "source_id": [str(i) for i in range(1, cfg.n_items + 1)],
            "title": cat.titles,
            "genres": cat.genres,
            "tags": cat.tags,
            "text": [None] * cfg.n_items,
        },
        schema=ITEMS_SCHEMA,
    )
    ratings = pa.table(
        {
            "user": cols["user"],
            "item": cols["item"],
            "rating": np.asarray(cols["rating"], np.float32),
            "timestamp": np.asarray(cols["timestamp"], np.int64),
        },
        schema=RATINGS_SCHEMA,
    )
    meta = {"config": asdict(cfg)}
    truth_table = pa.table(truth).replace_schema_metadata({"generator": str(meta)})
    return RawData(
        name="synthetic",
        items=items,
        ratings=ratings,
        source=f"synthetic(seed={cfg.seed})",
        extra={"truth": truth_table},
    )
