"""A named source ("synthetic", an event log, MovieTweetings, a MovieLens set) → a prepared folder,
reused when an identical request already made a complete one."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from models.data.download import KNOWN_DATASETS
from models.data.errors import DataSourceError
from models.data.prepare import FORMAT_VERSION, MANIFEST, is_empty_dir, prepare
from models.data.raw import RawData
from models.files import sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_ML_LATEST_SMALL = SHARED_DATA / "movielens" / "ml-latest-small"
EVENTS = "events"  # an event log in the documented format (models/data/events.py), from --data-dir
MOVIETWEETINGS_100K = "movietweetings-100k"  # read as an event log (models/data/movietweetings.py)
SHARED_MOVIETWEETINGS_100K = SHARED_DATA / "movietweetings" / MOVIETWEETINGS_100K
DATASETS = ("synthetic", EVENTS, MOVIETWEETINGS_100K, *KNOWN_DATASETS)  # the names every --dataset takes
# Users with fewer events are dropped at preparation (the split needs 3: a training event, validation
# and test). A dataset whose own protocol asks for more has it here; --min-user-events overrides.
DEFAULT_MIN_USER_EVENTS = 3
# MovieTweetings' own protocol: leave-one-out over the users with at least 5 ratings.
DATASET_MIN_USER_EVENTS = {MOVIETWEETINGS_100K: 5}
DATA_DIR_HELP = "the dataset's files: an event-log folder (--dataset events), a MovieTweetings or MovieLens folder"
MIN_USER_EVENTS_HELP = (
    f"drop users with fewer events at preparation (default: the dataset's own: {DEFAULT_MIN_USER_EVENTS}, "
    f"{MOVIETWEETINGS_100K} {DATASET_MIN_USER_EVENTS[MOVIETWEETINGS_100K]})"
)


def min_user_events_for(dataset: str, given: int | None = None) -> int:
    """`given`, else the dataset's own minimum of events per user; below 3 the split cannot be made."""
    n = given if given is not None else DATASET_MIN_USER_EVENTS.get(dataset, DEFAULT_MIN_USER_EVENTS)
    if n < DEFAULT_MIN_USER_EVENTS:
        raise DataSourceError(
            f"--min-user-events {n}: every user needs at least {DEFAULT_MIN_USER_EVENTS} events "
            "(training, validation, test)"
        )
    return n


def existing_dir(data_dir: Path, needs: str) -> Path:
    """`data_dir` resolved, or a one-line error saying what the folder should hold."""
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataSourceError(f"--data-dir {data_dir}: no such folder or file; pass {needs}")
    return path.resolve()


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


def _same_but_for_digests(done: dict | None, asked: dict) -> bool:
    """The same folder and options whose files changed since (an event log that grew)."""
    if not isinstance(done, dict) or "sha256" not in asked:
        return False
    return {k: v for k, v in done.items() if k != "sha256"} == {k: v for k, v in asked.items() if k != "sha256"}


