"""Batch recommendations and streamed training at scale, on the scale benchmark's generated data.

    python benchmarks/batch.py                              # 10M:60k (about 93 k users)
        -> benchmarks/results/batch.json
    python benchmarks/batch.py --size 1M:60k --out benchmarks/results/batch_1M-60k.json

Every step runs in a process of its own, so that each peak RSS is its own:
1. the data: `benchmarks/scale.py`'s generator and preparation (the same work folder: a prepared
   size is reused);
2. the training driver: `scale_stages.py ray`, a 2-worker Ray Train run of `--train-steps` steps
   and the validation of every user; `driver_peak_gib` is its process's peak RSS, and
   `driver_fixed_gib` what it held after its imports, before reading anything (the part no data
   changes). Its checkpoint is the model the batch job scores;
3. the batch job (`ray_app.batch`, `--k` items per user) with 1 and 2 model actors:
   `users_per_s` (users over the job's seconds, from the first read to the output in place),
   and each actor's peak RSS (`peak_rss_gib`, VmHWM read from /proc while it runs);
4. `matches_online`: a sample of users ranked in-process the online way (their events bulk-loaded
   into a SQLite store, `Decomposer` states, `Combiner._rank` at the job's moment) against the
   job's rows: the same items in the same order, scores within 1e-4;
5. preparation of the same `--prepare-events` rows as an event log (events.csv, items.csv) and as
   MovieLens files (ratings.csv, movies.csv, no tags: the same item texts), alternating over
   `--rounds`, the text encoder's cache warm for both: time and peak RSS, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine_info import machine  # noqa: E402
from scale import count, parse_sizes, raw_release  # noqa: E402

from models.files import write_json  # noqa: E402

OUT = HERE / "results" / "batch.json"
GIB = 2**30
TARGETS = {
    "users": 100_000,
    "events": 10_000_000,
    "peak_rss_gib_per_worker": 4.0,
    "driver_peak_gib": 0.3,
    "prepare_ratio": 1.2,
}


def stage(args: list[str], timeout_s: float, script: Path = HERE / "scale_stages.py") -> dict:
    """A stage in a process of its own -> its last JSON line, or {"failed": ...}."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit {proc.returncode}", "error": proc.stderr.strip().splitlines()[-8:]}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


# ---- the batch job and its actors' memory -------------------------------------------------------


def actor_peaks(name: str = "Scorer") -> dict[int, int]:
    """pid -> VmHWM bytes of every live process whose command line names the actor class."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if name not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[int(proc.name)] = int(line.split()[1]) * 1024
        except OSError:  # gone meanwhile
            continue
    return out


def run_job(a, checkpoint: str, prepared: Path, workers: int, out: Path, at: float) -> dict:
    """`python benchmarks/batch.py job ...` in its own process, its actors' VmHWM sampled meanwhile."""
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid, hwm in actor_peaks().items():
                peaks[pid] = max(peaks.get(pid, 0), hwm)
            done.wait(0.5)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        args = ["job", "--checkpoint", checkpoint, "--data", str(prepared), "--out", str(out)]
        args += ["--workers", str(workers), "--k", str(a.k), "--at", str(at)]
        rec = stage(args, a.timeout, script=Path(__file__))
    finally:
        done.set()
        watcher.join()
    return {**rec, "actor_peak_rss": sorted(peaks.values())}


def job(a) -> dict:
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray_app.batch.job import run
    from ray_app.batch.settings import BatchSettings

    s = BatchSettings(
        checkpoint=a.checkpoint, data=a.data, out=a.out, k=a.k, at=a.at, workers=a.workers, overwrite=True
    )
    r = run(s, num_cpus=2)
    return {"users": r.users, "rows": r.rows, "workers": r.workers, "seconds": r.seconds, "users_per_s": r.users_per_s}


# ---- the online path on a sample ----------------------------------------------------------------


