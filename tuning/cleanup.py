"""Give a stopped trial's CPUs back before the next trial starts.

ASHA stops a trial by ending its Tune function in the middle of `TorchTrainer.fit`; the Train
worker group's placement group outlives it and would hold the CPUs the next trial needs (its
Ray Data read then waits forever). Train's own PlacementGroupCleaner removes such groups on a
cluster, but it reaches the state API through the dashboard and fails when the dashboard is off
or several Ray instances share the machine (tests, a shared workstation). So, on a local Ray that
the search started itself, and with one trial at a time, every placement group whose bundles are
exactly the Train workers' belongs to a finished trial of this search and is removed.
"""

from __future__ import annotations

import ray
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup


class ReleaseWorkerGroups(Callback):
    def __init__(self, worker_bundle: dict[str, float]):
        self.worker_bundle = {k: float(v) for k, v in worker_bundle.items()}

    def release(self) -> int:
        removed = 0
        for pg_id, info in ray.util.placement_group_table().items():
            bundles = [{k: float(v) for k, v in b.items()} for b in info["bundles"].values()]
            if info["state"] == "CREATED" and bundles and all(b == self.worker_bundle for b in bundles):
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                removed += 1
        return removed

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.release()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.release()
