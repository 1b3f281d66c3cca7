"""Raw data → the prepared Parquet tables and manifest that training, tuning and serving read.

Preparation writes into a temporary folder beside `out_dir` and renames it into place at the
end, so a crash leaves any earlier output untouched and never a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from models.data.errors import DataFormatError
from models.data.raw import ITEMS_SCHEMA, RATINGS_SCHEMA, RawData, rank_tags
from models.files import sha256_file

# 2: item text from the tags applied before every evaluation target only;
# 3: a user's events that share a second in a seeded random order (TIE_SEED), not in file order;
# 4: source ids as strings (IMDb's "0133093" keeps its zero);
# 5: tags applied before the ten validation targets that precede the test window too
FORMAT_VERSION = 5
# Events of one user with the same timestamp have no order of their own; the file's order often
# encodes something (MovieLens lists a bulk-rating second in ascending movieId, so the last event
# of a tie would be its largest id). They are put in a random order drawn from this seed instead:
# the same input still prepares byte-identical output.
TIE_SEED = 0
# The longest evaluation protocol predicts each user's last 10 events (`models.training.defaults.PROTOCOLS`), with
# the 10 events before them as validation (`VALID_TARGETS`): no feature may use what happened after the
# earliest of these.
MAX_TEST_EVENTS = 10
MAX_VALID_EVENTS = 10
SPLIT_PROTOCOL = (
    "leave-one-out: last event test, second-to-last validation; "
    "maximum sequence length 200; full ranking; history-masked headline"
)
TABLE_FILES = ("items.parquet", "interactions.parquet", "intents.parquet", "user_map.parquet")
MANIFEST = "manifest.json"


# ---- pure helpers ---------------------------------------------------------------------------


def item_text(title: str, genres: list[str], tags: list[str]) -> str:
    """ "Title. Genres: a, b. Tags: x, y" — the text the encoder embeds; empty parts left out."""
    parts = [title.strip()] if title and title.strip() else []
    if genres:
        parts.append(f"Genres: {', '.join(genres)}")
    if tags:
        parts.append(f"Tags: {', '.join(tags[:5])}")
    return ". ".join(parts)


def intent_phrases(genres: list[str], tags: list[str]) -> list[str]:
    """Short intent phrases from an item's genre words and tags (never its title)."""
    words = [g.strip().lower() for g in genres if g.strip()]
    phrases = list(words)
    if len(words) >= 2:
        phrases.append(f"{words[0]} and {words[1]}")
    phrases += [t.strip().lower() for t in tags[:3] if t.strip()]
    return list(dict.fromkeys(phrases))


def _emb_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


def _encode(encoder, texts: list[str], progress: bool, what: str) -> np.ndarray:
    emb = np.asarray(encoder.encode(texts, progress=progress), dtype=np.float32)
    dim = getattr(encoder, "dim", emb.shape[1] if emb.ndim == 2 else None)
    if emb.shape != (len(texts), dim):
        raise ValueError(f"encoder returned shape {emb.shape} for {len(texts)} {what}, expected ({len(texts)}, {dim})")
    return emb


# ---- the folder swap ------------------------------------------------------------------------


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and is_empty_dir(out_dir):
        out_dir.rmdir()
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} appeared while preparing; pass overwrite=True")
    # A folder cannot be renamed over a non-empty one: move the old aside, then swap.
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- prepare --------------------------------------------------------------------------------


