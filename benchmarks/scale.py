"""How cost grows with the data: time and peak RSS of each stage at several sizes, in one run.

At each size (events × catalogue items) MovieLens-format files are generated
(`benchmarks/scale_data.py`), then each stage of `benchmarks/scale_stages.py` runs in a process of
its own, under a memory limit, so that its peak RSS is its own and a stage that hits the limit
is recorded as failed rather than taking the machine down: preparation (text encoding apart: it
is cached across sizes), loading and splitting, training steps with the sampled and the full
softmax (sequences/s, and the epoch time they project), model load and in-process ranking of
the catalogue, and bulk-loading the users into SQLite and Redis.

    python benchmarks/scale.py                                  # 0.1M:10k 1M:10k 1M:60k 10M:60k
    python benchmarks/scale.py --sizes 100k:10k,1M:10k --stages prepare,load
        -> benchmarks/results/scale.json, benchmarks/results/scale.png (log-log, with slopes)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine_info import machine  # noqa: E402
from scale_data import ScaleConfig, write_release  # noqa: E402

from models.files import write_json  # noqa: E402

RESULTS = HERE / "results"
DEFAULT_SIZES = "100k:10k,1M:10k,1M:60k,10M:60k"
STAGES = ("prepare", "load", "train-sampled", "train-full", "serve", "store")
SUFFIX = {"k": 1_000, "M": 1_000_000}


def count(text: str) -> int:
    """ "100k" -> 100000, "10M" -> 10000000, "6000" -> 6000."""
    text = text.strip()
    return int(float(text[:-1]) * SUFFIX[text[-1]]) if text[-1] in SUFFIX else int(text)


def parse_sizes(text: str) -> list[tuple[str, int, int]]:
    """ "100k:10k,1M:60k" -> [(name, events, items), ...]."""
    out = []
    for part in text.split(","):
        events, _, items = part.partition(":")
        if not items:
            raise argparse.ArgumentTypeError(f"--sizes: {part!r} is not EVENTS:ITEMS (e.g. 1M:60k)")
        out.append((f"{events.strip()}-{items.strip()}", count(events), count(items)))
    return out


def raw_release(workdir: Path, name: str, events: int, items: int) -> tuple[Path, dict]:
    """The generated MovieLens-format folder of one size, reused when its config matches."""
    raw = workdir / name / "raw"
    cfg = ScaleConfig(events=events, items=items)
    try:
        record = json.loads((raw / "scale.json").read_text())
        if record["config"] == asdict(cfg):
            return raw, record
    except (OSError, ValueError, KeyError):
        pass
    return raw, write_release(cfg, raw)


def limit_memory(gib: float):
    """A preexec hook: the child's address space capped at `gib`."""

    def hook() -> None:
        cap = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return hook