def online(a) -> dict:
    """The sample's top-k the online way, against the job's rows."""
    import pyarrow.parquet as pq

    from models.data.dataset import index_prepared, table_rows
    from models.data.prepare import TABLE_FILES
    from ray_app.serve.deployments import Combiner, Decomposer
    from ray_app.serve.records import RankJob
    from ray_app.store.base import Event

    index = index_prepared(a.data)
    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(index.n_users, size=min(a.sample, index.n_users), replace=False)) + 1  # 1-based
    items = table_rows(a.data / TABLE_FILES[0], 0, index.n_items, ["source_id"]).column(0).to_pylist()
    names = table_rows(a.data / TABLE_FILES[3], 0, index.n_users, ["source_user"]).column(0).to_pylist()
    logs = {}
    for u in users:
        t = table_rows(
            a.data / TABLE_FILES[1],
            index.user_offsets[u - 1],
            index.user_offsets[u],
            ["item_idx", "rating", "timestamp"],
        )
        logs[names[u - 1]] = [
            Event(str(items[i - 1]), float(r), float(ts))  # the API's item ids: the source ids
            for i, r, ts in zip(*(t.column(c).to_pylist() for c in ("item_idx", "rating", "timestamp")))
        ]
    with tempfile.TemporaryDirectory() as tmp:
        dec = Decomposer.func_or_class(f"sqlite:///{tmp}/state.db")
        dec.reconfigure({"checkpoint": a.checkpoint})
        dec.store.bulk_load(logs)
        comb = Combiner.func_or_class()
        comb.reconfigure({"checkpoint": a.checkpoint})
        want = {}
        ids = list(logs)
        for lo in range(0, len(ids), 16):  # the Decomposer's and the Combiner's batch size
            chunk = ids[lo : lo + 16]
            states = dec._advance_users([(u, True) for u in chunk])
            ranked = comb._rank(comb.current, [RankJob(s, None, a.k, True, False, a.at) for s in states])
            src = comb.current.item_source_ids
            want.update({u: [(src[i], v) for i, v in r.items] for u, r in zip(chunk, ranked)})
        dec.store.close()
    rows = pq.read_table(a.out, filters=[("user_id", "in", ids)])
    got: dict[str, list] = {}
    for r in rows.sort_by([("user_id", "ascending"), ("rank", "ascending")]).to_pylist():
        got.setdefault(r["user_id"], []).append((r["item_id"], r["score"]))
    same, worst = 0, 0.0
    for u in ids:
        g, w = got.get(u, []), want[u]
        if [i for i, _ in g] == [i for i, _ in w]:
            same += 1
            worst = max(worst, float(np.max(np.abs(np.subtract([s for _, s in g], [s for _, s in w])), initial=0.0)))
    return {
        "users": len(ids),
        "same_top_k": same,
        "max_score_diff": worst,
        "matches": same == len(ids) and worst < 1e-4,
    }


# ---- preparation: event log against MovieLens files ---------------------------------------------


