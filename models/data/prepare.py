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

FORMAT_VERSION = 2  # 2: item text from the tags applied before every evaluation target only
# The longest evaluation protocol predicts each user's last 10 events (`models.training.defaults.PROTOCOLS`), with
# the event before them as validation: no feature may use what happened after the earliest of these.
MAX_TEST_EVENTS = 10
SPLIT_PROTOCOL = (
    "leave-one-out: last event test, second-to-last validation; "
    "maximum sequence length 200; full ranking; history-masked headline"
)
TABLE_FILES = ("items.parquet", "interactions.parquet", "intents.parquet", "user_map.parquet")
MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_ML_LATEST_SMALL = REPO_ROOT.parent / "shared" / "data" / "movielens" / "ml-latest-small"


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


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and _is_empty_dir(out_dir):
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

    Per user that is the first of its last MAX_TEST_EVENTS + 1 events (test targets and the
    validation target; all but the first event for short users), as `models.data.batching.make_split`
    cuts them; the minimum over users.
    """
    _, first, counts = np.unique(users, return_index=True, return_counts=True)
    k = np.minimum(MAX_TEST_EVENTS + 1, counts - 1)
    return int(times[first + counts - k].min())


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
    ranked = rank_tags(before.column("item").to_numpy(), before.column("tag").to_pylist())
    tags = [ranked.get(int(i), []) for i in catalogue.column("source_id").to_numpy()]
    return tags, {
        "source": "timestamped",
        "used_before": cutoff,
        "applied": events.num_rows,
        "applied_before": before.num_rows,
        "items_with_tags": sum(bool(t) for t in tags),
    }


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
    if out_dir.exists() and not overwrite and not _is_empty_dir(out_dir):
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    reserved = {f.removesuffix(".parquet") for f in TABLE_FILES} | {"manifest"}
    clash = reserved & set(raw.extra)
    if clash:
        raise ValueError(f"extra table names {sorted(clash)} clash with the prepared tables")

    def step(msg: str) -> None:
        if progress:
            tqdm.write(f"[prepare {raw.name}] {msg}")

    # 1. Events: stable sort by (user, time) — ties keep file order — and drop short histories.
    step("sorting events")
    ratings = raw.ratings.cast(RATINGS_SCHEMA)
    for col in ratings.column_names:
        if ratings.column(col).null_count:
            raise DataFormatError(f"{raw.name} ratings", f"column {col!r} has missing values")
    users = ratings.column("user").to_numpy()
    times = ratings.column("timestamp").to_numpy()
    by_time = np.argsort(times, kind="stable")
    order = by_time[np.argsort(users[by_time], kind="stable")]
    users = users[order]
    _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    keep = order[counts[inverse] >= min_user_events]
    if keep.size == 0:
        raise ValueError(f"{raw.name}: no user has at least {min_user_events} events")
    users = ratings.column("user").to_numpy()[keep]
    items = ratings.column("item").to_numpy()[keep]
    cutoff = evaluation_cutoff(users, ratings.column("timestamp").to_numpy()[keep])

    # 2. Re-index: users 1..U and items 1..N in order of their source ids; 0 is padding.
    step("indexing users and items")
    user_ids = np.unique(users)
    item_ids = np.unique(items)
    user_idx = (np.searchsorted(user_ids, users) + 1).astype(np.int32)
    item_idx = (np.searchsorted(item_ids, items) + 1).astype(np.int32)

    catalogue = raw.items.cast(ITEMS_SCHEMA)
    src = catalogue.column("source_id").to_numpy()
    src_order = np.argsort(src, kind="stable")
    src_sorted = src[src_order]
    dup = np.flatnonzero(src_sorted[1:] == src_sorted[:-1])
    if dup.size:
        raise DataFormatError(f"{raw.name} items", f"source_id {src_sorted[dup[0]]} appears twice")
    pos = np.searchsorted(src_sorted, item_ids)
    missing = (pos >= len(src_sorted)) | (src_sorted[np.minimum(pos, len(src_sorted) - 1)] != item_ids)
    if missing.any():
        raise DataFormatError(f"{raw.name} ratings", f"item {item_ids[missing][0]} is not in the items table")
    catalogue = catalogue.take(pa.array(src_order[pos]))
    titles = catalogue.column("title").to_pylist()
    genres = catalogue.column("genres").to_pylist()
    genres = [g or [] for g in genres]
    tags, tag_record = item_tags(raw, catalogue, cutoff)

    # 3. Text and intent phrases, each encoded once.
    if encoder is None:
        from models.data.encoder import TextEncoder

        encoder = TextEncoder()
    step(f"encoding {len(titles)} item texts")
    texts = [item_text(t or "", g, tg) for t, g, tg in zip(titles, genres, tags)]
    item_emb = _encode(encoder, texts, progress, "item texts")
    per_item = [intent_phrases(g, tg) for g, tg in zip(genres, tags)]
    vocab = sorted({p for ps in per_item for p in ps})
    phrase_id = {p: i for i, p in enumerate(vocab)}
    step(f"encoding {len(vocab)} intent phrases")
    intent_emb = _encode(encoder, vocab, progress, "intent phrases")
    dim = item_emb.shape[1]
    genre_vocab = sorted({g for gs in genres for g in gs})

    n_items, n_users = len(item_ids), len(user_ids)
    items_table = pa.table(
        {
            "item_idx": pa.array(np.arange(1, n_items + 1, dtype=np.int32)),
            "source_id": pa.array(item_ids.astype(np.int64)),
            "title": pa.array(titles, pa.string()),
            "genres": pa.array(genres, pa.list_(pa.string())),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "text": pa.array(texts, pa.string()),
            "embedding": _emb_array(item_emb),
            "intent_ids": pa.array([[phrase_id[p] for p in ps] for ps in per_item], pa.list_(pa.int32())),
        }
    )
    interactions = pa.table(
        {
            "user_idx": pa.array(user_idx),
            "source_user": pa.array(users.astype(np.int64)),
            "item_idx": pa.array(item_idx),
            "rating": pa.array(ratings.column("rating").to_numpy()[keep].astype(np.float32)),
            "timestamp": pa.array(ratings.column("timestamp").to_numpy()[keep].astype(np.int64)),
        }
    )
    intents = pa.table(
        {
            "intent_idx": pa.array(np.arange(len(vocab), dtype=np.int32)),
            "phrase": pa.array(vocab, pa.string()),
            "embedding": _emb_array(intent_emb.reshape(len(vocab), dim)),
        }
    )
    user_map = pa.table(
        {
            "user_idx": pa.array(np.arange(1, n_users + 1, dtype=np.int32)),
            "source_user": pa.array(user_ids.astype(np.int64)),
        }
    )

    # 4. Write everything into a temporary folder beside out_dir, then rename it into place.
    step(f"writing {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        tables = {
            "items": items_table,
            "interactions": interactions,
            "intents": intents,
            "user_map": user_map,
            **raw.extra,
        }
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        files = {
            f"{name}.parquet": {
                "sha256": sha256_file(tmp / f"{name}.parquet"),
                "bytes": (tmp / f"{name}.parquet").stat().st_size,
            }
            for name in tables
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": raw.name,
            "source": raw.source,
            "request": request,
            "counts": {
                "users": n_users,
                "items": n_items,
                "interactions": int(keep.size),
                "genres": len(genre_vocab),
                "intents": len(vocab),
            },
            "genres": genre_vocab,
            "encoder": {"model": getattr(encoder, "model_name", type(encoder).__name__), "dim": int(dim)},
            "min_user_events": min_user_events,
            "tags": tag_record,
            "extra_tables": sorted(raw.extra),
            "files": files,
            "split_protocol": SPLIT_PROTOCOL,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    step(f"done: {n_users} users, {n_items} items, {keep.size} events, {len(vocab)} intents")
    return out_dir


# ---- from a named source --------------------------------------------------------------------


def _older_format(out_dir: Path) -> bool:
    """A prepared folder whose manifest names an older format version (derived data: safe to redo)."""
    try:
        version = json.loads((Path(out_dir) / MANIFEST).read_text()).get("format_version")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(version, int) and version < FORMAT_VERSION


def read_manifest_if_complete(out_dir: Path) -> dict | None:
    """The manifest of a complete prepared folder (every listed file present, checksums
    matching), else None."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format_version") != FORMAT_VERSION or not isinstance(files, dict):
        return None
    for name, info in files.items():
        path = Path(out_dir) / name
        if not path.is_file() or sha256_file(path) != info.get("sha256"):
            return None
    return manifest