def source(
    dataset: str, data_dir: Path | None, download_dir: Path | None, synthetic_config, progress: bool
) -> tuple[dict, Callable[[], RawData]]:
    """What identifies a dataset's input (for reuse) and how to read it -> (request, load).

    An event log (`events`) is read from `data_dir`; MovieTweetings from `data_dir`, else the copy
    in ../shared; MovieLens from `data_dir` (folder or zip), else ml-latest-small from the checked
    copy in ../shared when present, any other set downloaded into `download_dir` (default:
    ~/.cache/dynamic-interest/movielens).
    """
    if dataset == "synthetic":
        from models.data.synthetic import SyntheticConfig, generate

        config = synthetic_config if synthetic_config is not None else SyntheticConfig()
        return {"dataset": dataset, "input": _jsonable(config)}, lambda: generate(config)
    if dataset == EVENTS:
        from models.data.events import find_file, read_event_log

        needs = "a folder with events.csv or events.parquet and items.csv or items.parquet"
        if data_dir is None:
            raise DataSourceError(f"--dataset events reads --data-dir DIR: pass {needs}")
        folder = existing_dir(data_dir, needs)
        files = [find_file(folder, "events"), find_file(folder, "items")] if folder.is_dir() else []
        # The files' digests, not only the folder: an event log grows in place, and a changed one is prepared again.
        request = {"dataset": dataset, "input": str(folder), "sha256": {f.name: sha256_file(f) for f in files}}
        return request, lambda: read_event_log(folder, name=dataset)
    if dataset == MOVIETWEETINGS_100K:
        from models.data.movietweetings import read_movietweetings

        needs = "the MovieTweetings folder that holds ratings.dat and movies.dat"
        if data_dir is None and not SHARED_MOVIETWEETINGS_100K.is_dir():
            raise DataSourceError(
                f"--dataset {dataset}: no copy at {SHARED_MOVIETWEETINGS_100K}; pass --data-dir: {needs}"
            )
        folder = existing_dir(data_dir or SHARED_MOVIETWEETINGS_100K, needs)
        return {"dataset": dataset, "input": str(folder)}, lambda: read_movietweetings(folder, name=dataset)

    from models.data.download import MOVIELENS_URL, download
    from models.data.encoder import cache_dir
    from models.data.movielens import read_movielens

    if data_dir is None and dataset == "ml-latest-small" and SHARED_ML_LATEST_SMALL.is_dir():
        data_dir = SHARED_ML_LATEST_SMALL
    if data_dir is not None:
        path = existing_dir(data_dir, f"a MovieLens release: its unpacked folder or its .zip ({dataset}.zip)")
        return {"dataset": dataset, "input": str(path)}, lambda: read_movielens(path, name=dataset)
    if dataset not in KNOWN_DATASETS:
        raise DataSourceError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}, or pass data_dir")
    target = Path(download_dir) if download_dir else cache_dir() / "movielens"
    request = {"dataset": dataset, "input": MOVIELENS_URL.format(name=dataset)}
    return request, lambda: read_movielens(download(dataset, target, progress=progress), name=dataset)


def prepare_source(
    dataset: str,
    out_dir: Path,
    data_dir: Path | None = None,
    download_dir: Path | None = None,
    encoder=None,
    overwrite: bool = False,
    synthetic_config=None,
    min_user_events: int | None = None,
    progress: bool = True,
) -> Path:
    """Prepare a named dataset (one of DATASETS; where each is read from: `source`) into `out_dir`.

    `min_user_events` defaults to the dataset's own (`min_user_events_for`). An existing complete
    output made from the same request is returned as is unless `overwrite`; one made from the same
    event-log folder whose files changed since is prepared again. Bad or missing input raises a
    `DataError` whose message is one line with the fix.
    """
    from models.data.encoder import MODEL_NAME

    out_dir = Path(out_dir).expanduser()
    min_user_events = min_user_events_for(dataset, min_user_events)
    request, load = source(dataset, data_dir, download_dir, synthetic_config, progress)
    request["min_user_events"] = min_user_events
    request["encoder"] = getattr(encoder, "model_name", MODEL_NAME) if encoder else MODEL_NAME

    if out_dir.exists() and not overwrite and not is_empty_dir(out_dir):
        manifest = read_manifest_if_complete(out_dir)
        if manifest is not None and manifest.get("request") == request:
            if progress:
                tqdm.write(f"[prepare {dataset}] up to date: {out_dir}")
            return out_dir
        if manifest is not None and _same_but_for_digests(manifest.get("request"), request):
            if progress:
                tqdm.write(f"[prepare {dataset}] the files in {request['input']} changed: preparing them again")
            overwrite = True
        elif manifest is None and _older_format(out_dir):
            if progress:
                tqdm.write(f"[prepare {dataset}] {out_dir} was prepared by an older version: preparing it again")
            overwrite = True
        else:
            why = "is incomplete" if manifest is None else "was prepared from another source or with other options"
            raise FileExistsError(
                f"{out_dir} {why}; remove it or prepare into another folder (overwrite=True replaces it)"
            )
    return prepare(
        load(),
        out_dir,
        encoder=encoder,
        min_user_events=min_user_events,
        overwrite=overwrite,
        progress=progress,
        request=request,
    )
