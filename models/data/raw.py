"""The raw form every source (MovieLens readers, the synthetic generator) produces.

`prepare.py` turns a `RawData` into the prepared Parquet tables; nothing downstream reads
raw files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

ITEMS_SCHEMA = pa.schema([
    ("source_id", pa.int64()),          # the source's own item id (movieId, ...)
    ("title", pa.string()),
    ("genres", pa.list_(pa.string())),  # genre words, in source order
    ("tags", pa.list_(pa.string())),    # distinct user tags (may be empty)
])

RATINGS_SCHEMA = pa.schema([
    ("user", pa.int64()),        # the source's own user id
    ("item", pa.int64()),        # source_id of the item
    ("rating", pa.float32()),
    ("timestamp", pa.int64()),   # seconds since the epoch (UTC)
])


@dataclass
class RawData:
    name: str                    # e.g. "synthetic", "ml-latest-small"
    items: pa.Table              # ITEMS_SCHEMA
    ratings: pa.Table            # RATINGS_SCHEMA, in file order (ties keep this order)
    source: str = ""             # where it came from (path, URL, generator seed)
    extra: dict[str, pa.Table] = field(default_factory=dict)  # written beside as NAME.parquet
