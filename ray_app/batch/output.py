"""The output folder: refused when it exists unless asked to replace it, and replaced whole.

The job writes into a hidden folder beside `--out` and renames it into place once every shard and
the manifest are written: a failed or interrupted run leaves an earlier output as it was (and
removes its own folder when it can). With --overwrite the old folder is renamed aside, the new one
renamed in, and the old one deleted; a reader never meets a mix of two runs' shards.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ray_app.train.data import SetupError

MANIFEST = "_manifest.json"  # a leading underscore: Parquet readers skip it when they read the folder


def check_target(out: Path, overwrite: bool) -> Path:
    """The absolute output folder; SetupError when it exists (and --overwrite is not given) or is a file."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out}: a file, not a folder")
    if out.exists() and not overwrite:
        raise SetupError(f"--out {out} already exists; pass --overwrite to replace it once the new output is complete")
    if not out.parent.is_dir():
        raise SetupError(f"--out {out}: its parent folder does not exist")
    return out


def staging(out: Path) -> Path:
    """A hidden folder beside `out` for this run's shards (the same file system, so a rename publishes it)."""
    return out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"


def publish(tmp: Path, out: Path) -> None:
    """Put the complete `tmp` in place of `out`."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
