"""The raw form every source (MovieLens readers, the synthetic generator) produces.

`prepare.py` turns a `RawData` into the prepared Parquet tables; nothing downstream reads
raw files. Source ids are strings from here on (IMDb's "0133093" keeps its zero); a source
with numeric ids writes them as decimal strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

MAX_TAGS_PER_ITEM = 10

ITEMS_SCHEMA = pa.schema(
    [
        ("source_id", pa.string()),  # the source's own item id (movieId, IMDb id, ...)
        ("title", pa.string()),
        ("genres", pa.list_(pa.string())),  # genre words, in source order
        (
            "tags",
            pa.list_(pa.string()),
        ),  # distinct tags, most used first, at most MAX_TAGS_PER_ITEM; see RawData.tag_events
        ("text", pa.string()),  # the source's own item text for the encoder; null: built from title, genres, tags
    ]
)

TAG_EVENTS_SCHEMA = pa.schema(
    [
        ("item", pa.string()),  # source_id of the item
        ("tag", pa.string()),  # normalised: lower case, single spaces
        ("timestamp", pa.int64()),  # when a user applied it (seconds since the epoch, UTC)
    ]
)

RATINGS_SCHEMA = pa.schema(
    [
        ("user", pa.string()),  # the source's own user id
        ("item", pa.string()),  # source_id of the item
        ("rating", pa.float32()),
        ("timestamp", pa.int64()),  # seconds since the epoch (UTC)
    ]
)


@dataclass
class RawData:
    name: str  # e.g. "synthetic", "ml-latest-small"
    items: pa.Table  # ITEMS_SCHEMA
    ratings: pa.Table  # RATINGS_SCHEMA, in file order (preparation puts same-second events in a seeded random order)
    source: str = ""  # where it came from (path, URL, generator seed)
    extra: dict[str, pa.Table] = field(default_factory=dict)  # written beside as NAME.parquet
    # Tags users applied, with their times (TAG_EVENTS_SCHEMA), when the source has them. Preparation
    # then builds the item text from the tags applied before every evaluation target only, in place
    # of `items.tags`; a source without it (the synthetic data) has static tags.
    tag_events: pa.Table | None = None
    details: dict = field(default_factory=dict)  # what the reader decided (rating scale, ...), kept in the manifest


def rank_tags(items: list[str], tags: list[str]) -> dict[str, list[str]]:
    """Tag events (item, tag) -> per item its distinct tags, the most used first (ties: first seen),
    at most MAX_TAGS_PER_ITEM."""
    counts: dict[str, dict[str, int]] = {}
    for item, tag in zip(items, tags):
        per_item = counts.setdefault(item, {})
        per_item[tag] = per_item.get(tag, 0) + 1
    return {
        item: [t for t, _ in sorted(c.items(), key=lambda kv: -kv[1])[:MAX_TAGS_PER_ITEM]] for item, c in counts.items()
    }
