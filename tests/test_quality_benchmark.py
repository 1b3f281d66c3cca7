"""The quality benchmark's runner, as its users call it: parallel workers, resuming, the deadline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tiny_prepared, out, *extra) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "quality.py"),
        "--prepared",
        str(tiny_prepared),
        "--dataset",
        "tiny",
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--patience",
        "1",
        "--seeds",
        "0,1",
        "--protocols",
        "loo,last10",
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_parallel_workers_record_every_run_and_resume(tiny_prepared, tmp_path):
    out = tmp_path / "quality.json"
    first = run(tiny_prepared, out, "--workers", "2", "--variants", "popular;gru4rec")
    assert first.returncode == 0, first.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {f"{p}/{v}/{s}" for p in ("loo", "last10") for v in ("popular", "gru4rec") for s in (0, 1)}
    r = runs["last10/gru4rec/1"]
    assert 0 <= r["masked"]["ndcg@10"] <= 1 and 0 <= r["valid_ndcg@10"] <= 1 and r["config"]["seed"] == 1
    assert out.with_suffix(".png").stat().st_size > 0
    # A second invocation finds every run recorded and trains nothing again.
    again = run(tiny_prepared, out, "--variants", "popular;gru4rec")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(out.read_text())["runs"] == runs


def test_deadline_starts_no_run_after_it(tiny_prepared, tmp_path):
    out = tmp_path / "quality.json"
    done = run(tiny_prepared, out, "--variants", "popular", "--deadline", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["runs"] == {}
    assert "deadline" in done.stdout


def test_unknown_variant_is_named(tiny_prepared, tmp_path):
    done = run(tiny_prepared, tmp_path / "q.json", "--variants", "popular;transformer-xl")
    assert done.returncode == 2 and "transformer-xl" in done.stderr


def test_primary_comparison_and_intent_table_are_recorded(tiny_prepared, tmp_path):
    """The declared comparison carries both means, their ratio and a seed-and-user interval; the
    intent table names, per regime, the strongest baseline that got the same words."""
    out = tmp_path / "quality.json"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    variants = ";".join(
        [
            "decomposer",
            quality.TEXT_SASREC,
            "sasrec (mask seen), weights averaged",
            "text retrieval",
            "phrase popularity",
        ]
    )
    done = run(tiny_prepared, out, "--protocols", "last10", "--variants", variants, "--by-variant")
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    p = record["primary"]
    assert (p["model"], p["baseline"], p["protocol"]) == ("decomposer", quality.TEXT_SASREC, "last10")
    assert p["ratio"] == round(p["model_mean"] / p["baseline_mean"], 4) and p["lo"] <= p["hi"]
    assert p["seeds"] == [2, 2]
    assert set(record["intent"]) == {"oracle", "noisy", "wrong", "history"}
    for regime, row in record["intent"].items():
        assert row["oracle"] == (regime == "oracle")
        assert row["baseline_name"] in (
            "text retrieval",
            "phrase popularity",
            *(quality.fused_name(v) for v in quality.FUSED),
        )
        key = f"last10/{quality.intent_name(row['baseline_name'], regime)}/0"
        assert record["runs"][key]["intent"] == regime
    fused = record["runs"][f"last10/{quality.intent_name(quality.fused_name(quality.TEXT_SASREC), 'noisy')}/1"]
    assert fused["fusion_weight"] in quality.FUSION_WEIGHTS
    assert "Primary comparison (declared before the runs)" in done.stdout and "Exploratory" in done.stdout


def test_cold_start_targets_are_the_items_no_training_event_holds(tiny_data):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    import quality
    from models.data.batching import make_split

    split = make_split(tiny_data.user_offsets, 5)
    rows = quality.cold_rows(tiny_data, split)
    train_items = set()
    for u in range(len(split.user_start)):
        train_items |= set(tiny_data.items[split.user_start[u] : split.valid_pos[u]].tolist())
    expect = [i for i, t in enumerate(tiny_data.items[split.test_pos]) if t not in train_items]
    assert rows.tolist() == expect and len(expect) > 0
    assert np.isin(tiny_data.items[split.test_pos[rows]], list(train_items)).sum() == 0


def test_repeated_targets_are_marked_and_the_new_target_figure_ignores_them(tiny_data):
    """Under the mask a repeated target is the only seen item left: the seen-first rule puts it
    first. The figure on new targets leaves those out, and there the rule is most-popular."""
    import numpy as np
    from models.data.batching import make_split
    from models.evaluation.evaluate import evaluate
    from models.training.loop import new_model

    split = make_split(tiny_data.user_offsets, 5)
    rule, pop = (new_model(k, tiny_data, split) for k in ("seen-popular", "popular"))
    ev, base = (evaluate(m, tiny_data, split, "test") for m in (rule, pop))
    rep = ev["repeat"]
    assert rep.any() and (~rep).any()
    for t in np.nonzero(rep)[0]:
        u = split.test_user[t]
        assert tiny_data.items[split.test_pos[t]] in tiny_data.items[split.user_start[u] : split.test_pos[t]]
    assert (ev["masked"]["ndcg@10"][rep] == 1.0).all()  # handed to the rule by the mask
    np.testing.assert_allclose(ev["masked"]["ndcg@10"][~rep], base["masked"]["ndcg@10"][~rep])


def test_killing_the_benchmark_ends_its_workers(tiny_prepared, tmp_path):
    """SIGKILL of the benchmark leaves no worker training on by itself."""
    import os
    import signal
    import time

    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "quality.py"),
        "--prepared",
        str(tiny_prepared),
        "--dataset",
        "tiny",
        "--device",
        "cpu",
        "--epochs",
        "500",
        "--patience",
        "500",
        "--seeds",
        "0,1",
        "--protocols",
        "loo",
        "--workers",
        "2",
        "--variants",
        "gru4rec",
        "--out",
        str(tmp_path / "q.json"),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split("\n")[1:]
        return [int(p) for p, pp in (line.split() for line in out if line.strip()) if int(pp) == proc.pid]

    deadline = time.monotonic() + 120
    while len(children()) < 2 and time.monotonic() < deadline:  # the pool's workers (and its tracker)
        time.sleep(0.5)
    workers = children()
    assert len(workers) >= 2, "the pool did not start"
    time.sleep(5)  # the workers are training now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(1)
        alive = [
            w for w in workers if os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"
        ]
    assert not alive, f"workers {alive} outlived the benchmark"
