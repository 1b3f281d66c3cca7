"""The quality benchmark's runner: parallel workers, resuming from its JSON, the deadline."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


def run(tiny_prepared, out, *extra):
    return quality.main(["--prepared", str(tiny_prepared), "--dataset", "tiny", "--device", "cpu", "--epochs", "2",
                         "--patience", "1", "--seeds", "0,1", "--protocols", "loo,last10", "--out", str(out), *extra])


def test_parallel_workers_record_every_run_and_resume(tiny_prepared, tmp_path):
    out = tmp_path / "quality.json"
    assert run(tiny_prepared, out, "--workers", "2", "--variants", "popular;gru4rec") == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {f"{p}/{v}/{s}" for p in ("loo", "last10") for v in ("popular", "gru4rec") for s in (0, 1)}
    r = runs["last10/gru4rec/1"]
    assert 0 <= r["masked"]["ndcg@10"] <= 1 and 0 <= r["valid_ndcg@10"] <= 1 and r["config"]["seed"] == 1
    assert out.with_suffix(".png").stat().st_size > 0
    # A second invocation finds every run recorded and trains nothing again.
    before = out.read_text()
    assert run(tiny_prepared, out, "--variants", "popular;gru4rec") == 0
    assert json.loads(out.read_text())["runs"] == json.loads(before)["runs"]


def test_deadline_starts_no_run_after_it(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "quality.json"
    assert run(tiny_prepared, out, "--variants", "popular", "--deadline", "0") == 0
    assert json.loads(out.read_text())["runs"] == {}
    assert "deadline" in capsys.readouterr().out


def test_unknown_variant_is_named(tiny_prepared, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tiny_prepared, tmp_path / "q.json", "--variants", "popular;transformer-xl")
    assert "transformer-xl" in capsys.readouterr().err
