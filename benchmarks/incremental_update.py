"""Incremental update benchmark: one new event advances a user's LSTM state in O(1) of the history.

    python benchmarks/incremental_update.py                          # model level, then through HTTP
    python benchmarks/incremental_update.py --skip-http              # model level only
    python benchmarks/incremental_update.py --checkpoint runs/x/decomposer.pt --data runs/data/synthetic

Three levels, same history lengths (default 50, 200, 500, 1000):
  model  `InterestDecomposer.advance` by one event from a stored (h, c), against recomputing the
         state from the whole history (one `advance` from None over every event), in-process.
  replica the Decomposer deployment's code in-process on a SQLite store: the stored state brought
         up to date after one appended event, against the state rebuilt from every stored event
         after it was invalidated (the append, one synchronous commit, timed apart).
  http   `POST /users/{id}/events` with one event to the running Serve app (which commits it and
         advances the stored state) for users whose stored history has that length; then the same
         request after the stored state was invalidated (a state of another model version, which the
         app must ignore and rebuild from every event), i.e. recomputing from the full history through
         the same endpoint; each followed by `POST /recommend`, which must reflect the new event.
         Through HTTP the fixed cost of a request (Serve hops, a synchronous SQLite commit) is in both.
Targets (issue 5): latency(1000) / latency(50) <= 1.5 and recompute(1000) / update(1000) >= 10.
Records benchmarks/results/incremental_update.json and incremental_update.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from serve_common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    RESULTS,
    checkpoint_config,  # sibling script
    command_line,
    ensure_checkpoint,
    machine,
    percentiles,
    random_events,
)
from models.nn import checkpoint as ckpt
from models.data import load_prepared
from models.data.features import moment_features, rating_bucket
from models.files import write_json


def event_tensors(model, events: list[dict], index_of: dict[str, int], prev_ts: float | None):
    """API events -> the (1, T) item / rating-bucket tensors and (1, T, 5) features `advance` takes."""
    items = np.array([index_of[e["item_id"]] for e in events], dtype=np.int64)
    ratings = rating_bucket(np.array([e["rating"] for e in events]))
    ts = np.array([e["timestamp"] for e in events], dtype=np.float64)
    before = np.concatenate([[prev_ts if prev_ts is not None else ts[0]], ts[:-1]])
    feats = moment_features(ts, ts - before)
    return (torch.from_numpy(items)[None], torch.from_numpy(ratings)[None], torch.from_numpy(feats)[None])


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up (allocator, first-call paths)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def model_level(
    model, index_of: dict[str, int], source_ids: np.ndarray, lengths: list[int], repeats: int, seed: int
) -> dict:
    rng = np.random.default_rng(seed)
    rows = {}
    for n in lengths:
        history = random_events(source_ids, n + 1, rng)
        past, new = history[:-1], history[-1:]
        state = model.advance(None, *event_tensors(model, past, index_of, None))  # (h, c[, profile]), (1, 1, ·)
        step = event_tensors(model, new, index_of, past[-1]["timestamp"])
        full = event_tensors(model, history, index_of, None)
        inc = timed(lambda state=state, step=step: model.advance(state, *step), repeats)
        rec = timed(lambda full=full: model.advance(None, *full), max(5, repeats // 10))
        # The two paths must agree: the incremental state is the full recomputation's state.
        h_inc = model.interest_state(model.advance(state, *step))  # (1, U[+R·D])
        h_full = model.interest_state(model.advance(None, *full))
        rows[n] = {
            "update": percentiles(inc),
            "recompute": percentiles(rec),
            "max_abs_state_diff": float((h_inc - h_full).abs().max()),
        }
        print(
            f"model  n={n:5d}: update p50 {rows[n]['update']['p50_ms']:.3f} ms, recompute p50 "
            f"{rows[n]['recompute']['p50_ms']:.2f} ms (|Δh| {rows[n]['max_abs_state_diff']:.1e})",
            flush=True,
        )
    return rows


def replica_level(args, source_ids: np.ndarray, lengths: list[int], repeats: int) -> dict:
    """The Decomposer deployment's own code in-process (no Serve, no HTTP) on a SQLite store:
    bringing the stored state up to date after one appended event, against rebuilding it from every
    event after the stored state was invalidated. The append itself (one synchronous commit) is
    timed apart: it is the same in both paths."""
    from ray_app.serve.deployments import Decomposer
    from ray_app.store.base import Event, StoredState

    rng = np.random.default_rng(args.seed + 2)
    times = {n: {"append": [], "update": [], "rebuild": []} for n in lengths}
    with tempfile.TemporaryDirectory(prefix="incremental-replica-") as tmp:
        # `.func_or_class` is the plain class under @serve.deployment; its batched method needs a
        # replica, so the batch body `_advance_users` is called with a batch of one.
        dec = Decomposer.func_or_class(f"sqlite:///{tmp}/state.db", str(args.data.resolve()), max_batch_size=1)
        dec.reconfigure({"checkpoint": str(args.checkpoint.resolve())})
        version = dec.served.version
        pending = {}
        for n in lengths:
            history = [Event(**e) for e in random_events(source_ids, n + 2 * repeats, rng)]
            dec.store.append_events(f"replica-{n}", history[:n])
            dec._advance_users([(f"replica-{n}", False)])
            pending[n] = iter(history[n:])
        for _ in range(repeats):
            for n in interleaved(lengths, rng):
                user, t = f"replica-{n}", times[n]
                t0 = time.perf_counter()
                dec.store.append_events(user, [next(pending[n])])
                t1 = time.perf_counter()
                dec._advance_users([(user, False)])
                t["append"].append(t1 - t0)
                t["update"].append(time.perf_counter() - t1)
                dec.store.append_events(user, [next(pending[n])])
                dec.store.put_state(user, StoredState(f"invalidated-{version}", 0, b""))
                t0 = time.perf_counter()
                dec._advance_users([(user, False)])
                t["rebuild"].append(time.perf_counter() - t0)
        dec.store.close()
    rows = {n: {k: percentiles(v) for k, v in times[n].items()} for n in lengths}
    for n, r in rows.items():
        print(
            f"replica n={n:5d}: append p50 {r['append']['p50_ms']:.2f} ms, state update p50 "
            f"{r['update']['p50_ms']:.2f} ms, rebuild p50 {r['rebuild']['p50_ms']:.2f} ms",
            flush=True,
        )
    return rows


def interleaved(lengths: list[int], rng: np.random.Generator) -> list[int]:
    """Every length once per round, in a fresh order: load from other jobs on the machine drifts,
    and measuring the lengths one after another would turn that drift into a length effect."""
    return [lengths[i] for i in rng.permutation(len(lengths))]


def http_level(args, source_ids: np.ndarray, lengths: list[int]) -> dict:
    import httpx
    import ray
    from ray import serve

    from serve_common import api_access, wait_healthy
    from ray_app.serve.app import AppArgs, build_app
    from ray_app.store.base import StoredState
    from ray_app.store.opener import open_store

    rng = np.random.default_rng(args.seed + 1)
    base = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory(prefix="incremental-bench-") as tmp:
        store_url = f"sqlite:///{tmp}/state.db"
        headers = api_access()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            serve.run(
                build_app(AppArgs(checkpoint=str(args.checkpoint), data_dir=str(args.data), store_url=store_url)),
                name="bench",
                route_prefix="/",
            )
            health = wait_healthy(base)
            store = open_store(store_url)
            with httpx.Client(base_url=base, timeout=60.0, headers=headers) as client:
                rows = _http_rounds(
                    client, store, StoredState, health["model_version"], source_ids, lengths, args.http_repeats, rng
                )
            store.close()
        finally:
            serve.shutdown()
            ray.shutdown()
    return rows


def _post(client, path: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = client.post(path, json=body)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"POST {path} -> {r.status_code}: {r.text[:300]}")
    return dt, r.json()


def _http_rounds(client, store, StoredState, version: str, source_ids, lengths: list[int], repeats: int, rng) -> dict:
    keys = ("post_event", "recommend_after_event", "post_event_rebuilt", "recommend_after_rebuilt")
    times = {n: {k: [] for k in keys} for n in lengths}
    fresh = {n: 0 for n in lengths}
    pending = {}
    for n in lengths:
        user = f"bench-incremental-{n}"
        history = random_events(source_ids, n + 2 * repeats, rng)
        for i in range(0, n, 1000):  # the API takes at most 1000 per request
            _post(client, f"/users/{user}/events", {"events": history[i : min(i + 1000, n)]})
        _post(client, "/recommend", {"user_id": user, "k": 10})  # the stored state now covers n events
        pending[n] = iter(history[n:])
    for _ in range(repeats):
        for n in interleaved(lengths, rng):
            user, t = f"bench-incremental-{n}", times[n]
            ev = next(pending[n])
            dt, got = _post(client, f"/users/{user}/events", {"events": [ev]})
            t["post_event"].append(dt)
            dt, rec = _post(
                client, "/recommend", {"user_id": user, "k": 10, "context": {"timestamp": ev["timestamp"] + 60}}
            )
            t["recommend_after_event"].append(dt)
            fresh[n] += rec["n_events"] == got["n_events"]
            # A state from another model version must be ignored: the next request recomputes from every event.
            store.put_state(user, StoredState(model_version=f"invalidated-{version}", n_events=0, blob=b""))
            ev = next(pending[n])
            dt, _ = _post(client, f"/users/{user}/events", {"events": [ev]})
            t["post_event_rebuilt"].append(dt)
            dt, _ = _post(
                client, "/recommend", {"user_id": user, "k": 10, "context": {"timestamp": ev["timestamp"] + 60}}
            )
            t["recommend_after_rebuilt"].append(dt)
    rows = {}
    for n in lengths:
        t = times[n]
        rows[n] = {
            "post_event": percentiles(t["post_event"]),
            "recommend_after_event": percentiles(t["recommend_after_event"]),
            "event_plus_recommend": percentiles(np.add(t["post_event"], t["recommend_after_event"])),
            "post_event_rebuilt": percentiles(t["post_event_rebuilt"]),
            "event_plus_recommend_rebuilt": percentiles(np.add(t["post_event_rebuilt"], t["recommend_after_rebuilt"])),
            "fresh_recommendations": f"{fresh[n]}/{repeats}",
        }
        r = rows[n]
        print(
            f"http   n={n:5d}: POST event p50 {r['post_event']['p50_ms']:.1f} ms, event+recommend p50 "
            f"{r['event_plus_recommend']['p50_ms']:.1f} ms; state rebuilt: POST event p50 "
            f"{r['post_event_rebuilt']['p50_ms']:.1f} ms, event+recommend "
            f"{r['event_plus_recommend_rebuilt']['p50_ms']:.1f} ms,"
            f" fresh {r['fresh_recommendations']}",
            flush=True,
        )
    return rows


def ratios(rows: dict, lengths: list[int], fast: str, slow: str) -> dict:
    lo, hi = rows[lengths[0]], rows[lengths[-1]]
    return {
        f"{fast}_p50_ratio_{lengths[-1]}_vs_{lengths[0]}": hi[fast]["p50_ms"] / lo[fast]["p50_ms"],
        f"{slow}_vs_{fast}_p50_at_{lengths[-1]}": hi[slow]["p50_ms"] / hi[fast]["p50_ms"],
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("model", [("update", "advance by 1 event"), ("recompute", "recompute from all events")])]
    panels.append(
        (
            "replica",
            [
                ("update", "Decomposer: state up to date after 1 event"),
                ("rebuild", "Decomposer: state rebuilt from all events"),
                ("append", "store: append 1 event (commit)"),
            ],
        )
    )
    if record.get("http"):
        panels.append(
            (
                "http",
                [
                    ("post_event", "POST /users/{id}/events"),
                    ("post_event_rebuilt", "POST event, state rebuilt from all events"),
                    ("event_plus_recommend", "event + /recommend (stored state)"),
                    ("event_plus_recommend_rebuilt", "event + /recommend (state rebuilt)"),
                ],
            )
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (level, series) in zip(axes[0], panels):
        lengths = [int(n) for n in record[level]]
        for key, label in series:
            ax.plot(lengths, [record[level][str(n)][key]["p50_ms"] for n in lengths], marker="o", label=label)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="events in the user's history",
            ylabel="p50 latency (ms)",
            title=f"{level} level",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="decomposer checkpoint (trained if missing)"
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="prepared dataset folder the checkpoint was trained on"
    )
    p.add_argument("--lengths", default="50,200,500,1000")
    p.add_argument("--repeats", type=int, default=200, help="model-level timings per length")
    p.add_argument("--http-repeats", type=int, default=30, help="replica-level and HTTP timings per length")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--port", type=int, default=8031)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "incremental_update.json")
    args = p.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_checkpoint(args.checkpoint, args.data)
    model, _ = ckpt.load(args.checkpoint)
    source_ids = load_prepared(args.data).item_source_ids
    index_of = {str(s): i for i, s in enumerate(source_ids) if i > 0}
    torch.set_num_threads(1)  # one serving replica's share of the CPU
    record = {
        "benchmark": "incremental_update",
        "checkpoint": str(args.checkpoint),
        "checkpoint_config": checkpoint_config(args.checkpoint),
        "data": str(args.data),
        "n_items": int(model.cfg.n_items),
        "lstm_units": int(model.cfg.lstm_units),
        "machine": machine("2 shared cores; other engineers' jobs ran at the same time"),
        "command": command_line(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch_threads": 1,
    }
    record["model"] = {
        str(n): r for n, r in model_level(model, index_of, source_ids, lengths, args.repeats, args.seed).items()
    }
    figures = ratios({int(k): v for k, v in record["model"].items()}, lengths, "update", "recompute")
    record["figures"] = {"model_" + k: v for k, v in figures.items()}
    replica = replica_level(args, source_ids, lengths, args.http_repeats)
    record["replica"] = {str(n): r for n, r in replica.items()}
    for k, v in ratios(replica, lengths, "update", "rebuild").items():
        record["figures"]["replica_" + k] = v
    if not args.skip_http:
        http = http_level(args, source_ids, lengths)
        record["http"] = {str(n): r for n, r in http.items()}
        for k, v in ratios(http, lengths, "post_event", "post_event_rebuilt").items():
            record["figures"]["http_" + k] = v
        for k, v in ratios(http, lengths, "event_plus_recommend", "event_plus_recommend_rebuilt").items():
            record["figures"]["http_" + k] = v
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    plot(record, args.out.with_suffix(".png"))
    for k, v in record["figures"].items():
        print(f"{k}: {v:.2f}")
    print(f"recorded in {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