def evaluation_cutoff(users: np.ndarray, times: np.ndarray) -> int:
    """Events sorted by (user, time) -> the time of the earliest event any protocol evaluates.

    Per user that is the first of its test and validation targets under the longest protocol, as
    `models.data.batching.make_split` cuts them (MAX_TEST_EVENTS test targets, up to
    MAX_VALID_EVENTS validation targets before them); the minimum over users.
    """
    _, first, counts = np.unique(users, return_index=True, return_counts=True)
    k = np.minimum(MAX_TEST_EVENTS, counts - 2)
    v = np.clip(np.minimum(MAX_VALID_EVENTS, (counts - k) // 2), 1, None)
    return int(times[first + counts - k - v].min())


def item_tags(raw: RawData, catalogue: pa.Table, cutoff: int) -> tuple[list[list[str]], dict]:
    """The tags of each catalogue row that item text and intent phrases may use -> (tags, manifest record).

    Timestamped tags (`raw.tag_events`) count only when applied before `cutoff`, the earliest
    evaluated event, so that no target is scored with a tag from after its own time. Static tags
    (the synthetic data's) are item attributes and count as they are.
    """
    if raw.tag_events is None:
        tags = [t or [] for t in catalogue.column("tags").to_pylist()]
        return tags, {"source": "static", "items_with_tags": sum(bool(t) for t in tags)}
    events = raw.tag_events
    before = events.filter(pc.less(events.column("timestamp"), cutoff))
    ranked = rank_tags(before.column("item").to_pylist(), before.column("tag").to_pylist())
    tags = [ranked.get(i, []) for i in catalogue.column("source_id").to_pylist()]
    return tags, {
        "source": "timestamped",
        "used_before": cutoff,
        "applied": events.num_rows,
        "applied_before": before.num_rows,
        "items_with_tags": sum(bool(t) for t in tags),
    }


@dataclasses.dataclass(frozen=True)
class Events:
    """The kept events, sorted by (user, time) — ties in a seeded random order — with users 1..U and
    items 1..N numbered in the order of their source ids (0 is padding)."""

    user_ids: np.ndarray  # (U,) object: source user ids, in id order (`id_order`)
    item_ids: np.ndarray  # (N,) object: source item ids, in id order
    user_idx: np.ndarray  # (E,) int32 in 1..U
    item_idx: np.ndarray  # (E,) int32 in 1..N
    ratings: np.ndarray  # (E,) float32
    times: np.ndarray  # (E,) int64 seconds

    @property
    def size(self) -> int:
        return int(self.user_idx.size)


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """The rows of the rated items, in item_idx order."""

    titles: list[str]  # (N,)
    genres: list[list[str]]  # (N,)
    texts: list[str | None]  # (N,) the source's own item text, None where it has none
    rows: pa.Table  # (N rows) raw.items in item_idx order


@dataclasses.dataclass(frozen=True)
class Texts:
    """Item texts and intent phrases, each encoded once."""

    texts: list[str]  # (N,)
    item_emb: np.ndarray  # (N, D)
    per_item: list[list[str]]  # (N,) each item's phrases
    vocab: list[str]  # (P,) every phrase, sorted
    intent_emb: np.ndarray  # (P, D)


def check_target(raw: RawData, out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output without `overwrite`, or extra tables named like prepared ones."""
    if out_dir.exists() and not overwrite and not is_empty_dir(out_dir):
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    reserved = {f.removesuffix(".parquet") for f in TABLE_FILES} | {"manifest"}
    clash = reserved & set(raw.extra)
    if clash:
        raise ValueError(f"extra table names {sorted(clash)} clash with the prepared tables")


def tie_keys(n: int) -> np.ndarray:
    """(n,) random sort keys, one per event in file order, drawn from TIE_SEED: the last key of a sort by
    (user, time, key), so events that share a user and a second take a random order, the same every run."""
    return np.random.default_rng(TIE_SEED).random(n)


def id_order(ids: np.ndarray) -> np.ndarray:
    """Distinct source ids (K,) -> the indices that sort them: as numbers when every one is a decimal
    integer (MovieLens's "9" before "10", IMDb's "0133093"), else as strings."""
    text = np.asarray(ids, dtype=str)
    if text.size and np.char.isdecimal(text).all():
        try:
            return np.lexsort((text, text.astype(np.int64)))  # equal numbers ("07", "7"): by string
        except (OverflowError, ValueError):  # longer than int64: compared as strings below
            pass
    return np.argsort(text, kind="stable")


def distinct_ids(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Source ids (E,) -> (the distinct ids in id order (K,) object, each entry's position among them (E,) int64)."""
    uniques = pc.unique(column)
    codes = pc.index_in(column, value_set=uniques).to_numpy()  # (E,) into `uniques`
    distinct = uniques.to_numpy(zero_copy_only=False)
    order = id_order(distinct)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return distinct[order].astype(object), rank[codes]


def sorted_events(raw: RawData, min_user_events: int) -> Events:
    """Sort by (user, time) — ties in the order of `tie_keys` — drop histories shorter than
    `min_user_events`, and number the users and items that remain."""
    ratings = raw.ratings.cast(RATINGS_SCHEMA)
    for col in ratings.column_names:
        if ratings.column(col).null_count:
            raise DataFormatError(f"{raw.name} ratings", f"column {col!r} has missing values")
    user_ids, users = distinct_ids(ratings.column("user"))  # (U0,), (E0,)
    item_ids, items = distinct_ids(ratings.column("item"))  # (N0,), (E0,)
    times = ratings.column("timestamp").to_numpy()
    order = np.lexsort((tie_keys(len(users)), times, users))  # the last key sorts first
    long_enough = np.bincount(users, minlength=len(user_ids)) >= min_user_events  # (U0,)
    keep = order[long_enough[users[order]]]
    if keep.size == 0:
        raise ValueError(f"{raw.name}: no user has at least {min_user_events} events")
    rated = np.unique(items[keep])  # (N,) positions in item_ids, ascending: id order
    return Events(
        user_ids=user_ids[long_enough],
        item_ids=item_ids[rated],
        user_idx=np.cumsum(long_enough).astype(np.int32)[users[keep]],
        item_idx=(np.searchsorted(rated, items[keep]) + 1).astype(np.int32),
        ratings=ratings.column("rating").to_numpy()[keep].astype(np.float32),
        times=times[keep].astype(np.int64),
    )


def index_catalogue(raw: RawData, events: Events) -> Catalogue:
    """Each rated item's row from `raw.items` (every one must be there, once), in item_idx order."""
    catalogue = raw.items.cast(ITEMS_SCHEMA)
    src = catalogue.column("source_id")
    if src.null_count:
        raise DataFormatError(f"{raw.name} items", "column 'source_id' has missing values")
    distinct = pc.unique(src)
    if len(distinct) < len(src):
        counts = np.bincount(pc.index_in(src, value_set=distinct).to_numpy(), minlength=len(distinct))
        raise DataFormatError(f"{raw.name} items", f"source_id {distinct[int(np.argmax(counts))]} appears twice")
    pos = pc.index_in(pa.array(events.item_ids, pa.string()), value_set=src)  # (N,) row of each rated item
    if pos.null_count:
        missing = events.item_ids[pos.is_null().to_numpy(zero_copy_only=False)]
        raise DataFormatError(f"{raw.name} ratings", f"item {missing[0]} is not in the items table")
    rows = catalogue.take(pos)
    return Catalogue(
        titles=rows.column("title").to_pylist(),
        genres=[g or [] for g in rows.column("genres").to_pylist()],
        texts=rows.column("text").to_pylist(),
        rows=rows,
    )


def encode_texts(encoder, cat: Catalogue, tags: list[list[str]], progress: bool, step) -> Texts:
    """Each item's text (the source's own, else `item_text`) and every intent phrase, encoded once by `encoder`."""
    step(f"encoding {len(cat.titles)} item texts")
    texts = [own or item_text(t or "", g, tg) for own, t, g, tg in zip(cat.texts, cat.titles, cat.genres, tags)]
    item_emb = _encode(encoder, texts, progress, "item texts")
    per_item = [intent_phrases(g, tg) for g, tg in zip(cat.genres, tags)]
    vocab = sorted({p for ps in per_item for p in ps})
    step(f"encoding {len(vocab)} intent phrases")
    intent_emb = _encode(encoder, vocab, progress, "intent phrases").reshape(len(vocab), item_emb.shape[1])
    return Texts(texts=texts, item_emb=item_emb, per_item=per_item, vocab=vocab, intent_emb=intent_emb)


def build_tables(events: Events, cat: Catalogue, tags: list[list[str]], text: Texts) -> dict[str, pa.Table]:
    """The four prepared tables: items, interactions, intents, user_map."""
    n_items, n_users = len(events.item_ids), len(events.user_ids)
    phrase_id = {p: i for i, p in enumerate(text.vocab)}
    items = pa.table(
        {
            "item_idx": pa.array(np.arange(1, n_items + 1, dtype=np.int32)),
            "source_id": pa.array(events.item_ids, pa.string()),
            "title": pa.array(cat.titles, pa.string()),
            "genres": pa.array(cat.genres, pa.list_(pa.string())),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "text": pa.array(text.texts, pa.string()),
            "embedding": _emb_array(text.item_emb),
            "intent_ids": pa.array([[phrase_id[p] for p in ps] for ps in text.per_item], pa.list_(pa.int32())),
        }
    )
    interactions = pa.table(
        {
            "user_idx": pa.array(events.user_idx),
            "source_user": pa.array(events.user_ids, pa.string()).take(pa.array(events.user_idx - 1)),
            "item_idx": pa.array(events.item_idx),
            "rating": pa.array(events.ratings),
            "timestamp": pa.array(events.times),
        }
    )
    intents = pa.table(
        {
            "intent_idx": pa.array(np.arange(len(text.vocab), dtype=np.int32)),
            "phrase": pa.array(text.vocab, pa.string()),
            "embedding": _emb_array(text.intent_emb),
        }
    )
    user_map = pa.table(
        {
            "user_idx": pa.array(np.arange(1, n_users + 1, dtype=np.int32)),
            "source_user": pa.array(events.user_ids, pa.string()),
        }
    )
    return {"items": items, "interactions": interactions, "intents": intents, "user_map": user_map}


def write_prepared(tables: dict[str, pa.Table], manifest: dict, out_dir: Path, overwrite: bool) -> None:
    """Write the tables and the manifest (with each file's checksum and size) into a temporary
    folder beside `out_dir`, then rename it into place; on any failure the folder is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        manifest["files"] = {
            f"{name}.parquet": {
                "sha256": sha256_file(tmp / f"{name}.parquet"),
                "bytes": (tmp / f"{name}.parquet").stat().st_size,
            }
            for name in tables
        }
        manifest["split_protocol"] = SPLIT_PROTOCOL
        manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare(
    raw: RawData,
    out_dir: Path,
    encoder=None,
    min_user_events: int = 3,
    overwrite: bool = False,
    progress: bool = True,
    *,
    request: dict | None = None,
) -> Path:
    """Write the prepared dataset for `raw` to `out_dir` (atomically) and return `out_dir`.

    `encoder` is a `TextEncoder` (the default) or anything with `encode(texts, progress)`,
    `model_name` and `dim`. `request` (what `prepare_source` was asked for) is stored in the
    manifest so that a later identical request can reuse the output.
    """
    out_dir = Path(out_dir).expanduser()
    check_target(raw, out_dir, overwrite)

    def step(msg: str) -> None:
        if progress:
            tqdm.write(f"[prepare {raw.name}] {msg}")

    step("sorting events")
    events = sorted_events(raw, min_user_events)
    step("finding the items' rows")
    cat = index_catalogue(raw, events)
    tags, tag_record = item_tags(raw, cat.rows, evaluation_cutoff(events.user_idx, events.times))
    if encoder is None:
        from models.data.encoder import TextEncoder

        encoder = TextEncoder()
    text = encode_texts(encoder, cat, tags, progress, step)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": raw.name,
        "source": raw.source,
        "request": request,
        "counts": {
            "users": len(events.user_ids),
            "items": len(events.item_ids),
            "interactions": events.size,
            "genres": len({g for gs in cat.genres for g in gs}),
            "intents": len(text.vocab),
        },
        "genres": sorted({g for gs in cat.genres for g in gs}),
        "encoder": {
            "model": getattr(encoder, "model_name", type(encoder).__name__),
            "dim": int(text.item_emb.shape[1]),
        },
        "min_user_events": min_user_events,
        "tie_seed": TIE_SEED,
        "tags": tag_record,
        "source_details": raw.details,
        "extra_tables": sorted(raw.extra),
    }
    step(f"writing {out_dir}")
    write_prepared({**build_tables(events, cat, tags, text), **raw.extra}, manifest, out_dir, overwrite)
    step(
        f"done: {len(events.user_ids)} users, {len(events.item_ids)} items, {events.size} events, {len(text.vocab)} intents"
    )
    return out_dir