def formats(raw: Path, root: Path) -> tuple[Path, Path]:
    """The generated release's ratings and movies as MovieLens files without tags, and as an event log."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    ml, ev = root / "movielens", root / "events"
    if (ev / "events.csv").is_file() and (ml / "movies.csv").is_file():
        return ml, ev
    for d in (ml, ev):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("ratings.csv", "movies.csv"):
        (ml / name).write_bytes((raw / name).read_bytes())
    ratings = pacsv.read_csv(raw / "ratings.csv")
    movies = pacsv.read_csv(
        raw / "movies.csv", convert_options=pacsv.ConvertOptions(column_types={"title": pa.string()})
    )
    events = pa.table(
        {
            "user_id": ratings.column("userId"),
            "item_id": ratings.column("movieId"),
            "timestamp": ratings.column("timestamp"),
            "rating": ratings.column("rating"),
        }
    )
    items = pa.table(
        {"item_id": movies.column("movieId"), "title": movies.column("title"), "categories": movies.column("genres")}
    )
    pacsv.write_csv(events, ev / "events.csv")
    pacsv.write_csv(items, ev / "items.csv")
    return ml, ev


def prepare_ratio(a) -> dict:
    name = f"{a.prepare_events // 1_000_000}M-{a.prepare_items // 1000}k" if a.prepare_events >= 1_000_000 else "prep"
    raw, rec = raw_release(a.workdir, name, a.prepare_events, a.prepare_items)
    ml, ev = formats(raw, a.workdir / name / "formats")
    cache = a.workdir / "text-embeddings.parquet"
    out = a.workdir / name / "formats" / "prepared"

    def prep(reader: str, folder: Path) -> dict:
        return stage(
            [
                "prepare",
                "--raw",
                str(folder),
                "--prepared",
                str(out / reader),
                "--encoder-cache",
                str(cache),
                "--reader",
                reader,
            ],
            a.timeout,
        )

    warm = prep("movielens", ml)  # encodes the texts once; every timed run below finds them cached
    rounds = []
    for _ in range(a.rounds):
        rounds.append({"movielens": prep("movielens", ml), "events": prep("events", ev)})
    ok = [r for r in rounds if "failed" not in r["movielens"] and "failed" not in r["events"]]
    result = {"events": rec["events"], "items": a.prepare_items, "warm_up": warm, "rounds": rounds}
    if ok:
        t = {k: min(r[k]["seconds"] for r in ok) for k in ("movielens", "events")}
        m = {k: min(r[k]["peak_rss"] for r in ok) for k in ("movielens", "events")}
        result.update(
            seconds=t,
            peak_rss=m,
            time_ratio=t["events"] / t["movielens"],
            memory_ratio=m["events"] / m["movielens"],
            time_ratio_per_round=[r["events"]["seconds"] / r["movielens"]["seconds"] for r in ok],
        )
    return result


# ---- the whole benchmark ------------------------------------------------------------------------


def save(path: Path, record: dict) -> None:
    write_json(path, record, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", nargs="?", choices=("all", "job", "online"), default="all")
    p.add_argument("--size", type=parse_sizes, default=parse_sizes("10M:60k"), help="EVENTS:ITEMS of the scored data")
    p.add_argument("--workdir", type=Path, default=Path("runs/scale"), help="generated and prepared data")
    p.add_argument("--workers", default="1,2", help="model actor counts, comma-separated")
    p.add_argument("--k", type=int, default=100, help="items per user")
    p.add_argument("--train-steps", type=int, default=5, help="training steps per Ray Train worker")
    p.add_argument("--sample", type=int, default=200, help="users checked against the online path")
    p.add_argument("--prepare-events", type=count, default=count("1M"), help="rows of the preparation comparison")
    p.add_argument("--prepare-items", type=count, default=count("10k"), help="items of the preparation comparison")
    p.add_argument("--rounds", type=int, default=2, help="alternating preparations of each format")
    p.add_argument("--skip", default="", help="steps to leave out: train, batch, online, prepare (comma-separated)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a step is stopped")
    p.add_argument("--out", type=Path, default=OUT)
    # The job and online steps' own arguments (run by the benchmark in processes of their own).
    p.add_argument("--checkpoint")
    p.add_argument("--data", type=Path)
    p.add_argument("--at", type=float)
    a = p.parse_args(argv)
    if a.step == "job":
        print(json.dumps(job(argparse.Namespace(**{**vars(a), "workers": int(a.workers)}))))
        return 0
    if a.step == "online":
        print(json.dumps(online(a)))
        return 0
    skip = set(filter(None, a.skip.split(",")))
    (name, events, items), *_ = a.size
    command = " ".join(["python", *sys.argv])
    record = {"machine": machine(), "command": command, "targets": TARGETS}
    if skip and a.out.is_file():  # a rerun of some steps keeps what the others recorded, and says so
        earlier = json.loads(a.out.read_text())
        if earlier.get("data", {}).get("name") == name:
            reruns = earlier.get("reruns", []) + [
                {"command": command, "machine": record["machine"], "skipped": sorted(skip)}
            ]
            record = {**earlier, "targets": TARGETS, "reruns": reruns}
    raw, rec = raw_release(a.workdir, name, events, items)
    prepared = a.workdir / name / "prepared"
    record["data"] = {
        **record.get("data", {}),
        "name": name,
        "events": rec["events"],
        "items": items,
        "users": rec["users"],
    }
    if not (prepared / "manifest.json").is_file():
        print(f"[batch {name}] preparing ...", flush=True)
        cache = a.workdir / "text-embeddings.parquet"
        record["data"]["prepare"] = stage(
            ["prepare", "--raw", str(raw), "--prepared", str(prepared), "--encoder-cache", str(cache)], a.timeout
        )
    storage = a.workdir / name / "batch-train"
    best = storage / "scale" / "best_checkpoint.json"
    if "train" not in skip or not best.is_file():
        print(f"[batch {name}] the training driver, 2 workers ...", flush=True)
        r = stage(
            [
                "ray",
                "--prepared",
                str(prepared),
                "--workers",
                "2",
                "--train-steps",
                str(a.train_steps),
                "--storage",
                str(storage),
            ],
            a.timeout,
        )
        record["training"] = r
        if "failed" not in r:
            record["driver_peak_gib"] = r["peak_rss"] / GIB
            record["driver_fixed_gib"] = r["rss_before_run"] / GIB
            print(
                f"[batch {name}] driver peak {record['driver_peak_gib']:.2f} GiB ({record['driver_fixed_gib']:.2f} before reading)",
                flush=True,
            )
        save(a.out, record)
    checkpoint = json.loads(best.read_text())["model"]
    at = float(np.ceil(time.time()))
    recs = a.workdir / name / "recs.parquet"
    if "batch" not in skip:
        record.update(at=at, runs={}, users_per_s={}, peak_rss_gib={})
        for w in (int(x) for x in a.workers.split(",")):
            print(f"[batch {name}] {w} model actor(s) ...", flush=True)
            r = run_job(a, checkpoint, prepared, w, recs, at)
            record["runs"][str(w)] = r
            if "failed" not in r:
                record["users_per_s"][str(w)] = r["users_per_s"]
                record["peak_rss_gib"][str(w)] = [x / GIB for x in r["actor_peak_rss"]]
                print(
                    f"[batch {name}] {w}: {r['users_per_s']:.1f} users/s, actors ≤ {max(r['actor_peak_rss'], default=0) / GIB:.2f} GiB",
                    flush=True,
                )
            save(a.out, record)
    if "online" not in skip and recs.is_dir():
        print(f"[batch {name}] {a.sample} users against the online path ...", flush=True)
        used = json.loads((recs / "_manifest.json").read_text())["at"]
        r = stage(
            [
                "online",
                "--checkpoint",
                checkpoint,
                "--data",
                str(prepared),
                "--out",
                str(recs),
                "--at",
                str(used),
                "--k",
                str(a.k),
                "--sample",
                str(a.sample),
            ],
            a.timeout,
            script=Path(__file__),
        )
        record["online_check"] = r
        record["matches_online"] = bool(r.get("matches", False))
        save(a.out, record)
    if "prepare" not in skip:
        print(f"[batch] preparing {a.prepare_events} rows as an event log and as MovieLens files ...", flush=True)
        record["prepare"] = prepare_ratio(a)
        save(a.out, record)
    save(a.out, record)
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
