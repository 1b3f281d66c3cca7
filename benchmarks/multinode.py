"""A node lost mid-run on a real multi-node cluster: training resumes, serving loses no event.

    python benchmarks/multinode.py        # as root: about 4 minutes on 2 cores

On a cluster of network namespaces (`benchmarks/netns_cluster.py`: a head with no CPUs and three
1-CPU worker hosts, Redis on the head host):

1. **Training.** `python -m ray_app.train --num-workers 2` is submitted as a Ray job. Each
   worker needs the one CPU of a host, so the two land on two hosts. Once a few epochs are
   checkpointed, one of the workers' hosts is killed (SIGKILL of every process on it). Ray
   Train restarts the worker group on the two hosts left and resumes from the latest
   checkpoint; the job must finish every epoch.
2. **Serving.** The killed host rejoins as a fresh node. The app, trained by that job, is deployed
   with `serve deploy` (two replicas of every stage, at most one per host, the Redis store).
   Clients send events with an `Idempotency-Key` and retry with the same key until one is
   acknowledged, and ask for recommendations, through the head's proxy. A host with an Ingress
   replica is killed mid-stream. Every acknowledged event must be in Redis exactly once, and
   `/recommend` must answer again.

The figures (when each step happened, how long the recovery took, requests retried, events
lost) go to `benchmarks/results/multinode.json`; `tests/test_multinode.py` runs the same steps.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns_cluster import NetnsCluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "multinode.json"
TRAIN_WORKER = "ray::RayTrainWorker"
INGRESS = "ray::ServeReplica:recommender:Ingress"
RUN = "multinode"


@dataclass
class MultinodeConfig:
    root: Path  # the cluster's files (short: Ray's socket paths have a length limit)
    data_dir: Path  # a prepared dataset
    epochs: int = 16
    kill_after_epoch: int = 3  # the training host is killed once the driver has printed this epoch
    lstm_units: int = 16
    serve_before_kill_s: float = 15.0
    serve_after_kill_s: float = 45.0
    users: int = 6  # users the event writers write to (one writer thread each)


def _wait(what: str, until, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (got := until()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)
    return got


# -- 1. training -----------------------------------------------------------------------------
def train_phase(cluster: NetnsCluster, cfg: MultinodeConfig) -> dict:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.job_address, headers={"Authorization": f"Bearer {cluster.token}"})
    storage = cfg.root / "runs"
    run_dir = storage / RUN
    job = client.submit_job(
        entrypoint=f"python -m ray_app.train --dataset {cfg.data_dir} --num-workers 2 --epochs {cfg.epochs} "
        f"--patience {cfg.epochs} --max-failures 3 --storage-path {storage} --name {RUN} "
        f"--set lstm_units={cfg.lstm_units}",
        runtime_env={"working_dir": str(REPO)},
    )
    t0 = time.monotonic()

    def epochs_logged() -> list[int]:
        """The driver's epoch lines: each is a checkpoint Train's controller has recorded. (A worker
        writes its checkpoint folder before the controller takes the report; one not yet taken
        when the host dies is not resumed from.)"""
        return [int(m) for m in re.findall(r"^epoch +(\d+)/", client.get_job_logs(job), re.M)]

    _wait(
        f"epoch {cfg.kill_after_epoch} reported", lambda: max(epochs_logged(), default=0) >= cfg.kill_after_epoch, 300
    )
    hosts_before = sorted(cluster.host_of(TRAIN_WORKER))
    killed = hosts_before[-1]
    lines_before = epochs_logged()  # read just before the kill: the epochs the controller had taken
    cluster.kill(killed)
    t_kill = time.monotonic()

    # The restarted group: two workers again, on the hosts left.
    def restarted() -> list[str] | None:
        hosts = sorted(cluster.host_of(TRAIN_WORKER))
        return hosts if len(hosts) == 2 and killed not in hosts else None

    hosts_after = _wait("the worker group restarted on two hosts", restarted, 180)
    _wait("a new epoch after the restart", lambda: len(epochs_logged()) > len(lines_before), 180)
    t_resumed = time.monotonic()
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = _wait("the training job to end", lambda: (s := client.get_job_status(job)) in terminal and s, 600, 2)
    logs = client.get_job_logs(job)
    epoch_lines = [int(m) for m in re.findall(r"^epoch +(\d+)/", logs, re.M)]
    resumed = [int(m) for m in re.findall(r"resumed from the checkpoint of epoch (\d+)", logs)]
    return {
        "status": str(status.value if hasattr(status, "value") else status),
        "workers_hosts_before": hosts_before,
        "killed_host": killed,
        "workers_hosts_after": hosts_after,
        "reported_epochs_at_kill": max(lines_before),
        "resumed_from_epoch": resumed,
        "worker_failed_lines": len(re.findall(r"^worker \d+ failed", logs, re.M)),
        "epochs_logged": epoch_lines,  # the driver's epoch lines in order: a restart from scratch shows as a 1
        "last_epoch": max(epoch_lines, default=0),
        "epochs": cfg.epochs,
        "seconds_to_kill": round(t_kill - t0, 1),
        "seconds_kill_to_next_epoch": round(t_resumed - t_kill, 1),
        "best_checkpoint": json.loads((run_dir / "best_checkpoint.json").read_text())["model"]
        if (run_dir / "best_checkpoint.json").is_file()
        else None,
        "log_tail": logs[-1500:] if status != JobStatus.SUCCEEDED else "",
    }


# -- 2. serving ------------------------------------------------------------------------------
def serve_config(cluster: NetnsCluster, cfg: MultinodeConfig) -> dict:
    """The shipped serve config, with two replicas of every stage, at most one per host."""
    conf = yaml.safe_load((REPO / "ray_app" / "serve" / "config.yaml").read_text())
    app = conf["applications"][0]
    app["args"].update(
        checkpoint=str(cfg.root / "runs" / RUN),
        data_dir=str(cfg.data_dir),
        store_url=cluster.store_url,
        load_users=False,
    )
    for stage in ("ingress", "encoder", "decomposer", "combiner"):
        app["args"][stage] = {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.2}
    # The deployments' options come from `args`; the config keeps only what Serve places.
    app["deployments"] = [{"name": d["name"], "max_replicas_per_node": 1} for d in app["deployments"]]
    return conf


@dataclass
class Traffic:
    """Event writers (one thread per user) and a recommend reader, through one address."""

    base_url: str
    headers: dict[str, str]
    item_ids: list[str]
    users: int
    acked: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    retries: int = 0
    unacked: int = 0
    recommend: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, status; 0 = no answer)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the counters, shared by the writers

    def __post_init__(self):
        self.acked = {f"mn-{u}": [] for u in range(self.users)}  # filled before any thread starts

    def _post(self, http: httpx.Client, path: str, body: dict, key: str | None = None) -> int:
        headers = {**self.headers, **({"Idempotency-Key": key} if key else {})}
        try:
            return http.post(f"{self.base_url}{path}", json=body, headers=headers, timeout=10).status_code
        except httpx.HTTPError:
            return 0

    def writer(self, user: str, t0: float) -> None:
        acked = self.acked[user]
        with httpx.Client() as http:
            i = 0
            while not self.stop.is_set():
                event = {"item_id": self.item_ids[(i * 7 + len(user)) % len(self.item_ids)], "timestamp": t0 + i}
                key, deadline = uuid.uuid4().hex, time.monotonic() + 120
                while True:  # the same key until acknowledged: a retry after a commit appends nothing
                    status = self._post(http, f"/users/{user}/events", {"events": [event]}, key)
                    if 200 <= status < 300:
                        acked.append((event["item_id"], event["timestamp"]))
                        break
                    if 400 <= status < 500 or time.monotonic() > deadline:
                        with self.lock:
                            self.unacked += 1
                        break
                    with self.lock:
                        self.retries += 1
                    time.sleep(0.2)
                i += 1
                time.sleep(0.05)

    def reader(self) -> None:
        with httpx.Client() as http:
            while not self.stop.is_set():
                users = [u for u, a in self.acked.items() if a]
                if users:
                    user = users[len(self.recommend) % len(users)]
                    status = self._post(http, "/recommend", {"user_id": user, "k": 5})
                    self.recommend.append((time.monotonic(), status))
                time.sleep(0.1)

    def start(self) -> list[threading.Thread]:
        t0 = time.time() - 86_400  # a day ago: every event in the past, one second apart
        threads = [threading.Thread(target=self.writer, args=(user, t0), daemon=True) for user in self.acked]
        threads.append(threading.Thread(target=self.reader, daemon=True))
        for t in threads:
            t.start()
        return threads


def check_store(store, acked_by_user: dict[str, list[tuple[str, float]]]) -> dict:
    """Each user's stored events against the acknowledged ones: lost, duplicated, out of order."""
    lost = duplicated = stored_total = out_of_order = 0
    for user, acked in acked_by_user.items():
        stored = [(e.item_id, e.timestamp) for e in store.events(user)]
        stored_total += len(stored)
        duplicated += len(stored) - len(set(stored))
        lost += len(set(acked) - set(stored))
        # One writer per user, one event at a time: the stored log is the acknowledged one, in order
        # (an event committed whose answer never came would stand between, none is expected).
        acked_set = set(acked)
        out_of_order += int([e for e in stored if e in acked_set] != acked)
    return {
        "events_stored": stored_total,
        "events_lost": lost,
        "events_duplicated": duplicated,
        "users_out_of_order": out_of_order,
    }


