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


def _run(cold: float, warm: list[float]) -> dict:
    return {
        "cold_ndcg@10": cold,
        "cold_mrr": cold,
        "cold_median_rank": 100.0,
        "cold_tail_ndcg@10": cold,
        "warm_ndcg@10": float(sum(warm) / len(warm)),
        "warm_users": [1, 2, 3],
        "warm_user_ndcg@10": warm,
    }


def test_the_summary_waits_for_every_seed_of_every_retrain():
    kept = "item bias"
    runs = {
        f"{key}/{s}": _run(0.01 * (1 + s), [0.1, 0.2, 0.3])
        for key, _, _, seeds in cold_items.retrains(kept, {})
        for s in seeds
    }
    done = cold_items.summary(runs, kept, {})
    assert done["complete"] and set(done) == {*cold_items.SUMMARY, "complete"}
    assert abs(done["cold"]["decomposer"] - 0.02) < 1e-12  # the mean over seeds 0, 1, 2
    assert "gru4rec (item ids only)" in done["cold"] and done["warm_change"]["mean"] == 0.0
    # A lever kept before, retrained on every seed, keeps its rows; a screening run alone gets none.
    runs.update({f"decomposer, cold share 0.2/{s}": _run(0.05, [0.1, 0.2, 0.3]) for s in cold_items.SEEDS})
    runs["decomposer, bounded residual 2/0"] = _run(0.07, [0.1, 0.2, 0.3])
    done = cold_items.summary(runs, kept, {})
    assert abs(done["cold"]["decomposer, cold share 0.2"] - 0.05) < 1e-12
    assert "decomposer, bounded residual 2" not in done["cold"]
    assert done["cold"]["decomposer"] == done["cold"][f"decomposer, {kept}"]
    assert done["target"]["compared_with"] == "text similarity to the history"
    # With the new-item bias kept, the decomposer is held to the rule with the same information.
    kept = "new-item bias"
    runs.update({f"{k}/{s}": _run(0.01, [0.1, 0.2, 0.3]) for k, _, _, ss in cold_items.retrains(kept, {}) for s in ss})
    runs[f"{cold_items.RULE_WITH_BONUS}/0"] = _run(0.008, [0.1, 0.2, 0.3])
    runs["text similarity to the history/0"] = _run(0.004, [0.1, 0.2, 0.3])
    target = cold_items.summary(runs, kept, {})["target"]
    assert target["compared_with"] == cold_items.RULE_WITH_BONUS and not target["met"]
    assert abs(target["cold_ratio"] - 1.25) < 1e-9 and abs(target["cold_ratio_to_text_similarity"] - 2.5) < 1e-9
    # A process that retrained one seed leaves the summary to the one that records the last run.
    del runs["sasrec with text, none/1"]
    assert cold_items.summary(runs, kept, {}) is None
