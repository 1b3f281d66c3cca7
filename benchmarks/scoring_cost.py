"""What per-dimension scoring and the backbones cost, each against its reference in the same run.

    python benchmarks/scoring_cost.py       # writes benchmarks/results/scoring_cost.json

Three figures, timed as CPU seconds of this process (robust to a busy machine), the variants
taking turns round by round so that drift hits every variant alike:
  epoch   training steps on ml-latest-small's prepared batches (the same batches for every
          variant): `concat` (the seed's single vector) against `max` (per-dimension scores, a
          soft maximum) with K = 2 and 4 members, `mixture` with 3, and the backbone alone.
          Target: `max` within 2x of `concat`.
  serve   one request ranked in-process at 60 k items: `score_and_gates`, the seen items masked,
          the top 10, for `max` with K = 4 members against `concat`. Target: p50 <= 5 ms.
  update  one new event advancing a stored state (`advance`): the transformer (its window of the
          last 200 events recomputed) against the LSTM and the GRU (one recurrent step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import machine  # noqa: E402  (sibling script)
from models.data import load_prepared  # noqa: E402
from models.data.batching import batch_builder, length_bucketed_batches, training_windows  # noqa: E402
from models.files import write_json  # noqa: E402
from models.nn.decomposer import DecomposerConfig, InterestDecomposer  # noqa: E402
from models.training.defaults import protocol_split  # noqa: E402
from models.training.loop import new_model  # noqa: E402
from ray_app.train.data import resolve_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ONE_DIM = {"dims": (), "n_latent": 1}  # one dimension: with the base, two members
EPOCH_VARIANTS = {
    "concat": {"combine": "concat"},
    "max, K=2": {"combine": "max", **ONE_DIM},
    "max, K=4": {"combine": "max", "n_latent": 0},  # topic, sentiment, time and the base
    "mixture, K=3": {"combine": "mixture", "n_latent": 0},
    "backbone alone": {"combine": "max", "dims": (), "n_latent": 0},
}


def cpu_time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return out


def epoch_cost(data, steps: int, rounds: int) -> dict:
    """CPU seconds per training step of each variant over the same batches."""
    split = protocol_split(data.user_offsets, "last10")
    starts, ends, rows = training_windows(split, 200)
    builder = batch_builder(data)
    rng = np.random.default_rng(0)
    idx = length_bucketed_batches(ends - starts, 64, rng)[:steps]
    batches = [builder(starts[i], ends[i], split.user_start[rows[i]], supervise_all=True, rng=rng) for i in idx]
    models, opts = {}, {}
    for name, over in EPOCH_VARIANTS.items():
        torch.manual_seed(0)
        models[name] = new_model("decomposer", data, split, **over).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3)

    def run(name):
        m, opt = models[name], opts[name]
        for b in batches:
            loss, _ = m(b)
            opt.zero_grad()
            loss.backward()
            opt.step()

    times = {name: [] for name in EPOCH_VARIANTS}
    for name in EPOCH_VARIANTS:  # one warm-up pass each
        run(name)
    for _ in range(rounds):
        for name in EPOCH_VARIANTS:
            times[name] += [t / len(batches) for t in cpu_time(lambda n=name: run(n), 1)]
    per_step = {name: float(np.median(v)) for name, v in times.items()}
    return {
        "steps": len(batches),
        "rounds": rounds,
        "cpu_s_per_step": per_step,
        "ratio_to_concat": {name: v / per_step["concat"] for name, v in per_step.items()},
        "members": {name: len(models[name].cfg.member_names) for name in EPOCH_VARIANTS},
    }


def serve_cost(n_items: int, requests: int) -> dict:
    """In-process ranking of one request at `n_items` items: p50/p99 ms, `max` (K = 4) and `concat`."""
    out = {}
    for name, over in (("max, K=4", {"combine": "max", "n_latent": 0}), ("concat", {"combine": "concat"})):
        torch.manual_seed(0)
        m = InterestDecomposer(DecomposerConfig(n_items=n_items, n_genres=20, **over)).eval()
        V = m.items.all().detach()
        z, ctx = torch.randn(1, m.state_dim), torch.randn(1, 5)
        seen = torch.randint(1, n_items + 1, (1, 200))

        def rank(m=m, z=z, ctx=ctx, V=V, seen=seen):
            with torch.no_grad():
                scores, _ = m.score_and_gates(z, ctx, item_vecs=V)
                scores[:, 0] = -torch.inf
                scores.scatter_(1, seen, -torch.inf)
                scores.topk(10)

        rank()
        ms = [1000 * t for t in cpu_time(rank, requests)]
        out[name] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    return {"n_items": n_items, "requests": requests, **out}


def update_cost(events: int, repeats: int) -> dict:
    """One event advancing a stored state of `events` events, per backbone: µs (median)."""
    out = {}
    for backbone in ("lstm", "gru", "transformer"):
        torch.manual_seed(0)
        m = InterestDecomposer(DecomposerConfig(n_items=1000, backbone=backbone, combine="max")).eval()
        items = torch.randint(1, 1001, (1, events))
        ratings = torch.randint(1, 11, (1, events))
        feats = torch.randn(1, events, 5)
        with torch.no_grad():
            state = m.advance(None, items, ratings, feats)
            one = (items[:, :1], ratings[:, :1], feats[:, :1])
            us = [1e6 * t for t in cpu_time(lambda m=m, s=state, one=one: m.advance(s, *one), repeats)]
        out[backbone] = float(np.median(us))
    return {"history": events, "us_per_event": out, "transformer_over_lstm": out["transformer"] / out["lstm"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-latest-small")
    p.add_argument("--steps", type=int, default=20, help="training steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--items", type=int, default=60_000, help="catalogue size of the serving figure")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU time is one core's)")
    p.add_argument("--out", type=Path, default=RESULTS / "scoring_cost.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = load_prepared(resolve_dataset(a.dataset))
    record = {
        "benchmark": "scoring_cost",
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": a.threads,
        "epoch": epoch_cost(data, a.steps, a.rounds),
        "serve": serve_cost(a.items, 200),
        "update": update_cost(200, 50),
    }
    record["targets"] = {
        "max_epoch_within_2x_concat": {
            name: bool(r <= 2.0) for name, r in record["epoch"]["ratio_to_concat"].items() if name.startswith("max")
        },
        "serve_p50_ms_at_most_5": bool(record["serve"]["max, K=4"]["p50_ms"] <= 5.0),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, record, indent=2)
    print(f"epoch, CPU s per step: { {k: round(v, 3) for k, v in record['epoch']['cpu_s_per_step'].items()} }")
    print(f"epoch, ratio to concat: { {k: round(v, 2) for k, v in record['epoch']['ratio_to_concat'].items()} }")
    print(f"serve at {a.items} items: {record['serve']}")
    print(f"update, µs per event: {record['update']['us_per_event']}")
    print(f"recorded in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
