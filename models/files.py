"""Files written whole or not at all, and their digests: every writer of results, checkpoints,
caches, downloads and secrets goes through `atomic_path`, so a crash mid-write leaves the old file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644):
    """Yield a temporary path beside `path` (created empty, owner-only); on a clean exit it gets
    `mode` and replaces `path` in one rename, on an exception it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str | Path, record, indent: int | None = 1) -> None:
    """`record` as JSON at `path`, atomically (values JSON has no type for are written as text)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=indent, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
