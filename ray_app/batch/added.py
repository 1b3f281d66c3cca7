"""The items added while serving (POST /items), read once from the serving store for a batch job.

The job ranks the catalogue `/recommend` ranks: the trained items and the items added since, placed
by their text as every serving replica places them (`ray_app.serve.catalogue.extend`). The driver
reads the added items once, when the job starts, and hands the same list to every model actor, so
all users of one output are ranked against one catalogue; items added while the job runs wait for
its next run. Refused, as one line naming --store-url: a SQLite file that does not exist (a
mistyped path would otherwise read as "no items added"), a store that records another item
vocabulary than the checkpoint's, an added id the checkpoint holds as a trained item, and added
items with a checkpoint trained without item text (it has no vector to place them by).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ray_app.serve.item_catalogue import catalogue_digest
from ray_app.store.base import AddedItem, StoreUnavailable, redact_url
from ray_app.store.opener import expand_env, open_store
from ray_app.train.data import SetupError


def read_added_items(store_url: str, vocabulary: np.ndarray, places_by_text: bool) -> list[AddedItem]:
    """Every item the store at `store_url` holds beyond `vocabulary` (the checkpoint's trained item
    ids, padding first), in the order they were added; SetupError naming --store-url otherwise.
    `places_by_text`: whether the checkpoint was trained with item text."""
    shown = f"--store-url {redact_url(store_url)}"
    try:
        url = expand_env(store_url)
    except ValueError as e:  # names the variable, never a value
        raise SetupError(f"{shown}: {e}") from None
    if url.startswith("sqlite:///") and url != "sqlite:///" and not Path(url[len("sqlite:///") :]).is_file():
        raise SetupError(f"{shown}: no such store file")
    try:
        store = open_store(url)
    except StoreUnavailable as e:  # its message names the store with the password hidden
        raise SetupError(f"{shown}: the store is unavailable ({e})") from None
    except Exception as e:  # a parser's message may quote part of a password: only the opener's own are shown
        own = isinstance(e, ValueError) and str(e).startswith(("store URL", "unsupported store URL"))
        raise SetupError(
            f"{shown}: {e}" if own else f"{shown}: the store cannot be opened ({type(e).__name__})"
        ) from None
    try:
        held = store.dataset()
        items = store.items_since(0)
    except StoreUnavailable as e:
        raise SetupError(f"{shown}: the store is unavailable ({e})") from None
    except Exception as e:
        raise SetupError(f"{shown}: reading the added items failed ({type(e).__name__})") from None
    finally:
        store.close()
    if held is not None and held.catalogue != catalogue_digest(vocabulary[1:]):
        raise SetupError(
            f"{shown} serves dataset {held.describe()}, whose item vocabulary is not the checkpoint's: "
            "its added items belong to another catalogue"
        )
    trained = set(vocabulary[1:].tolist())
    clash = next((item.item_id for item in items if item.item_id in trained), None)
    if clash is not None:
        raise SetupError(
            f"{shown}: added item {clash!r} is a trained item of the checkpoint: another catalogue's store?"
        )
    if items and not places_by_text:
        raise SetupError(
            f"{shown} holds {len(items)} added item(s), and the checkpoint was trained without item text: "
            "it has no vector to place them by (leave out --store-url, or use a checkpoint trained with text)"
        )
    return items
