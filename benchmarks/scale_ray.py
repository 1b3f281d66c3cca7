"""Ray Train at scale: the driver's and each worker's peak RSS, with one worker and with two.

    python benchmarks/scale_ray.py                      # 1M:60k and 10M:60k, 1 and 2 workers
        -> benchmarks/results/scale_ray_train.json

The data and its preparation are those of `benchmarks/scale.py` (the same generator and work
folder, so a prepared size is reused). Each run is `python benchmarks/scale_stages.py ray` in a
process of its own (the driver: it loads the prepared folder to split it and cut the shards), which
starts a local Ray with 2 CPUs; every worker reads its shard of users through Ray Data, trains
`--train-steps` steps of one epoch (one CPU each) and validates its users, and reports its peak RSS.
Whether a worker's memory follows its shard or the dataset is what the two worker counts show.
No address-space limit here: Ray's object store maps more than it uses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine_info import machine  # noqa: E402
from scale import parse_sizes, raw_release  # noqa: E402

from models.files import write_json  # noqa: E402

OUT = HERE / "results" / "scale_ray_train.json"
SCALE = HERE / "results" / "scale.json"


def memory_model(sizes: list[dict]) -> dict:
    """One worker's run on one machine, driver + worker peak RSS ≈ base + per_event·events + per_item·items.

    The per-event slope is fitted over the sizes (one catalogue); the per-item cost is the one
    scale.py fitted for the training stage (its sizes vary the catalogue), so the base is what is left.
    """
    pts = [
        (z["events"], z["items"], r["peak_rss"] + r["worker_peak_rss_max"])
        for z in sizes
        if "peak_rss" in (r := z["runs"].get("1", {}))
    ]
    if len({e for e, _, _ in pts}) < 2:
        return {}
    per_item = json.loads(SCALE.read_text())["memory_model"]["train-sampled"]["per_item"]
    ev = np.array([e for e, _, _ in pts], float)
    left = np.array([y - per_item * i for _, i, y in pts], float)
    per_event, base = np.polyfit(ev, left, 1)
    return {"train-ray": {"base": float(base), "per_event": float(per_event), "per_item": float(per_item)}}


def stage(args: list[str], timeout_s: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / "scale_stages.py"), *args], capture_output=True, text=True, timeout=timeout_s
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit {proc.returncode}", "error": proc.stderr.strip().splitlines()[-5:]}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1M:60k,10M:60k"), help="EVENTS:ITEMS,...")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument("--workdir", type=Path, default=Path("runs/scale"), help="generated and prepared data")
    p.add_argument("--train-steps", type=int, default=10, help="training steps per worker")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is stopped")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--summarize", action="store_true", help="only refit the memory model of --out")
    a = p.parse_args(argv)
    if a.summarize:
        kept = json.loads(a.out.read_text())
        write_json(a.out, {**kept, "memory_model": memory_model(kept["sizes"])}, indent=1)
        print(json.dumps(memory_model(kept["sizes"]), indent=1))
        return 0
    cache = a.workdir / "text-embeddings.parquet"
    sizes = []
    for name, events, items in a.sizes:
        raw, rec = raw_release(a.workdir, name, events, items)
        prepared = a.workdir / name / "prepared"
        size = {"name": name, "events": rec["events"], "items": items, "users": rec["users"], "runs": {}}
        if not (prepared / "manifest.json").is_file():
            print(f"[scale-ray {name}] preparing ...", flush=True)
            size["prepare"] = stage(
                ["prepare", "--raw", str(raw), "--prepared", str(prepared), "--encoder-cache", str(cache)], a.timeout
            )
        for w in (int(x) for x in a.workers.split(",")):
            print(f"[scale-ray {name}] {w} worker(s) ...", flush=True)
            r = stage(
                ["ray", "--prepared", str(prepared), "--workers", str(w), "--train-steps", str(a.train_steps)],
                a.timeout,
            )
            size["runs"][str(w)] = r
            shown = r.get("failed") or (
                f"driver {r['peak_rss'] / 2**30:.2f} GiB, worker ≤ "
                f"{r['worker_peak_rss_max'] / 2**30:.2f} GiB, {r['sequences_per_s']:.0f} seq/s"
            )
            print(f"[scale-ray {name}] {w} worker(s): {shown}", flush=True)
        sizes.append(size)
        record = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "sizes": sizes}
        write_json(a.out, {**record, "memory_model": memory_model(sizes)}, indent=1)
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
