"""Items added while serving: how soon an added item is ranked on every replica, under load.

    python benchmarks/new_items.py                     # ml-latest-small, trains a checkpoint if needed
    python benchmarks/new_items.py --items 100 --concurrency 8 --replicas 2

The app (`ray_app.serve.app.build_app`) runs with `--replicas` Decomposer and Combiner replicas on
a SQLite store that holds the training users and one probe user who has seen every trained item,
so that a request for the probe (`exclude_seen`, k = 100) ranks the added items only: an added
item is rankable exactly when it is in that list. While a load client (`load_client.py`, a
separate process, closed loop, the serving benchmarks' mix of /recommend and event posts for known
users, restarted every `--load-segment` seconds until the adds are done) keeps the app busy, this
process adds `--items` items one at a time over HTTP (POST /items, each with a title and the genres
of a random trained item) and, after each answer, sends probe requests until the item is in the
list and stays there for `--confirm` more consecutive probes, which Serve's router spreads over
the replicas (a probe that misses it after it was seen moves its time on).

visible_s of an item: from the POST's answer to the answer of the first probe from which on every
probe lists it (an upper bound: the probe's own latency is in it). The trivial floor is the probe's
own latency, recorded beside it. errors: every add, probe or load request that was not answered
with success. Records benchmarks/results/new_items.json (`p99_visible_s`, `errors`, the machine, the
command). Target: p99_visible_s <= 1 s with zero errors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.cli import add_settings, setting, settings_from
from models.files import write_json
from serve_common import (  # sibling scripts
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    RESULTS,
    api_access,
    checkpoint_config,
    command_line,
    ensure_checkpoint,
    machine,
    percentiles,
    replica_counts,
    running_replicas,
    wait_healthy,
)
from serve_load_app import make_spec

HERE = Path(__file__).resolve().parent
PROBE = "probe-seen-all"
APP = "new-items"


@dataclass
class NewItemsSettings:
    """The checkpoint and its data, the replicas, the load, the items and their probes."""

    checkpoint: Path = setting(DEFAULT_CHECKPOINT, "decomposer checkpoint (trained if missing)")
    data: Path = setting(DEFAULT_DATA, "prepared dataset folder of the checkpoint")
    items: int = setting(100, "items added, one at a time")
    replicas: int = setting(2, "Decomposer and Combiner replicas")
    concurrency: int = setting(8, "load clients")
    load_segment: float = setting(30.0, "seconds of one load client run (restarted until the adds are done)")
    warmup: float = setting(5.0, "seconds of load before the first add")
    confirm: int = setting(10, "probes after the first sighting that must list the item too")
    give_up: float = setting(30.0, "seconds of probing after which an item counts as not visible (an error)")
    users: int = setting(200, "known users the load clients pick from")
    port: int = setting(8034)
    seed: int = setting(0)
    out: Path = setting(RESULTS / "new_items.json")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Loader(threading.Thread):
    """Load client runs back to back, until stopped; their JSON records are kept."""

    def __init__(self, s: NewItemsSettings, spec_path: Path):
        super().__init__(daemon=True)
        self.s, self.spec_path = s, spec_path
        self.runs: list[dict] = []
        self._stop_after = threading.Event()

    def run(self) -> None:
        segment = 0
        while not self._stop_after.is_set():
            out = Path(tempfile.mkstemp(prefix="new-items-load-", suffix=".json")[1])
            cmd = [
                sys.executable,
                str(HERE / "load_client.py"),
                "--url",
                self.s.url,
                "--spec",
                str(self.spec_path),
                "--concurrency",
                str(self.s.concurrency),
                "--duration",
                str(self.s.load_segment),
                "--seed",
                str(self.s.seed + segment),
                "--out",
                str(out),
            ]
            subprocess.run(cmd, check=True, timeout=self.s.load_segment + 120)
            self.runs.append(json.loads(out.read_text()))
            out.unlink()
            segment += 1

    def finish(self) -> None:
        """Stop after the run in progress (so every request of the load is on record)."""
        self._stop_after.set()
        self.join()


def probe_store(s: NewItemsSettings, store_url: str) -> None:
    """The training users, then the probe user: one event on every trained item (seen: excluded)."""
    from models.data import load_prepared
    from ray_app.serve.load_users import load_training_users
    from ray_app.store.base import Event
    from ray_app.store.opener import open_store

    load_training_users(str(s.data), store_url)
    ids = load_prepared(s.data).item_source_ids[1:]
    store = open_store(store_url)
    store.bulk_load({PROBE: [Event(str(i), 4.0, 1.5e9 + j) for j, i in enumerate(ids)]})
    store.close()


def add_and_watch(s: NewItemsSettings, client, body: dict) -> dict:
    """One item: POST /items, then probes until it is listed and stays listed -> its record."""
    t0 = time.perf_counter()
    r = client.post("/items", json=body)
    answered = time.perf_counter()
    record = {"item_id": body["item_id"], "add_s": answered - t0, "add_status": r.status_code, "errors": 0}
    if r.status_code != 201:
        record.update(errors=1, error=r.text[:200])
        return record
    seen_from, streak, probes, latencies = None, 0, 0, []
    while streak <= s.confirm:
        if time.perf_counter() - answered > s.give_up:
            record.update(errors=record["errors"] + 1, error=f"not listed for {s.confirm + 1} probes in a row")
            break
        start = time.perf_counter()
        p = client.post("/recommend", json={"user_id": PROBE, "k": 100})
        end = time.perf_counter()
        probes += 1
        latencies.append(end - start)
        if p.status_code != 200:
            record["errors"] += 1
            streak, seen_from = 0, None
            continue
        listed = body["item_id"] in {i["item_id"] for i in p.json()["items"]}
        if listed:
            seen_from = end if seen_from is None else seen_from
            streak += 1
        else:
            if seen_from is not None:
                record["missed_after_seen"] = record.get("missed_after_seen", 0) + 1
            streak, seen_from = 0, None
    record.update(
        visible_s=(seen_from - answered) if seen_from is not None and streak > s.confirm else None,
        probes=probes,
        probe_latency_s=latencies,
    )
    return record


def item_bodies(s: NewItemsSettings) -> list[dict]:
    """`--items` new items, each with a new title and the genres of a random trained item."""
    from ray_app.serve.item_catalogue import Catalogue

    cat = Catalogue.load(s.data)[0]
    rng = np.random.default_rng(s.seed)
    picks = rng.integers(1, cat.n_items + 1, size=s.items)
    stamp = int(time.time())
    return [
        {
            "item_id": f"bench-{stamp}-{j}",
            "title": f"{cat.titles[i]} (a new cut, {2026 + j % 3})",
            "genres": [g for g in cat.genres[i] if g in cat.genre_names],
            "tags": ["new release"],
        }
        for j, i in enumerate(picks)
    ]


def run(s: NewItemsSettings, store_url: str, spec_path: Path) -> dict:
    import httpx
    import ray
    from ray import serve

    from ray_app.serve.app import AppArgs, DeploymentSettings, build_app

    headers = api_access()  # before ray.init: the replicas and the load clients inherit the secret/token
    probe_store(s, store_url)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": s.port})
        one = dict(num_cpus=0.2, min_replicas=1, max_replicas=1, access_log=False)
        model = dict(num_cpus=0.2, min_replicas=s.replicas, max_replicas=s.replicas, access_log=False)
        args = AppArgs(
            checkpoint=str(s.checkpoint),
            data_dir=str(s.data),
            store_url=store_url,
            load_users=False,  # loaded above, with the probe user
            encoder=DeploymentSettings(**one),
            decomposer=DeploymentSettings(**model),
            combiner=DeploymentSettings(**model),
            ingress=DeploymentSettings(**one, max_ongoing_requests=100),
        )
        serve.run(build_app(args), name=APP, route_prefix="/")
        wait_healthy(s.url)
        replicas = running_replicas(replica_counts())
        print(f"app up: replicas {replicas}", flush=True)
        loader = Loader(s, spec_path)
        loader.start()
        time.sleep(s.warmup)
        items = []
        with httpx.Client(base_url=s.url, timeout=30, headers=headers) as client:
            for j, body in enumerate(item_bodies(s)):
                items.append(add_and_watch(s, client, body))
                rec = items[-1]
                shown = "never" if rec.get("visible_s") is None else f"{rec['visible_s'] * 1e3:.0f} ms"
                print(f"item {j + 1}/{s.items}: visible after {shown} ({rec['probes']} probes)", flush=True)
        loads_after = len(loader.runs)
        loader.finish()
        return {
            "app_args": json.loads(args.model_dump_json()),
            "replicas": replicas,
            "items": items,
            "load": loader.runs,
            "load_runs_during_adds": loads_after + 1,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def summary(result: dict) -> dict:
    items = result["items"]
    visible = [r["visible_s"] for r in items if r.get("visible_s") is not None]
    probe = [x for r in items for x in r.get("probe_latency_s", [])]
    add = [r["add_s"] for r in items]
    load_errors = sum(run["errors"] for run in result["load"])
    return {
        "items_added": sum(r["add_status"] == 201 for r in items),
        "items_visible": len(visible),
        "p50_visible_s": float(np.percentile(visible, 50)) if visible else None,
        "p99_visible_s": float(np.percentile(visible, 99)) if visible else None,
        "max_visible_s": max(visible) if visible else None,
        "errors": sum(r["errors"] for r in items) + load_errors,
        "errors_of_adds_and_probes": sum(r["errors"] for r in items),
        "errors_of_the_load": load_errors,
        "missed_after_seen": sum(r.get("missed_after_seen", 0) for r in items),
        "probe_latency": percentiles(probe),
        "add_latency": percentiles(add),
        "load_requests": sum(run["requests"] for run in result["load"]),
        "load_throughput_rps": float(np.mean([run["throughput_rps"] for run in result["load"]])),
        "load_recommend_p99_ms": float(
            np.max([run["per_op"].get("recommend", {}).get("p99_ms", 0.0) for run in result["load"]])
        ),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, NewItemsSettings)
    s = settings_from(NewItemsSettings, p.parse_args(argv))
    from ray_app.serve import mode as serve_mode

    throughput_optimized = serve_mode.use()  # before ray.init: the replicas inherit it
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_checkpoint(s.checkpoint, s.data)
    record = {
        "benchmark": "new_items",
        "checkpoint": str(s.checkpoint),
        "checkpoint_config": checkpoint_config(s.checkpoint),
        "data": str(s.data),
        "machine": machine(
            "2 cores shared with other engineers' jobs during the run; the load client, the adds and "
            "the probes run on the same 2 cores as Serve"
        ),
        "command": command_line(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "throughput_optimized": throughput_optimized,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()},
    }
    with tempfile.TemporaryDirectory(prefix="new-items-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(make_spec(s.data, s.users, s.seed)))
        result = run(s, f"sqlite:///{tmp}/state.db", spec_path)
    record.update(summary(result))
    record.update(result)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(s.out, record)
    keys = ("items_added", "items_visible", "p50_visible_s", "p99_visible_s", "max_visible_s", "errors")
    for key in (*keys, "missed_after_seen", "probe_latency"):
        print(f"{key}: {record[key]}")
    print(f"recorded in {s.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