def serve_phase(cluster: NetnsCluster, cfg: MultinodeConfig) -> dict:
    import subprocess

    from ray_app.serve.auth import SECRET_ENV, mint
    from ray_app.serve.item_catalogue import Catalogue
    from ray_app.store.redis import RedisStore

    path = cfg.root / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_config(cluster, cfg)))
    t0 = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "deploy", str(path), "-a", cluster.job_address],
        check=True,
        capture_output=True,
        env=cluster.client_env(),
        timeout=120,
    )
    base = f"http://{cluster.head.ip}:8000"
    headers = {"Authorization": f"Bearer {mint(cluster.env[SECRET_ENV], 'service')}"}

    def ready() -> bool:
        try:
            healthy = httpx.get(f"{base}/healthz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False
        return healthy and len(cluster.host_of(INGRESS)) == 2

    _wait("the app to serve with two Ingress replicas", ready, 240, 1)
    t_ready = time.monotonic()
    ingress_hosts = sorted(cluster.host_of(INGRESS))
    items = [str(i) for i in Catalogue.load(cfg.data_dir)[0].item_source_ids[1:]]
    traffic = Traffic(base, headers, items, cfg.users)
    threads = traffic.start()
    time.sleep(cfg.serve_before_kill_s)
    killed = ingress_hosts[-1]
    acked_at_kill = sum(map(len, traffic.acked.values()))
    cluster.kill(killed)
    t_kill = time.monotonic()
    replaced = None
    while time.monotonic() < t_kill + cfg.serve_after_kill_s:
        hosts = set(cluster.host_of(INGRESS))
        if replaced is None and len(hosts) == 2 and killed not in hosts:
            replaced = time.monotonic() - t_kill
        time.sleep(1)
    traffic.stop.set()
    for t in threads:
        t.join(timeout=130)
    events = check_store(RedisStore(cluster.redis_url), traffic.acked)
    after = [(t, s) for t, s in traffic.recommend if t > t_kill]
    ok_after = [t for t, s in after if s == 200]
    t_end = traffic.recommend[-1][0] if traffic.recommend else t_kill
    gaps = [b - a for a, b in zip([t_kill] + ok_after, ok_after + [t_end])]  # to the end too: no recovery shows
    return {
        "seconds_to_ready": round(t_ready - t0, 1),
        "ingress_hosts_before": ingress_hosts,
        "killed_host": killed,
        "seconds_to_replacement_ingress": None if replaced is None else round(replaced, 1),
        "events_acknowledged": sum(map(len, traffic.acked.values())),
        "events_acknowledged_before_kill": acked_at_kill,
        **events,
        "events_never_acknowledged": traffic.unacked,
        "event_retries": traffic.retries,
        "recommend_after_kill": len(after),
        "recommend_ok_after_kill": len(ok_after),
        "recommend_last_status": traffic.recommend[-1][1] if traffic.recommend else None,
        "recommend_longest_gap_after_kill_s": round(max(gaps, default=float("nan")), 1),
    }


def run(cfg: MultinodeConfig, progress=print) -> dict:
    from ray_app.serve.auth import SECRET_ENV, new_secret

    cluster = NetnsCluster(cfg.root, workers=3, env={SECRET_ENV: new_secret()})
    t0 = time.monotonic()
    with cluster:
        progress(f"cluster up: {len(cluster.hosts)} hosts in {time.monotonic() - t0:.0f} s")
        train = train_phase(cluster, cfg)
        progress(
            f"training: {train['status']}, {train['killed_host']} killed, resumed from {train['resumed_from_epoch']}"
        )
        cluster.start_node(train["killed_host"])
        cluster.wait_for_nodes(len(cluster.hosts))
        progress(f"{train['killed_host']} rejoined")
        serve = serve_phase(cluster, cfg) if train["status"] == "SUCCEEDED" else None
        if serve:
            progress(f"serving: {serve['events_acknowledged']} events acknowledged, {serve['events_lost']} lost")
    return {
        "hosts": {n: {"ip": h.ip, "cpus": h.cpus} for n, h in cluster.hosts.items()},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "training": train,
        "serving": serve,
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    from netns_cluster import available

    from machine_info import machine
    from models.data import prepare_source
    from models.data.synthetic import SyntheticConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/di-multinode"))
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if why := available():
        sys.exit(f"multinode: {why}")
    shutil.rmtree(a.root, ignore_errors=True)  # a run of the same name would resume; Redis would reload its AOF
    small = SyntheticConfig(n_users=120, n_items=150, min_events=10, max_events=30)
    data = prepare_source("synthetic", a.root.parent / "di-multinode-data", synthetic_config=small, progress=False)
    result = {"machine": machine(), **run(MultinodeConfig(a.root, Path(data).resolve()))}
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("training", "serving")}, indent=2))


if __name__ == "__main__":
    main()