def run_stage(stage: str, raw: Path, prepared: Path, a) -> dict:
    """One stage in its own process -> its record, or {"failed": ...} with the end of its stderr."""
    name, _, loss = stage.partition("-")
    cmd = [sys.executable, str(HERE / "scale_stages.py"), name, "--raw", str(raw), "--prepared", str(prepared)]
    cmd += ["--encoder-cache", str(a.encoder_cache), "--train-steps", str(a.train_steps)]
    cmd += ["--loss", loss] if loss else []
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=a.stage_timeout, preexec_fn=limit_memory(a.memory_limit_gib)
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        oom = any("MemoryError" in ln or "alloc" in ln.lower() for ln in tail)
        return {"failed": "over the memory limit" if oom else f"exit {proc.returncode}", "error": tail, "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


def slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) against log(x) (1: linear growth); None with fewer than 2 points."""
    pts = [(x, y) for x, y in zip(xs, ys) if y]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def metric(size: dict, stage: str, key: str):
    rec = size["stages"].get(stage, {})
    if stage.startswith("train-") and key == "epoch_s":
        rec = rec.get(stage.split("-")[1], {})
    return rec.get(key)


CURVES = {  # name -> (stage, key): the figures the slopes and the plot follow
    "prepare_s": ("prepare", "prepare_s"),
    "encode_s": ("prepare", "encode_s"),
    "load_s": ("load", "load_s"),
    "epoch_s sampled": ("train-sampled", "epoch_s"),
    "epoch_s full": ("train-full", "epoch_s"),
    "sqlite_s": ("store", "sqlite_s"),
    "redis_s": ("store", "redis_s"),
    "serve p50_ms": ("serve", "p50_ms"),
}


def summarize(sizes: list[dict]) -> dict:
    """Per catalogue size, the log-log slope of each curve against events, and of peak RSS per stage."""
    out = {}
    for items in sorted({s["items"] for s in sizes}):
        group = [s for s in sizes if s["items"] == items]
        ev = [s["events"] for s in group]
        out[f"{items} items"] = {
            "events": ev,
            "seconds_slope": {n: slope(ev, [metric(s, st, k) for s in group]) for n, (st, k) in CURVES.items()},
            "peak_rss_slope": {st: slope(ev, [metric(s, st, "peak_rss") for s in group]) for st in STAGES},
        }
    return out


def per_event_ratio(sizes: list[dict], stage: str, key: str, small: int, large: int, items: int) -> float | None:
    """(cost per event at `large` events) / (cost per event at `small`), same catalogue."""
    by = {s["events"]: s for s in sizes if s["items"] == items}
    lo, hi = (by.get(min(by, key=lambda e: abs(e - n))) if by else None for n in (small, large))
    if lo is None or hi is None or lo is hi:
        return None
    a, b = metric(lo, stage, key), metric(hi, stage, key)
    return None if not a or not b else (b / hi["events"]) / (a / lo["events"])


def targets(sizes: list[dict]) -> dict:
    """The issue's targets, read from the measured figures (None where the size was not run)."""
    big = [s for s in sizes if s["items"] >= 60_000 and s["events"] >= 10_000_000]
    within = None
    if big:
        peaks = [metric(big[0], st, "peak_rss") for st in ("prepare", "train-sampled", "serve")]
        within = all(p is not None and p < 24 * 2**30 for p in peaks)
    serve60k = [metric(s, "serve", "p50_ms") for s in sizes if s["items"] >= 60_000]
    return {
        "10M_60k_within_24GiB": within,
        "prepare_per_event_10M_over_1M": per_event_ratio(sizes, "prepare", "prepare_s", 10**6, 10**7, 60_000),
        "epoch_per_event_10M_over_1M": per_event_ratio(sizes, "train-sampled", "epoch_s", 10**6, 10**7, 60_000),
        "recommend_p50_ms_60k": next((v for v in serve60k if v is not None), None),
        "limits": {"per_event_ratio": 1.3, "recommend_p50_ms": 5.0, "peak_rss_GiB": 24},
    }


