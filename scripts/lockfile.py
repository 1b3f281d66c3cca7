"""The lock files: written from pyproject.toml by uv, split by source for pip, checked against pyproject.toml.

    python scripts/lockfile.py lock [--upgrade]   write the lock files (bash scripts/lock.sh)
    python scripts/lockfile.py check              each lock file agrees with pyproject.toml (exit 1 naming each disagreement)
    python scripts/lockfile.py covers             this Python is one the lock files were resolved for (exit 1 if not)
    python scripts/lockfile.py split LOCK DIR     DIR/default.txt: the packages from the default index;
                                                  DIR/extra.txt: those from another index (torch's CPU index), with it
    python scripts/lockfile.py stale FILE...      installed packages that none of FILE pins (run with .venv's Python)
    python scripts/lockfile.py pin LOCK NAME      NAME's pin in LOCK, with its hashes (a requirements file of one)
    python scripts/lockfile.py pip-sources        pip's configured sources as uv's options, one per line

The lock files are pip requirements files with a sha256 for every file a pin may install, resolved for
CPython 3.11 on Linux x86_64 (the Ray image's Python): requirements-dev.lock (the project and its dev extra),
requirements.lock (the project, the same pins) and requirements-cuda.lock (the project with PyPI's CUDA build
of torch instead of the CPU build, the same pins otherwise). `covers`, `split`, `stale`, `pin` and `pip-sources` need only the
standard library (scripts/setup.sh runs them before the project's packages are there); `check` needs `packaging`.
scripts/setup.sh installs the split files with uv (pinned in requirements-dev.lock, installed by pip from its
own pin and hashes) given pip's sources, so both installers read the same folders and indexes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
DEV_LOCK, LOCK, CUDA_LOCK = (ROOT / n for n in ("requirements-dev.lock", "requirements.lock", "requirements-cuda.lock"))
PROJECT = "dynamic-interest"
DEFAULT_INDEX = "https://pypi.org/simple"
# What the lock files are resolved for: uv's --python-version and --python-platform, and the same target as
# the environment markers of pyproject.toml's requirements are evaluated in.
PYTHON, UV_PLATFORM = "3.11", "x86_64-manylinux_2_28"
TARGET_MARKERS = {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": PYTHON,
    "python_full_version": PYTHON + ".0",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}
REGENERATE = "regenerate them with `bash scripts/lock.sh` and commit them with pyproject.toml"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Entry:
    """One pinned package of a lock file, as uv writes it: the pin, its hashes, `# via` and `# from` lines."""

    name: str  # canonical
    version: str
    lines: list[str]
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)  # what requires it: packages, or "dynamic-interest (pyproject.toml)"
    source: str | None = None  # the index it comes from (uv's --emit-index-annotation)


@dataclass
class Lock:
    path: Path
    options: list[str]  # --index-url / --extra-index-url lines
    entries: dict[str, Entry]

    def index_urls(self) -> list[str]:
        return [
            line.split(None, 1)[1] for line in self.options if line.startswith(("--index-url", "--extra-index-url"))
        ]


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)")


def read(path: Path) -> Lock:
    options, entries, current = [], {}, None
    in_via = False
    for line in path.read_text().splitlines():
        if line.startswith("--"):
            options.append(line.strip())
            current = None
        elif m := PIN.match(line):
            current = Entry(canonical(m[1]), m[2], [line])
            entries[current.name] = current
            in_via = False
        elif current is not None and line.startswith(" "):
            current.lines.append(line)
            text = line.strip().rstrip("\\").strip()
            current.hashes += re.findall(r"--hash=sha256:([0-9a-f]{64})", text)
            if text.startswith("# via"):
                rest = text[len("# via") :].strip()
                current.via += [rest] if rest else []
                in_via = not rest
            elif text.startswith("# from "):
                current.source, in_via = text[len("# from ") :].strip(), False
            elif in_via and text.startswith("#   "):
                current.via.append(text[1:].strip())
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{path.name}: a line that is not a pin of one version: {line!r}")
    return Lock(path, options, entries)


# -- writing: uv -------------------------------------------------------------------------------------------


def _toml(path: Path) -> dict:
    import tomllib  # Python 3.11: `covers` must run on an older Python to say it is one

    return tomllib.loads(path.read_text())


def project_indexes(pyproject: dict) -> dict[str, tuple[str, str]]:
    """Each package [tool.uv.sources] sends to a named index (torch) -> (that index's name, its URL)."""
    uv = pyproject.get("tool", {}).get("uv", {})
    urls = {i["name"]: i["url"].rstrip("/") for i in uv.get("index", [])}
    return {canonical(n): (s["index"], urls[s["index"]]) for n, s in uv.get("sources", {}).items() if "index" in s}


def _reachable(url: str) -> bool:
    try:
        socket.getaddrinfo(urllib.parse.urlsplit(url).hostname, 443)
    except OSError:
        return False
    return True


def _find_links() -> list[Path]:
    """The folders of pip's find-links (its configuration and PIP_FIND_LINKS): where pip finds local wheels."""
    found = [o.split("=", 1)[1] for o in pip_sources() if o.startswith("--find-links=")]
    return [Path(p) for p in found + os.environ.get("PIP_FIND_LINKS", "").split() if Path(p).is_dir()]


def _stand_in_index(folder: Path, packages: list[str]) -> str:
    """A simple index (PEP 503) in `folder` of the local wheels of `packages`, for an index this machine cannot reach."""
    for package in packages:
        # The index [tool.uv.index] names is PyTorch's CPU index: its wheels carry the local version "+cpu".
        wheels = sorted({w.resolve() for d in _find_links() for w in d.glob(f"{package}-*+cpu-*.whl")})
        if not wheels:
            raise SystemExit(
                f"error: the index of {package} cannot be reached from here and pip's find-links hold no CPU wheel of it"
            )
        links = "".join(
            f'<a href="{w.as_uri()}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">{w.name}</a>\n' for w in wheels
        )
        (folder / package).mkdir(parents=True)
        (folder / package / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return folder.as_uri()


def _pins(lock: Lock, leave_out: set[str]) -> str:
    return "".join(f"{e.name}=={e.version}\n" for e in lock.entries.values() if e.name not in leave_out)


def write_locks(upgrade: bool = False) -> None:
    """requirements-dev.lock first; requirements.lock and requirements-cuda.lock with its pins as constraints."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise SystemExit("error: uv is not installed (it comes with the dev extra: bash scripts/setup.sh dev)")
    indexes = project_indexes(_toml(PYPROJECT))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        substitutes, index_args = {}, []
        for index, url in sorted(set(indexes.values())):
            if not _reachable(url):  # the same wheels, found where pip finds them on this machine
                packages = sorted(n for n, (i, _) in indexes.items() if i == index)
                stand_in = _stand_in_index(tmp / index, packages)
                substitutes[stand_in] = url
                index_args += ["--index", f"{index}={stand_in}"]
                print(f"{url} cannot be reached: {', '.join(packages)} from pip's find-links", file=sys.stderr)
        compile_ = [
            uv, "pip", "compile", str(PYPROJECT), "--quiet", "--generate-hashes", "--emit-index-url",
            "--emit-index-annotation", "--python-version", PYTHON, "--python-platform", UV_PLATFORM,
            "--index-url", DEFAULT_INDEX, "--custom-compile-command", "bash scripts/lock.sh",
        ]  # fmt: skip

        def run(args: list[str], out: Path) -> None:
            subprocess.run(compile_ + args + ["-o", str(out)], check=True, cwd=ROOT)
            text = out.read_text()
            for stand_in, url in substitutes.items():
                text = text.replace(stand_in, url)
            # The constraints (the dev lock's pins) are not a reason a package is there: uv's "-c FILE" lines go.
            out.write_text(
                "".join(line for line in text.splitlines(True) if not re.match(r"\s+#(\s+via)?\s+-c ", line))
            )

        run(index_args + ["--extra", "dev"] + (["--upgrade"] if upgrade else []), DEV_LOCK)
        (tmp / "pins.txt").write_text(_pins(read(DEV_LOCK), set()))
        run(index_args + ["-c", str(tmp / "pins.txt")], LOCK)
        # PyPI's torch (its CUDA build) and what it brings; every other pin as in the dev lock.
        (tmp / "pins-cuda.txt").write_text(_pins(read(DEV_LOCK), set(indexes)))
        run(["--no-sources", "-c", str(tmp / "pins-cuda.txt")], CUDA_LOCK)
    print("wrote " + ", ".join(p.name for p in (DEV_LOCK, LOCK, CUDA_LOCK)))


# -- checking: the lock files against pyproject.toml -----------------------------------------------------------


def _requirements(pyproject: dict, extras: tuple[str, ...]) -> list:
    from packaging.requirements import Requirement

    project = pyproject["project"]
    texts = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    env = dict(TARGET_MARKERS, extra="")
    reqs = [Requirement(t) for t in texts]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def check_lock(pyproject: dict, lock: Lock, extras: tuple[str, ...], cuda: bool = False) -> list[str]:
    """What in `lock` disagrees with pyproject.toml (its requirements with `extras`): each line names the package."""
    from packaging.version import Version

    problems = []
    name = lock.path.name
    wanted = {canonical(r.name): r for r in _requirements(pyproject, extras)}
    for package, req in wanted.items():
        entry = lock.entries.get(package)
        if entry is None:
            problems.append(f"{package}: pyproject.toml asks for {req}, {name} does not pin it")
        elif not req.specifier.contains(entry.version, prereleases=True):
            problems.append(f"{package}: pyproject.toml asks for {req}, {name} pins {entry.version}")
    for entry in lock.entries.values():
        if not entry.hashes:
            problems.append(f"{entry.name}: {name} gives no hash for it")
        project_via = any(v.split()[0] == PROJECT for v in entry.via)
        if project_via and entry.name not in wanted:
            problems.append(f"{entry.name}: {name} pins it for the project, pyproject.toml does not ask for it")
        parents = [v for v in entry.via if v.split()[0] != PROJECT]
        missing = [p for p in parents if canonical(p.split()[0]) not in lock.entries]
        if missing or not (project_via or parents):
            problems.append(
                f"{entry.name}: {name} pins it for {', '.join(missing) or 'nothing'}, which it does not pin"
            )
    # The sources: packages [tool.uv.sources] sends to an index come from it (the CPU build of torch), unless CUDA;
    # every other package from the default index.
    indexes = project_indexes(pyproject)
    for entry in lock.entries.values():
        if entry.name not in indexes and entry.source not in (None, DEFAULT_INDEX):
            problems.append(f"{entry.name}: {name} takes it from {entry.source}, pyproject.toml names no such source")
    for package, (_, url) in indexes.items():
        entry = lock.entries.get(package)
        if entry is None:
            continue
        local = Version(entry.version).local
        if cuda:
            if entry.source != DEFAULT_INDEX or local is not None:
                problems.append(
                    f"{package}: {name} should pin PyPI's build, it pins {entry.version} from {entry.source}"
                )
        else:
            if entry.source != url or local != "cpu":
                problems.append(
                    f"{package}: {name} should pin the CPU build from {url}, it pins {entry.version} from {entry.source}"
                )
            if url not in lock.index_urls():
                problems.append(
                    f"{package}: {name} does not name {url} (--extra-index-url), so pip cannot find the CPU build"
                )
    return problems


def check(root: Path = ROOT) -> list[str]:
    """Every disagreement between root's pyproject.toml and its three lock files, one line each."""
    dev, plain, cuda = (root / p.name for p in (DEV_LOCK, LOCK, CUDA_LOCK))
    pyproject = _toml(root / PYPROJECT.name)
    locks = {p: read(p) for p in (dev, plain, cuda)}
    problems = (
        check_lock(pyproject, locks[dev], ("dev",))
        + check_lock(pyproject, locks[plain], ())
        + check_lock(pyproject, locks[cuda], (), cuda=True)
    )
    # One set of pins: the runtime and CUDA locks pin what the dev lock pins (but the indexed packages in CUDA).
    indexed = set(project_indexes(pyproject))
    for path, leave_out in ((plain, set()), (cuda, indexed)):
        for e in locks[path].entries.values():
            d = locks[dev].entries.get(e.name)
            if d is None or e.name in leave_out:
                continue
            if d.version != e.version:
                problems.append(f"{e.name}: {path.name} pins {e.version}, {dev.name} {d.version}")
            elif set(d.hashes) != set(e.hashes):
                problems.append(f"{e.name}: {path.name} and {dev.name} give other hashes for {e.version}")
    return problems


# -- installing: what scripts/setup.sh asks ---------------------------------------------------------------------


def covers() -> str | None:
    """Why this Python is not one the lock files were resolved for, or None."""
    here = f"{platform.python_implementation()} {platform.python_version()} on {sys.platform} {platform.machine()}"
    ok = (
        platform.python_implementation() == "CPython"
        and ".".join(platform.python_version_tuple()[:2]) == PYTHON
        and sys.platform == "linux"
        and platform.machine() == "x86_64"
    )
    return None if ok else f"the lock files are resolved for CPython {PYTHON} on linux x86_64, this is {here}"


def split(lock: Lock, folder: Path) -> None:
    """pip asks every index it is given for every package: torch's index is given for torch alone."""
    folder.mkdir(parents=True, exist_ok=True)
    default = [e for e in lock.entries.values() if e.source in (None, DEFAULT_INDEX)]
    extra = [e for e in lock.entries.values() if e.source not in (None, DEFAULT_INDEX)]
    options = []
    for url in sorted({e.source for e in extra}):
        if _reachable(url):
            options.append(f"--extra-index-url {url}")
        else:  # pip would retry it for half a minute; the locked wheel can only come from pip's find-links
            options.append(f"# {url} cannot be reached: the pinned files must be in pip's find-links")
    (folder / "default.txt").write_text("".join("\n".join(e.lines) + "\n" for e in default))
    (folder / "extra.txt").write_text(
        "".join(o + "\n" for o in options) + "".join("\n".join(e.lines) + "\n" for e in extra)
    )


def stale(files: list[Path]) -> list[str]:
    keep = {"pip", PROJECT} | {n for f in files for n in read(f).entries}
    installed = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions() if d.metadata["Name"]}
    return sorted(installed - keep)


def pin(lock: Lock, name: str) -> str:
    """One package's entry of a lock file as a requirements file: the pin and its hashes."""
    entry = lock.entries.get(canonical(name))
    if entry is None:
        raise SystemExit(f"error: {lock.path.name} pins no {name}")
    return "\n".join(entry.lines) + "\n"


SOURCE_KEYS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}


