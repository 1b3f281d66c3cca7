"""Items added while serving (POST /items): their text, and how every replica comes to hold them.

The store holds the added items in the order they were added (`StateStore.add_item`), and their
count is the catalogue's version. No replica is told of a new item; each catches up on its next
request instead:
- a Decomposer reads the count once per batch of requests (one cheap read: SQLite's max(seq),
  Redis's LLEN) and, when it is ahead of what its model holds, reads the items added since;
- the Decomposer's answer carries the catalogue size it ranked with (`UserState.n_items`), so a
  Combiner replica reads the store only when that is ahead of its own;
- an Ingress replica reads the items added since its last read when an answer names an item index
  or a request an item id that it does not know yet.
So an item is rankable on every replica from the first request after its POST was answered, with
no broadcast, and a request costs one small read when nothing is new.

A replica places an added item as the model places any item no training event holds: by its text
alone (`InterestDecomposer.add_items`). The text embedding is kept in the store, so a checkpoint
swap, a restart or a new replica places the same items again with its own model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ray_app.serve.item_catalogue import Catalogue
from ray_app.serve.served_model import ServedModel
from ray_app.store.base import AddedItem, StateStore, StoreUnavailable
from ray_app.store.opener import open_store

log = logging.getLogger("ray.serve")


def genre_rows(items: list[AddedItem], genre_names: list[str]) -> np.ndarray:
    """(k, G) multi-hot rows of the items' genres over the dataset's genre names (unknown: no column)."""
    col = {g: j for j, g in enumerate(genre_names)}
    rows = np.zeros((len(items), len(genre_names)), np.float32)
    for i, item in enumerate(items):
        for g in item.genres:
            if g in col:
                rows[i, col[g]] = 1.0
    return rows


def text_embeddings(items: list[AddedItem]) -> np.ndarray:
    """(k, 384) float32 from the stored bytes."""
    return np.stack([np.frombuffer(item.text_emb, dtype=np.float32) for item in items])


def n_added(served: ServedModel) -> int:
    """How many added items the served model holds (its catalogue beyond the trained vocabulary)."""
    return served.model.cfg.n_items - served.n_trained


@torch.no_grad()
def extend(served: ServedModel, items: list[AddedItem], genre_names: list[str]) -> None:
    """Append `items` to a served model: placed by their text, their ids indexed, the item vectors
    (and any built HNSW graph) extended. Under the model's lock; the ids come last, so a reader
    never meets an id the model does not hold yet."""
    if not items:
        return
    if not served.model.cfg.use_text:  # only a swap gets here: POST /items refuses such a model
        log.warning(
            "version %s was trained without item text: the %d added item(s) have no vector of their own",
            served.version,
            len(items),
        )
    width = served.model.item_genres.shape[1]  # (N+1, G): genre rows feed training's topic loss only
    genres = genre_rows(items, genre_names) if len(genre_names) == width else np.zeros((len(items), width), np.float32)
    with served.lock:
        new = served.model.add_items(text_embeddings(items), genres)
        served.__dict__.pop("item_vecs", None)  # the cached vectors, recomputed on their next use
        if served.indexes:
            vecs = served.item_vecs.detach().cpu().numpy()  # (N+1, D[+1])
            for index in served.indexes.values():
                index.add(vecs[index.n_items + 1 :])
        ids = [item.item_id for item in items]
        served.item_source_ids = np.append(served.item_source_ids, np.array(ids, dtype=object))
        served.index_of.update(zip(ids, new))


def follow(served: ServedModel, store: StateStore | None, genre_names: list[str], at_least: int | None = None) -> None:
    """Bring a served model up to the store's added items. `at_least`: the catalogue size (trained
    and added, without the padding) a request was ranked with upstream: the store is read only when
    the model holds fewer; None: the store's count is read first (one small read)."""
    if store is None:
        return
    have = n_added(served)
    if at_least is not None:
        if at_least <= served.model.cfg.n_items:
            return
    elif store.count_items() <= have:
        return
    items = store.items_since(have)  # read outside the lock: ranking waits only for the append
    with served.lock:  # another reader may have appended some of them meanwhile
        extend(served, items[n_added(served) - have :], genre_names)


@dataclass
class Follower:
    """What a model replica (Decomposer, Combiner) keeps to follow the added items: the store (None:
    no added items, an in-process test) and the dataset's genre names."""

    store: StateStore | None = None
    genre_names: list[str] = field(default_factory=list)
    catalogue_ids: np.ndarray | None = None  # the dataset's vocabulary, for checkpoints without one

    @classmethod
    def open(cls, store: StateStore | str | None, data_dir: str | None) -> Follower:
        """`store`: the replica's own store, or its URL (None: no added items)."""
        cat = Catalogue.load(data_dir)[0] if data_dir else None
        return cls(
            open_store(store) if isinstance(store, str) else store,
            cat.genre_names if cat else [],
            cat.item_source_ids[: cat.n_trained + 1] if cat else None,
        )

    def __call__(self, served: ServedModel, at_least: int | None = None) -> None:
        follow(served, self.store, self.genre_names, at_least)

    def quietly(self, served: ServedModel, where: str) -> None:
        """Follow, or (the store down) log it and go on with the items held: where the request, or
        a swap, needs no store otherwise; the next request catches up."""
        try:
            self(served)
        except StoreUnavailable as e:
            log.warning("%s: reading the added items failed, serving the %d held: %s", where, n_added(served), e)
