"""Atomic writes: a crash mid-write leaves the old file; a finished one replaces it with its mode."""

from __future__ import annotations

import stat

import pytest

from models.files import atomic_path, sha256_file


def test_a_crash_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out" / "result.json"
    with atomic_path(path) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_the_finished_file_gets_its_mode(tmp_path, mode):
    path = tmp_path / "secret"
    with atomic_path(path, mode=mode) as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # owner-only while it is written
        tmp.write_text("x")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert sha256_file(path) == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
