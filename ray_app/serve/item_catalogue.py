"""The item side the Ingress answers with, without the model: titles, genres and ids by catalogue
index, the items added while serving appended, and the dataset's record in a store. Nothing here
imports torch, so an Ingress replica starts without it (`ray_app/serve/served_model.py` holds the model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.data import InteractionData, load_prepared
from models.data.prepare import item_text
from ray_app.serve.schemas import MAX_ITEM_ID_CHARS
from ray_app.store.base import AddedItem, DatasetRecord, Event


class ServingSetupError(ValueError):
    """A checkpoint or dataset the app cannot serve; the message names the path."""


@dataclass
class Catalogue:
    """Item side of a prepared dataset: titles and genres by source id, for the responses."""

    item_source_ids: np.ndarray  # (N+1,) model index -> source id (str)
    titles: list[str]  # (N+1,)
    genres: list[list[str]]  # (N+1,)
    index_of: dict[str, int]  # source item id (the API's `item_id`) -> model index
    genre_names: list[str] = field(default_factory=list)  # (G,) the dataset's genres
    n_trained: int = 0  # the dataset's items; those after them were added while serving

    @classmethod
    def from_data(cls, data: InteractionData) -> Catalogue:
        """ServingSetupError for a catalogue with an id longer than a request may send."""
        names = np.asarray(data.genre_names, dtype=object)
        genres = [list(names[row > 0]) for row in data.item_genres]
        ids = data.item_source_ids
        long = next((s for s in ids[1:] if len(s) > MAX_ITEM_ID_CHARS), None)
        if long is not None:
            raise ServingSetupError(
                f"{data.path}: item id {long[:40]!r}... is longer than the {MAX_ITEM_ID_CHARS} characters "
                "an API request may send; shorten the ids in the event log"
            )
        return cls(ids, list(data.titles), genres, vocabulary_index(ids), list(data.genre_names), len(ids) - 1)

    @classmethod
    def load(cls, data_dir: str | Path) -> tuple[Catalogue, InteractionData]:
        try:
            data = load_prepared(data_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ServingSetupError(f"data_dir {data_dir}: {e}") from e
        return cls.from_data(data), data

    @property
    def n_items(self) -> int:
        return len(self.item_source_ids) - 1

    def unknown(self, source_ids) -> list[int]:
        """Positions of source ids not in the catalogue."""
        return [j for j, s in enumerate(source_ids) if s not in self.index_of]

    def describe(self, idx: int, score: float | None = None) -> dict:
        out = {"item_id": str(self.item_source_ids[idx]), "title": self.titles[idx], "genres": self.genres[idx]}
        if score is not None:
            out["score"] = float(score)
        return out


def training_user_events(data: InteractionData, chunk: int = 1000) -> Iterator[dict[str, list[Event]]]:
    """The dataset's users as store events, keyed str(source user id), `chunk` users at a time
    (a large dataset as Python objects all at once would not fit in a replica's memory)."""
    src = data.item_source_ids[data.items]
    for lo in range(1, data.n_users + 1, chunk):
        out = {}
        for u in range(lo, min(lo + chunk, data.n_users + 1)):
            sl = data.user_events(u)
            out[str(data.user_source_ids[u])] = [
                Event(str(i), float(r), float(t)) for i, r, t in zip(src[sl], data.ratings[sl], data.timestamps[sl])
            ]
        yield out


def vocabulary_index(item_source_ids: np.ndarray) -> dict[str, int]:
    """(N+1,) source ids ([0] padding) -> {source id: model index}."""
    return {str(s): i for i, s in enumerate(item_source_ids) if i > 0}


def _id_list(ids) -> bytes:
    return json.dumps([str(x) for x in ids]).encode()


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # framed: no two sequences of parts hash alike
        h.update(part)
    return h.hexdigest()


def catalogue_digest(item_source_ids) -> str:
    """The digest a store's dataset record keeps of an item vocabulary (source ids, padding left out)."""
    return _digest(_id_list(item_source_ids))


def dataset_record(data: InteractionData) -> DatasetRecord:
    """What a store loaded with `data`'s users records: the dataset's name, a digest of the users'
    events (ids, items, ratings, times) and one of the item vocabulary. Computed from the content,
    so preparing the same data again gives the same record."""
    catalogue = catalogue_digest(data.item_source_ids[1:])
    events = _digest(
        _id_list(data.user_source_ids[1:]),
        np.asarray(data.user_offsets, "<i8").tobytes(),
        np.asarray(data.items, "<i8").tobytes(),
        np.asarray(data.ratings, "<f4").tobytes(),
        np.asarray(data.timestamps, "<f8").tobytes(),
        catalogue.encode(),
    )
    return DatasetRecord(str(data.manifest.get("dataset", data.path.name)), events, catalogue)


def added_item_text(title: str, genres: list[str], tags: list[str], description: str) -> str:
    """The text the encoder embeds: preparation's recipe ("Title. Genres: a, b. Tags: x, y"),
    then the description, when there is one, as its last sentence."""
    text = item_text(title, genres, tags)
    description = description.strip()
    return f"{text}. {description}" if text and description else text or description


def extend_catalogue(cat: Catalogue, items: list[AddedItem]) -> None:
    """The Ingress's catalogue (titles and genres by index) with the added items appended (the
    items after its first `catalogue_added(cat)`, read under one lock: the indices are the store's order)."""
    for item in items:
        cat.item_source_ids = np.append(cat.item_source_ids, np.array([item.item_id], dtype=object))
        cat.titles.append(item.title)
        cat.genres.append(list(item.genres))
        cat.index_of[item.item_id] = len(cat.item_source_ids) - 1


def catalogue_added(cat: Catalogue) -> int:
    return cat.n_items - cat.n_trained
