"""The items added while serving (POST /items), read once from the serving store for a batch job.

The job ranks the catalogue `/recommend` ranks: the trained items and the items added since, placed
by their text as every serving replica places them (`ray_app.serve.catalogue.extend`). The driver
reads the added items once, when the job starts, and hands the same list to every model actor, so
all users of one output are ranked against one catalogue; items added while the job runs wait for
its next run. A store belongs to a catalogue: one that records another vocabulary than the
checkpoint's is refused, as is a SQLite file that does not exist (a mistyped path would otherwise
read as "no items added").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ray_app.serve.served_model import _digest, _id_list
from ray_app.store.base import AddedItem, StoreUnavailable, redact_url
from ray_app.store.opener import expand_env, open_store
from ray_app.train.data import SetupError


def read_added_items(store_url: str, vocabulary: np.ndarray) -> list[AddedItem]:
    """Every item the store at `store_url` holds beyond `vocabulary` (the checkpoint's trained item
    ids, padding first), in the order they were added; SetupError naming --store-url otherwise."""
    shown = redact_url(store_url)
    try:
        url = expand_env(store_url)
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
            raise SetupError(f"--store-url {shown}: no such store file")
        store = open_store(url)
    except (ValueError, OSError, StoreUnavailable) as e:
        raise SetupError(f"--store-url {shown}: {e}") from None
    try:
        held = store.dataset()
        if held is not None and held.catalogue != _digest(_id_list(vocabulary[1:])):
            raise SetupError(
                f"--store-url {shown} serves dataset {held.describe()}, whose item vocabulary is not the "
                "checkpoint's: its added items belong to another catalogue"
            )
        return store.items_since(0)
    except StoreUnavailable as e:
        raise SetupError(f"--store-url {shown}: the store is unavailable ({e})") from None
    finally:
        store.close()
