"""The cold-item benchmark's file, shared by processes that split the screening among them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cold_items  # noqa: E402


def test_each_write_keeps_the_runs_another_process_recorded(tmp_path):
    out = tmp_path / "cold_items_x.json"
    mine = {"benchmark": "cold_items", "runs": {"decomposer, none/0": {"cold_ndcg@10": 0.0}}}
    theirs = {"benchmark": "cold_items", "runs": {"decomposer, item bias/0": {"cold_ndcg@10": 0.1}}}
    cold_items.save(out, mine)
    cold_items.save(out, theirs)  # the other process, which never saw "none"
    assert set(json.loads(out.read_text())["runs"]) == {"decomposer, none/0", "decomposer, item bias/0"}
    mine["runs"]["decomposer, cold share 0.2/0"] = {"cold_ndcg@10": 0.2}
    cold_items.save(out, mine)
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 3 and runs["decomposer, item bias/0"] == {"cold_ndcg@10": 0.1}
    # A run recorded in memory wins over the file's copy of the same key.
    mine["runs"]["decomposer, none/0"] = {"cold_ndcg@10": 0.5}
    cold_items.save(out, mine)
    assert json.loads(out.read_text())["runs"]["decomposer, none/0"] == {"cold_ndcg@10": 0.5}
