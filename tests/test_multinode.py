"""A real multi-node Ray cluster on this machine (hosts in network namespaces): a host is killed
while a 2-worker training job runs, and again while the app serves from Redis; training resumes
from its checkpoint on the hosts left and no acknowledged event is lost (benchmarks/multinode.py)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import multinode  # noqa: E402
from netns_cluster import available  # noqa: E402

WHY_NOT = available() or (None if shutil.which("redis-server") else "redis-server is not on PATH")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=f"no netns cluster: {WHY_NOT}")]


@pytest.mark.timeout(1200)
def test_a_lost_host_costs_no_epoch_and_no_acknowledged_event(tiny_prepared):
    root = Path(tempfile.mkdtemp(prefix="dimn-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        cfg = multinode.MultinodeConfig(
            root, Path(tiny_prepared), epochs=5, kill_after_epoch=2, serve_before_kill_s=10, serve_after_kill_s=20
        )
        result = multinode.run(cfg, progress=lambda line: print(line, flush=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    train, serve = result["training"], result["serving"]
    assert train["status"] == "SUCCEEDED", train["log_tail"]
    # The two workers ran on two hosts; the group restarted on the two hosts left.
    assert len(set(train["workers_hosts_before"])) == 2 and train["killed_host"] in train["workers_hosts_before"]
    assert len(set(train["workers_hosts_after"])) == 2 and train["killed_host"] not in train["workers_hosts_after"]
    # It resumed from a checkpoint, not from epoch 1, and trained every epoch.
    assert train["worker_failed_lines"] >= 1 and train["resumed_from_epoch"], train
    assert min(train["resumed_from_epoch"]) >= train["reported_epochs_at_kill"] >= cfg.kill_after_epoch
    assert train["epochs_logged"].count(1) == 1 and train["last_epoch"] == cfg.epochs
    assert serve is not None and train["best_checkpoint"]
    # Serving: every acknowledged event stored exactly once; the API answered after the kill.
    assert len(set(serve["ingress_hosts_before"])) == 2 and serve["killed_host"] in serve["ingress_hosts_before"]
    assert serve["events_acknowledged"] > serve["events_acknowledged_before_kill"] > 0
    assert serve["events_lost"] == 0 and serve["events_duplicated"] == 0 and serve["users_out_of_order"] == 0
    assert serve["events_never_acknowledged"] == 0
    assert serve["recommend_ok_after_kill"] > 0 and serve["recommend_last_status"] == 200
