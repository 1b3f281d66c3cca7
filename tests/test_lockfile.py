"""The lock files (scripts/lockfile.py): they agree with pyproject.toml, a planted disagreement is named, and
pip resolves the lock's torch to the CPU build without this machine's local wheel folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
lockfile = sys.modules["lockfile"] = importlib.util.module_from_spec(_spec)  # a script, not a package
_spec.loader.exec_module(lockfile)

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What PyPI lists for torch 2.13.0 on CPython 3.11, Linux x86_64: its CUDA build (file name and sha256 as PyPI
# publishes them; requirements-cuda.lock pins the same hash).
PYPI_TORCH = (
    "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "60fcdcb2f3876e21146cb4524ef06397d727ca9ad5f020818547e25075fe3cb7",
)


def test_the_lock_files_agree_with_pyproject():
    assert lockfile.check() == []


def test_pyproject_names_the_cpu_index_for_torch_and_the_locks_pin_its_build():
    pyproject = lockfile._toml(lockfile.PYPROJECT)
    assert lockfile.project_indexes(pyproject) == {"torch": ("pytorch-cpu", CPU_INDEX)}
    for path in (lockfile.LOCK, lockfile.DEV_LOCK):
        lock = lockfile.read(path)
        torch = lock.entries["torch"]
        assert torch.version.endswith("+cpu") and torch.source == CPU_INDEX, path.name
        assert f"--extra-index-url {CPU_INDEX}" in lock.options, path.name
    cuda = lockfile.read(lockfile.CUDA_LOCK).entries["torch"]
    assert "+" not in cuda.version and PYPI_TORCH[1] in cuda.hashes


def _copy(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "requirements.lock", "requirements-dev.lock", "requirements-cuda.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path.name, old)
    path.write_text(text.replace(old, new, 1))


def _pin(name: str, path: Path = lockfile.DEV_LOCK) -> str:
    return lockfile.read(path).entries[name].version


PLANTED = {
    "a range the lock's pin leaves": (
        "pyproject.toml", '"fastapi>=0.115"', '"fastapi>=999"',
        f"fastapi: pyproject.toml asks for fastapi>=999, requirements-dev.lock pins {_pin('fastapi')}",
    ),
    "a new dependency": (
        "pyproject.toml", '"pyyaml>=6",', '"pyyaml>=6", "rich-click>=1",',
        "rich-click: pyproject.toml asks for rich-click>=1, requirements.lock does not pin it",
    ),
    "a dependency dropped": (
        "pyproject.toml", '"pyjwt==2.15.1",', "",
        "pyjwt: requirements.lock pins it for the project, pyproject.toml does not ask for it",
    ),
    "a dev pin moved": (
        "pyproject.toml", '"ruff==0.14.10"', '"ruff==0.15.0"',
        f"ruff: pyproject.toml asks for ruff==0.15.0, requirements-dev.lock pins {_pin('ruff')}",
    ),
    "torch's index no longer declared": (
        "pyproject.toml", 'torch = { index = "pytorch-cpu" }', "",
        f"torch: requirements.lock takes it from {CPU_INDEX}, pyproject.toml names no such source",
    ),
    "torch locked from PyPI": (
        "requirements.lock", f"torch=={_pin('torch')} \\", "torch==2.13.0 \\",
        f"torch: requirements.lock should pin the CPU build from {CPU_INDEX}, it pins 2.13.0",
    ),
    "the CPU index left out of the lock": (
        "requirements.lock", f"--extra-index-url {CPU_INDEX}\n", "",
        f"torch: requirements.lock does not name {CPU_INDEX}",
    ),
    "a hash apart from the dev lock's": (
        "requirements.lock", "    --hash=sha256:" + lockfile.read(lockfile.LOCK).entries["six"].hashes[0],
        "    --hash=sha256:" + "0" * 64,
        f"six: requirements.lock and requirements-dev.lock give other hashes for {_pin('six')}",
    ),
    "the runtime lock's pin apart from the dev lock's": (
        "requirements.lock", f"numpy=={_pin('numpy')} \\", "numpy==2.0.0 \\",
        f"numpy: requirements.lock pins 2.0.0, requirements-dev.lock {_pin('numpy')}",
    ),
}  # fmt: skip


@pytest.mark.parametrize("planted", PLANTED)
def test_a_planted_disagreement_is_named(tmp_path, planted):
    file, old, new, expected = PLANTED[planted]
    root = _copy(tmp_path)
    _edit(root / file, old, new)
    problems = lockfile.check(root)
    assert any(p.startswith(expected) for p in problems), problems


def test_the_check_command_fails_on_a_disagreement(tmp_path):
    root = _copy(tmp_path)
    command = [sys.executable, str(ROOT / "scripts" / "lockfile.py"), "check", "--root", str(root)]
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    _edit(root / "pyproject.toml", '"fastapi>=0.115"', '"fastapi>=999"')
    r = subprocess.run(command, capture_output=True, text=True)
    assert r.returncode == 1 and "fastapi: pyproject.toml asks for fastapi>=999" in r.stderr
    assert "bash scripts/lock.sh" in r.stderr


# -- the lock's torch without the local wheel folder -------------------------------------------------------


def _pip_dry_run(lock_path: Path, tmp_path: Path, indexes: dict[str, str]) -> dict:
    """pip's dry-run install of the lock's torch pin (its index lines, its hashes) with none of this machine's
    pip configuration: no local wheel folder (PIP_FIND_LINKS and pip.conf's find-links), no extra indexes.
    `indexes` replaces the lock's index URLs (stand-ins); the file pip picks, or AssertionError naming it."""
    lock = lockfile.read(lock_path)
    text = "".join(o + "\n" for o in lock.options) + "\n".join(lock.entries["torch"].lines) + "\n"
    for url, stand_in in indexes.items():
        text = text.replace(url, stand_in)
    (tmp_path / "torch.txt").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no configuration file at all
    report = tmp_path / "report.json"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet"]
        + ["--disable-pip-version-check"]
        + ["--report", str(report), "-r", str(tmp_path / "torch.txt")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if r.returncode != 0:
        raise AssertionError(f"pip did not install a file of {lock_path.name}'s torch:\n{r.stdout}{r.stderr}")
    (item,) = json.loads(report.read_text())["install"]
    return item


def _local_cpu_wheel() -> Path | None:
    torch = lockfile.read(lockfile.LOCK).entries["torch"]
    wheels = [w for d in lockfile._find_links() for w in d.glob(f"torch-{torch.version}-cp311-*linux*x86_64.whl")]
    return wheels[0] if wheels else None


def _stand_ins(tmp_path: Path, wheel: Path) -> dict[str, str]:
    """PyPI and the CPU index as simple indexes of what each lists for torch 2.13.0 on this platform: PyPI its
    CUDA build (listed, not there: choosing it fails), the CPU index the CPU wheel found on this disk."""
    pypi, cpu = tmp_path / "pypi" / "torch", tmp_path / "cpu" / "torch"
    for folder, href, name in (
        (pypi, f"{PYPI_TORCH[0]}#sha256={PYPI_TORCH[1]}", PYPI_TORCH[0]),
        (cpu, f"{wheel.as_uri()}#sha256={hashlib.sha256(wheel.read_bytes()).hexdigest()}", wheel.name),
    ):
        folder.mkdir(parents=True)
        (folder / "index.html").write_text(f'<!DOCTYPE html><html><body><a href="{href}">{name}</a></body></html>\n')
    return {lockfile.DEFAULT_INDEX: pypi.parent.as_uri(), CPU_INDEX: cpu.parent.as_uri()}


def test_without_the_local_wheel_folder_the_lock_resolves_torch_to_the_cpu_build(tmp_path):
    """The lock names torch's source: pip, given only the lock (the local wheel folder and pip's configuration
    switched off) and indexes that offer both builds of torch 2.13.0, picks the CPU build's file by its hash.
    Offline: the two indexes are stand-ins (what PyPI lists; the CPU wheel on this disk, whose sha256 the lock
    pins); where download.pytorch.org can be reached, the next test asks the real ones."""
    wheel = _local_cpu_wheel()
    if wheel is None:
        pytest.skip("no CPU wheel of the locked torch in pip's find-links on this machine")
    stand_ins = _stand_ins(tmp_path, wheel)
    item = _pip_dry_run(lockfile.LOCK, tmp_path, stand_ins)  # the dev lock's torch is the same (test above)
    assert item["metadata"]["version"].endswith("+cpu")
    assert (
        item["download_info"]["archive_info"]["hashes"]["sha256"]
        in lockfile.read(lockfile.LOCK).entries["torch"].hashes
    )
    # The same resolve fails for a lock written without the CPU index (PyPI's torch, as requirements-cuda.lock
    # pins it): pip goes for PyPI's CUDA build.
    with pytest.raises(AssertionError, match=re.escape(PYPI_TORCH[0])):
        _pip_dry_run(lockfile.CUDA_LOCK, tmp_path, stand_ins)


def test_the_real_indexes_resolve_torch_to_the_cpu_build(tmp_path):
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        pytest.skip("download.pytorch.org cannot be reached from here (the test above uses stand-ins)")
    item = _pip_dry_run(lockfile.LOCK, tmp_path, {})
    assert item["metadata"]["version"].endswith("+cpu")
    assert item["download_info"]["url"].startswith(CPU_INDEX.rsplit("/whl", 1)[0])


def test_pip_sources_become_uv_options_once_each():
    """setup.sh gives uv the sources pip is configured with (files, PIP_* variables), each once."""
    config = (
        ":env:.find-links='/opt/wheels'\n"
        "global.cert='/etc/ssl/certs/ca.crt'\n"
        "global.extra-index-url='file:///a/simple file:///b/simple'\n"
        "global.find-links='/opt/wheels'\n"
        "user.index-url='https://mirror.example/simple'\n"
    )
    assert lockfile.pip_sources(config) == [
        "--find-links=/opt/wheels",
        "--extra-index-url=file:///a/simple",
        "--extra-index-url=file:///b/simple",
        "--index-url=https://mirror.example/simple",
    ]
    assert lockfile.pip_sources("global.cert='/x'\n") == []


def test_the_pin_of_uv_carries_its_hashes():
    text = lockfile.pin(lockfile.read(lockfile.DEV_LOCK), "uv")
    assert re.match(r"uv==\d", text) and text.count("--hash=sha256:") >= 2
    with pytest.raises(SystemExit, match="pins no nothing-here"):
        lockfile.pin(lockfile.read(lockfile.DEV_LOCK), "nothing-here")
