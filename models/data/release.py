"""Where a MovieLens release's files are: a folder or a zip archive, its format detected from the
files it holds."""

from __future__ import annotations

import zipfile
from pathlib import Path

from models.data.errors import DataFormatError

# Folder names inside the official archives that differ from the dataset name.
FOLDER_ALIASES = {"ml-10m100k": "ml-10m"}
# The files each format needs, in detection order.
FORMATS = {
    "csv": ("ratings.csv", "movies.csv"),  # ml-latest(-small), ml-20m, ml-25m, ml-32m
    "dat": ("ratings.dat", "movies.dat"),  # ml-1m, ml-10m
    "100k": ("u.data", "u.item", "u.genre"),  # ml-100k
}


class Source:
    """The files of one release, in a folder or inside a zip archive, by lower-cased basename."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir():
            dirs = [path] + sorted(p for p in path.iterdir() if p.is_dir())
            groups = {d: {p.name.lower(): p for p in d.iterdir() if p.is_file()} for d in dirs}
            self.kind, self.folder, files = self._detect(groups)
            self._files = {k: str(v) for k, v in files.items()}
        elif path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise DataFormatError(path.name, "not a zip archive and not a folder") from None
            groups: dict[str, dict[str, str]] = {}
            for member in self.zip.namelist():
                if member.endswith("/") or "__MACOSX" in member:
                    continue
                folder, _, base = member.rpartition("/")
                groups.setdefault(folder, {})[base.lower()] = member
            self.kind, folder, self._files = self._detect(groups)
            self.folder = Path(folder) if folder else Path(path.stem)
        else:
            raise FileNotFoundError(f"{path}: no such folder or archive")

    def _detect(self, groups):
        # Shallowest folder first, so that a folder holding several releases is not guessed at.
        for folder, files in sorted(groups.items(), key=lambda kv: len(str(kv[0]).split("/"))):
            for kind, needed in FORMATS.items():
                if all(n in files for n in needed):
                    return kind, folder, files
        for files in groups.values():
            for needed in FORMATS.values():
                if needed[0] in files:
                    missing = ", ".join(n for n in needed if n not in files)
                    raise DataFormatError(self.path.name, f"has {needed[0]} but no {missing}")
        raise DataFormatError(
            self.path.name,
            "no MovieLens files found (expected ratings.csv + "
            "movies.csv, ratings.dat + movies.dat, or u.data + u.item + u.genre)",
        )

    def has(self, name: str) -> bool:
        return name in self._files

    def display(self, name: str) -> str:
        if self.zip is not None:
            return f"{self.path.name}:{self._files[name]}"
        return name

    def local_path(self, name: str) -> str | None:
        return None if self.zip is not None else self._files[name]

    def open(self, name: str):
        if self.zip is not None:
            return self.zip.open(self._files[name])
        return open(self._files[name], "rb")

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        """UTF-8, falling back to latin-1 (ml-1m and ml-100k are latin-1)."""
        data = self.read_bytes(name)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        if not text.strip():
            raise DataFormatError(self.display(name), "file is empty", line=1)
        return text
