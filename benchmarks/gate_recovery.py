"""Do the learned gates recover the synthetic data's planted context dependence?

    python benchmarks/gate_recovery.py --seeds 0,1,2

Trains the decomposer on the synthetic default, computes α for every event from the events
before it, and correlates each named dimension's α with the planted weight of the matching
source. Writes benchmarks/results/gate_recovery_<combine>.json and .png (planted vs
learned weight against hour of day, and the planted × learned correlation matrix).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quality import RESULTS, machine  # noqa: E402  (sibling script)
from models.analysis import (RECOVERY_MODEL, RECOVERY_TRAIN, correlation_matrix, gate_recovery,  # noqa: E402
                             gates_over_history, planted_weights)
from models.batching import make_split  # noqa: E402
from models.data import load_prepared, prepare_source  # noqa: E402
from models.run import train_config  # noqa: E402
from models.training import fit, new_model  # noqa: E402

SOURCES = ("topic", "sentiment", "time")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=RECOVERY_TRAIN["lr"])
    p.add_argument("--combine", default="mixture", help="the decomposer's combine mode (mixture | concat | sum)")
    args = p.parse_args(argv)
    data = load_prepared(prepare_source("synthetic", Path("runs/data/synthetic")))
    split = make_split(data.user_offsets, 1)
    planted_all = planted_weights(data)
    hours = (data.timestamps % 86400) / 3600.0
    per_seed, matrices = {}, []
    for seed in [int(s) for s in args.seeds.split(",")]:
        torch.manual_seed(seed)
        model = new_model("decomposer", data, split, **{**RECOVERY_MODEL, "combine": args.combine})
        fit(model, data, split, train_config("decomposer", epochs=args.epochs, seed=seed,
                                             **{**RECOVERY_TRAIN, "lr": args.lr}), desc=f"seed {seed}")
        alpha, targets = gates_over_history(model, data)                 # once per model
        planted = planted_all[targets]
        per_seed[seed] = gate_recovery(model, data, gates=(alpha, targets))
        matrices.append(correlation_matrix(planted, alpha)[:, :3])
        print(f"seed {seed}: " + ", ".join(f"{k} r={v:+.3f}" for k, v in per_seed[seed].items()))
    mean = {k: float(np.mean([s[k] for s in per_seed.values()])) for k in (*SOURCES, "matched")}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for j, name in enumerate(SOURCES):
        bins = np.arange(25)
        h = hours[targets]
        which = np.digitize(h, bins) - 1
        axes[j].plot(bins[:-1] + 0.5, [planted[which == b, j].mean() for b in range(24)], label="planted π")
        axes[j].plot(bins[:-1] + 0.5, [alpha[which == b, j].mean() for b in range(24)], label="learned α")
        axes[j].set(title=f"{name} (r = {per_seed[seed][name]:+.2f})", xlabel="hour of day", ylabel="weight")
        axes[j].legend()
    im = axes[3].imshow(np.mean(matrices, 0), vmin=-1, vmax=1, cmap="RdBu")
    axes[3].set(xticks=range(3), xticklabels=[f"α {s}" for s in SOURCES], yticks=range(3),
                yticklabels=[f"π {s}" for s in SOURCES], title="correlation, planted × learned")
    fig.colorbar(im, ax=axes[3])
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.suptitle(f"combine = {args.combine}; curves: seed {seed}; matrix: mean over seeds")
    fig.savefig(RESULTS / f"gate_recovery_{args.combine}.png", dpi=110)
    record = {"benchmark": "gate_recovery", "machine": machine(), "command": " ".join(sys.argv),
              "combine": args.combine, "per_seed": per_seed, "mean": mean,
              "matrix_mean": np.mean(matrices, 0).round(4).tolist()}
    (RESULTS / f"gate_recovery_{args.combine}.json").write_text(json.dumps(record, indent=1))
    print("mean correlation:", {k: round(v, 3) for k, v in mean.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