def _jsonable(obj) -> object:
    """A dataclass as the JSON value it reads back as (tuples become lists, ...)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), sort_keys=True, default=str))


def prepare_source(
    dataset: str,
    out_dir: Path,
    data_dir: Path | None = None,
    download_dir: Path | None = None,
    encoder=None,
    overwrite: bool = False,
    synthetic_config=None,
    min_user_events: int = 3,
    progress: bool = True,
) -> Path:
    """Prepare a named dataset ("synthetic" or a MovieLens name) into `out_dir`.

    MovieLens is read from `data_dir` (folder or zip); without it, ml-latest-small comes from
    the checked copy in ../shared when present, any other set is downloaded into
    `download_dir` (default: ~/.cache/dynamic-interest/movielens). An existing complete
    output made from the same request is returned as is unless `overwrite`.
    """
    from models.data.movielens import KNOWN_DATASETS, MOVIELENS_URL, download, read_movielens
    from models.data.encoder import MODEL_NAME, cache_dir

    out_dir = Path(out_dir).expanduser()
    if dataset == "synthetic":
        from models.data.synthetic import SyntheticConfig, generate

        config = synthetic_config if synthetic_config is not None else SyntheticConfig()
        request = {"dataset": dataset, "input": _jsonable(config)}

        def load() -> RawData:
            return generate(config)
    else:
        if data_dir is None and dataset == "ml-latest-small" and SHARED_ML_LATEST_SMALL.is_dir():
            data_dir = SHARED_ML_LATEST_SMALL
        if data_dir is not None:
            data_dir = Path(data_dir).expanduser().resolve()
            request = {"dataset": dataset, "input": str(data_dir)}

            def load() -> RawData:
                return read_movielens(data_dir, name=dataset)
        else:
            if dataset not in KNOWN_DATASETS:
                raise ValueError(
                    f"unknown dataset {dataset!r}: use 'synthetic', one of "
                    f"{', '.join(KNOWN_DATASETS)}, or pass data_dir"
                )
            request = {"dataset": dataset, "input": MOVIELENS_URL.format(name=dataset)}
            target = Path(download_dir) if download_dir else cache_dir() / "movielens"

            def load() -> RawData:
                return read_movielens(download(dataset, target, progress=progress), name=dataset)

    request["min_user_events"] = min_user_events
    request["encoder"] = getattr(encoder, "model_name", MODEL_NAME) if encoder else MODEL_NAME

    if out_dir.exists() and not overwrite and not _is_empty_dir(out_dir):
        manifest = read_manifest_if_complete(out_dir)
        if manifest is not None and manifest.get("request") == request:
            if progress:
                tqdm.write(f"[prepare {dataset}] up to date: {out_dir}")
            return out_dir
        if manifest is None and _older_format(out_dir):
            if progress:
                tqdm.write(f"[prepare {dataset}] {out_dir} was prepared by an older version: preparing it again")
            overwrite = True
        else:
            why = "is incomplete" if manifest is None else "was prepared from another source"
            raise FileExistsError(f"{out_dir} {why}; pass overwrite=True to replace it")
    return prepare(
        load(),
        out_dir,
        encoder=encoder,
        min_user_events=min_user_events,
        overwrite=overwrite,
        progress=progress,
        request=request,
    )
