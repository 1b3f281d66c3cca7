"""A MovieLens archive fetched from GroupLens: streamed to a temporary file, renamed into place
once its SHA-256 is verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm.auto import tqdm

from models.data.errors import DataError
from models.files import atomic_path, sha256_file

MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
KNOWN_DATASETS = ("ml-latest-small", "ml-100k", "ml-1m", "ml-10m", "ml-25m", "ml-32m")
KNOWN_SHA256 = {
    "ml-1m": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"  # 5,917,549 bytes
}


class DownloadError(DataError, RuntimeError):
    """A download failed or its checksum did not match."""


def download(
    name: str, dest_dir: Path, url: str | None = None, sha256: str | None = None, progress: bool = True
) -> Path:
    """Download `{name}.zip` into dest_dir (streamed to a temp file, renamed when verified).

    The SHA-256 is checked when given or known; on a mismatch nothing is left behind. An
    archive already in place that passes the check is returned without downloading.
    """
    import httpx

    if url is None:
        if name not in KNOWN_DATASETS:
            raise ValueError(f"unknown MovieLens dataset {name!r}; known: {', '.join(KNOWN_DATASETS)} (or pass url=)")
        url = MOVIELENS_URL.format(name=name)
    expected = (sha256 or KNOWN_SHA256.get(name) or "").lower() or None
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}.zip"
    if dest.exists():
        if expected is None or sha256_file(dest) == expected:
            return dest
        dest.unlink()  # a damaged earlier copy
    try:
        h = hashlib.sha256()
        with (
            atomic_path(dest) as tmp,
            open(tmp, "wb") as out,
            httpx.stream("GET", url, follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0)) as resp,
        ):
            resp.raise_for_status()
            total = int(resp.headers.get("content-length", 0)) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress
            ) as bar:
                for chunk in resp.iter_bytes(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            digest = h.hexdigest()
            if expected is not None and digest != expected:  # raised inside: the file is discarded
                raise DownloadError(
                    f"{url}: SHA-256 mismatch (expected {expected}, got {digest}); the download was discarded"
                )
    except httpx.HTTPStatusError as e:
        raise DownloadError(f"cannot download {url}: HTTP {e.response.status_code}") from None
    except httpx.TransportError as e:
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise DownloadError(
            f"cannot download {name} from {url} ({reason}); without network, pass a local copy: "
            f"--data-dir path/to/{dest.name} or its unpacked folder (or put {dest.name} in {dest_dir})"
        ) from None
    return dest
