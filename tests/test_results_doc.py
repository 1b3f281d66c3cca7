"""docs/results.md's tables are what benchmarks/results/*.json hold (benchmarks/results_doc.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "results_doc.py"


def check(doc: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--doc", str(doc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_table_matches_its_results_file():
    done = check(ROOT / "docs" / "results.md")
    assert done.returncode == 0, done.stderr


def test_a_table_edited_by_hand_is_named(tmp_path):
    text = (ROOT / "docs" / "results.md").read_text()
    start = text.index("<!-- table: ray_train")
    row = text.index("| plain local loop |", start)
    end = text.index("\n", row)
    doc = tmp_path / "results.md"
    doc.write_text(text[:row] + "| plain local loop | 1.0 | 1 | 0.9999 |" + text[end:])
    done = check(doc)
    assert done.returncode == 1 and "ray_train ray_train.json" in done.stderr
    subprocess.run([sys.executable, str(SCRIPT), "--doc", str(doc)], cwd=ROOT, check=True, capture_output=True)
    assert doc.read_text() == text


def test_reads_follows_each_models_config_and_the_searchs_fixed_settings():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_doc import _reads

    assert _reads({"kind": "sasrec", "fixed": []}) == "ids"
    assert _reads({"kind": "sasrec", "fixed": ["use_text=true", "use_events=true"]}) == "ids, text, ratings, times"
    assert _reads({"kind": "lstm", "fixed": ["use_text=false"]}) == "ids, ratings, times"
    assert _reads({"kind": "gru4rec", "fixed": []}) == "ids"


def test_a_figure_in_prose_is_checked_against_its_file(tmp_path):
    """Inline figure markers: a path into a results file, a format, a reduction over `*`."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.json").write_text('{"runs": {"0": {"ndcg": 0.07}, "1": {"ndcg": 0.08}}, "ratio": 1.0312}')
    doc = tmp_path / "page.md"
    good = (
        "mean <!-- fig: r.json runs/*/ndcg .3f mean -->0.075<!-- /fig -->, "
        "ratio <!-- fig: r.json ratio .2f -->1.03<!-- /fig -->\n"
    )
    doc.write_text(good)
    run = [sys.executable, str(SCRIPT), "--doc", str(doc), "--results", str(results)]
    assert subprocess.run([*run, "--check"], cwd=ROOT, capture_output=True).returncode == 0
    doc.write_text(good.replace("1.03", "1.10"))  # a figure typed by hand
    done = subprocess.run([*run, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "figure 'r.json ratio .2f'" in done.stderr
    subprocess.run(run, cwd=ROOT, check=True, capture_output=True)
    assert doc.read_text() == good


def test_a_key_that_holds_a_slash_is_addressed_whole():
    from results_doc import lookup

    runs = {"runs": {"decomposer, none/0": {"ndcg": 0.1}, "a": {"b": 2}}}
    assert lookup(runs, "runs/decomposer, none/0/ndcg".split("/")) == [0.1]
    assert lookup(runs, "runs/a/b".split("/")) == [2]
    assert lookup(runs, "runs/*/ndcg".split("/")[:2]) == [{"ndcg": 0.1}, {"b": 2}]