def pip_sources(config: str | None = None) -> list[str]:
    """pip's index URLs and find-links (its configuration files and PIP_* variables) as uv's options."""
    if config is None:
        config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    out: list[str] = []
    for line in config.splitlines():
        key, _, value = line.partition("=")
        option = SOURCE_KEYS.get(key.rsplit(".", 1)[-1])
        if option:
            for v in value.strip().strip("'\"").split():
                if f"{option}={v}" not in out:
                    out.append(f"{option}={v}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("lock").add_argument("--upgrade", action="store_true", help="the newest releases allowed")
    commands.add_parser("check").add_argument("--root", type=Path, default=ROOT, help="the project's folder")
    commands.add_parser("covers")
    p = commands.add_parser("split")
    p.add_argument("lock", type=Path)
    p.add_argument("folder", type=Path)
    commands.add_parser("stale").add_argument("files", type=Path, nargs="+")
    p = commands.add_parser("pin")
    p.add_argument("lock", type=Path)
    p.add_argument("name")
    commands.add_parser("pip-sources")
    args = parser.parse_args(argv)
    if args.command == "lock":
        write_locks(args.upgrade)
    elif args.command == "check":
        problems = check(args.root)
        if problems:
            print("the lock files disagree with pyproject.toml:", *problems, REGENERATE, sep="\n  ", file=sys.stderr)
            return 1
    elif args.command == "covers":
        if reason := covers():
            print(
                f"error: {reason}; run it with CPython {PYTHON}: PYTHON=python{PYTHON} bash scripts/setup.sh",
                file=sys.stderr,
            )
            return 1
    elif args.command == "split":
        split(read(args.lock), args.folder)
    elif args.command == "stale":
        print("\n".join(stale(args.files)))
    elif args.command == "pin":
        print(pin(read(args.lock), args.name), end="")
    elif args.command == "pip-sources":
        print("\n".join(pip_sources()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