def plot(sizes: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax in (ax1, ax2):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for items in sorted({s["items"] for s in sizes}):
        group = sorted((s for s in sizes if s["items"] == items), key=lambda s: s["events"])
        ev = [s["events"] for s in group]
        slopes = summary[f"{items} items"]
        style = {"marker": "o" if items <= 10_000 else "s", "linestyle": "-" if items <= 10_000 else "--"}
        for name, (st, k) in CURVES.items():
            ys = [metric(s, st, k) for s in group]
            if name == "serve p50_ms" or not any(ys):
                continue
            b = slopes["seconds_slope"][name]
            label = f"{name}, {items // 1000}k items" + (f" (slope {b:.2f})" if b is not None else "")
            ax1.plot(ev, [y if y else np.nan for y in ys], label=label, **style)
        for st in STAGES:
            ys = [metric(s, st, "peak_rss") for s in group]
            if any(ys):
                b = slopes["peak_rss_slope"][st]
                label = f"{st}, {items // 1000}k items" + (f" (slope {b:.2f})" if b is not None else "")
                ax2.plot(ev, [y / 2**30 if y else np.nan for y in ys], label=label, **style)
    for ax, title in ((ax1, "seconds"), (ax2, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events")
        ax.set_title(title)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_size(name: str, events: int, items: int, a) -> dict:
    raw, record = raw_release(a.workdir, name, events, items)
    prepared = a.workdir / name / "prepared"
    size = {"name": name, "events": record["events"], "items": items, "users": record["users"], "stages": {}}
    for stage in a.stages:
        if stage != "prepare" and not (prepared / "manifest.json").is_file():
            size["stages"][stage] = {"failed": "no prepared data"}
            continue
        print(f"[scale {name}] {stage} ...", flush=True)
        rec = run_stage(stage, raw, prepared, a)
        size["stages"][stage] = rec
        shown = "FAILED " + rec["failed"] if "failed" in rec else f"peak {rec['peak_rss'] / 2**30:.2f} GiB"
        print(f"[scale {name}] {stage}: {rec['wall_s']:.1f} s, {shown}", flush=True)
    return size


def memory_model(sizes: list[dict]) -> dict:
    """Per stage, peak RSS ≈ base + per_event·events + per_item·items, least squares over the sizes
    (a coefficient that fits negative is dropped and the rest refitted) -> {stage: {...}}."""
    out = {}
    for st in STAGES:
        pts = [(s["events"], s["items"], metric(s, st, "peak_rss")) for s in sizes if metric(s, st, "peak_rss")]
        if len(pts) < 3:
            continue
        X = np.array([[1.0, e, i] for e, i, _ in pts])
        y = np.array([r for _, _, r in pts], float)
        cols = [0, 1, 2]
        while True:
            coef = np.linalg.lstsq(X[:, cols], y, rcond=None)[0]
            if (coef >= 0).all() or len(cols) == 1:
                break
            cols.pop(int(np.argmin(coef)))
        full = dict.fromkeys(("base", "per_event", "per_item"), 0.0)
        for c, v in zip(cols, coef):
            full[("base", "per_event", "per_item")[c]] = float(v)
        out[st] = full
    return out


def record(sizes: list[dict]) -> dict:
    return {
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "note": (
            "Each stage in its own process (peak RSS is that process's); training runs a few batches of "
            "one worker's loop in-process and projects the epoch from their sequences/s; serving ranks a "
            "user with 50 events in-process as the Combiner does, one thread, batch of one."
        ),
        "sizes": sizes,
        "slopes": summarize(sizes),
        "targets": targets(sizes),
        "memory_model": memory_model(sizes),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES), help="EVENTS:ITEMS,...")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--workdir", type=Path, default=Path("runs/scale"), help="generated and prepared data")
    p.add_argument("--encoder-cache", type=Path, help="text-embedding cache (default: WORKDIR/text-embeddings.parquet)")
    p.add_argument("--train-steps", type=int, default=10, help="timed training batches per softmax")
    p.add_argument("--memory-limit-gib", type=float, default=20.0, help="address-space limit of each stage")
    p.add_argument("--stage-timeout", type=float, default=3600.0, help="seconds before a stage is stopped")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--summarize", action="store_true", help="only recompute slopes, targets and plot from --out")
    a = p.parse_args(argv)
    if a.summarize:
        kept = json.loads(a.out.read_text())
        report = {**kept, **{k: v for k, v in record(kept["sizes"]).items() if k not in ("machine", "command")}}
        write_json(a.out, report, indent=1)
        plot(report["sizes"], report["slopes"], a.out.with_suffix(".png"))
        print(json.dumps(report["targets"], indent=1))
        return 0
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in a.stages if s not in STAGES]
    if bad:
        p.error(f"--stages: unknown {bad}; choose from {', '.join(STAGES)}")
    a.encoder_cache = a.encoder_cache or a.workdir / "text-embeddings.parquet"
    sizes: list[dict] = []
    for size in a.sizes:  # the record is rewritten after each size, so a stopped run keeps what it measured
        sizes.append(run_size(*size, a))
        report = record(sizes)
        write_json(a.out, report, indent=1)
    plot(sizes, report["slopes"], a.out.with_suffix(".png"))
    print(json.dumps(report["targets"], indent=1))
    print(f"-> {a.out}, {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
