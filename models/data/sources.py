"""A named source ("synthetic" or a MovieLens set) → a prepared folder, reused when an identical
request already made a complete one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tqdm.auto import tqdm

from models.data.prepare import FORMAT_VERSION, MANIFEST, is_empty_dir, prepare
from models.data.raw import RawData
from models.files import sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_ML_LATEST_SMALL = REPO_ROOT.parent / "shared" / "data" / "movielens" / "ml-latest-small"


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
    from models.data.download import KNOWN_DATASETS, MOVIELENS_URL, download
    from models.data.movielens import read_movielens
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

    if out_dir.exists() and not overwrite and not is_empty_dir(out_dir):
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
