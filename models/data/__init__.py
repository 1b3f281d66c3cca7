"""Data: sources (an event log, MovieLens, synthetic) → RawData → prepared Parquet → InteractionData."""

from models.data.dataset import InteractionData, load_prepared
from models.data.errors import DataError, DataFormatError, DataSourceError
from models.data.download import KNOWN_DATASETS, DownloadError, download
from models.data.events import read_event_log
from models.data.movielens import read_movielens
from models.data.prepare import intent_phrases, item_text, prepare
from models.data.sources import DATASETS, prepare_source
from models.data.raw import ITEMS_SCHEMA, RATINGS_SCHEMA, RawData

__all__ = [
    "DATASETS",
    "DataError",
    "DataFormatError",
    "DataSourceError",
    "DownloadError",
    "ITEMS_SCHEMA",
    "InteractionData",
    "KNOWN_DATASETS",
    "RATINGS_SCHEMA",
    "RawData",
    "download",
    "intent_phrases",
    "item_text",
    "load_prepared",
    "prepare",
    "prepare_source",
    "read_event_log",
    "read_movielens",
]
