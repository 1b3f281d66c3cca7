"""Do the learned gates recover the synthetic data's planted context dependence, beyond chance?

    python benchmarks/gate_recovery.py --setting default --seeds 0,1,2
    python benchmarks/gate_recovery.py --setting mixture --seeds 0,1,2

Trains the decomposer on the synthetic default, computes α for every event from the events
before it, and correlates each named dimension's α with the planted weight of the matching
source. Two references bound the figure:
- from below, the same statistic over `--null` untrained decomposers (random gates read the
  context too, so they correlate by chance); a seed counts as recovered above the null's 95th
  percentile;
- from above, a least-squares fit of the planted weights on the context features alone.
`--setting default` is the headline model (the decomposer's defaults, read on |r| since concat
gates may act through a negative preference); `mixture` is the mode whose α_k is the share of
the next event a dimension explains, as the data plants it. Writes
benchmarks/results/gate_recovery_<setting>.json and .png.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm.auto import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quality import RESULTS, machine  # noqa: E402  (sibling script)
from models.evaluation.gates import (
    SETTINGS,
    context_linear_fit,
    correlation_matrix,
    gate_recovery,
    gates_over_history,
    planted_weights,
    random_gate_null,
)
from models.data.batching import make_split  # noqa: E402
from models.data import load_prepared, prepare_source  # noqa: E402
from models.training.defaults import train_config  # noqa: E402
from models.training.loop import fit, new_model  # noqa: E402
from models.files import write_json  # noqa: E402
from models import cli  # noqa: E402

SOURCES = ("topic", "sentiment", "time")


@dataclass
class GateSettings:
    """Which setting of `models.evaluation.gates.SETTINGS`, the seeds trained, their epochs, the null's size."""

    setting: str = cli.setting("default", choices=sorted(SETTINGS))
    seeds: str = cli.setting("0,1,2")
    epochs: int = cli.setting(30)
    null: int = cli.setting(100, "untrained models in the random null")


def parse(argv) -> GateSettings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_settings(p, GateSettings)
    return cli.settings_from(GateSettings, p.parse_args(argv))


def chance_null(s: GateSettings, data, split, model_over: dict, statistic: str) -> np.ndarray:
    """The statistic over `s.null` untrained decomposers (printed: median, 95th percentile, max)."""

    def untrained(i: int):
        torch.manual_seed(10_000 + i)
        return new_model("decomposer", data, split, **model_over)

    null = random_gate_null(untrained, data, s.null, statistic)
    print(
        f"random null ({s.null} untrained models, {statistic}): median {np.median(null):.3f}, "
        f"95th percentile {float(np.quantile(null, 0.95)):.3f}, max {null.max():.3f}"
    )
    return null


def train_seeds(s: GateSettings, data, split, null_95: float) -> dict:
    """The decomposer trained on every seed and its gates scored -> per-seed figures, each seed's
    correlation matrix, and the last seed's gates, targets and planted weights (for the curves)."""
    model_over, train_over, statistic = SETTINGS[s.setting]
    planted_all = planted_weights(data)
    per_seed, matrices = {}, []
    for seed in tqdm([int(x) for x in s.seeds.split(",")], desc="seeds", unit="seed"):
        torch.manual_seed(seed)
        model = new_model("decomposer", data, split, **model_over)
        fit(
            model,
            data,
            split,
            train_config("decomposer", epochs=s.epochs, seed=seed, **train_over),
            desc=f"seed {seed}",
        )
        alpha, targets = gates_over_history(model, data)  # once per model
        planted = planted_all[targets]
        per_seed[seed] = {**gate_recovery(model, data, gates=(alpha, targets))}
        per_seed[seed]["above_null_95"] = per_seed[seed][statistic] > null_95
        matrices.append(correlation_matrix(planted, alpha)[:, :3])
        print(
            f"seed {seed}: "
            + ", ".join(f"{k} {v:+.3f}" if not isinstance(v, bool) else f"{k} {v}" for k, v in per_seed[seed].items())
        )
    return {
        "per_seed": per_seed,
        "matrices": matrices,
        "seed": seed,
        "alpha": alpha,
        "targets": targets,
        "planted": planted,
    }


def plot(s: GateSettings, data, trained: dict, null: np.ndarray, linear: dict, path: Path) -> None:
    """The last seed's planted and learned weights by hour, the mean correlation matrix, and the
    trained seeds against the null and the context-only fit."""
    statistic = SETTINGS[s.setting][2]
    per_seed, seed, alpha, planted = trained["per_seed"], trained["seed"], trained["alpha"], trained["planted"]
    hours = (data.timestamps % 86400) / 3600.0
    null_95 = float(np.quantile(null, 0.95))
    fig, axes = plt.subplots(1, 5, figsize=(21, 3.8))
    for j, name in enumerate(SOURCES):
        bins = np.arange(25)
        which = np.digitize(hours[trained["targets"]], bins) - 1
        axes[j].plot(bins[:-1] + 0.5, [planted[which == b, j].mean() for b in range(24)], label="planted π")
        axes[j].plot(bins[:-1] + 0.5, [alpha[which == b, j].mean() for b in range(24)], label="learned α")
        axes[j].set(title=f"{name} (r = {per_seed[seed][name]:+.2f})", xlabel="hour of day", ylabel="weight")
        axes[j].legend()
    im = axes[3].imshow(np.mean(trained["matrices"], 0), vmin=-1, vmax=1, cmap="RdBu")
    axes[3].set(
        xticks=range(3),
        xticklabels=[f"α {x}" for x in SOURCES],
        yticks=range(3),
        yticklabels=[f"π {x}" for x in SOURCES],
        title="correlation, planted × learned",
    )
    fig.colorbar(im, ax=axes[3])
    axes[4].hist(null, bins=20, color="tab:gray", alpha=0.7, label=f"untrained ({s.null})")
    axes[4].axvline(null_95, color="k", ls="--", label="null 95th pct")
    for x, r in per_seed.items():
        axes[4].axvline(r[statistic], color="tab:red", label="trained" if x == min(per_seed) else None)
    axes[4].axvline(linear["mean"], color="tab:green", ls=":", label="context-only linear fit")
    axes[4].set(title=f"{statistic}: trained against the references", xlabel=statistic)
    axes[4].legend(fontsize=8)
    fig.suptitle(f"setting {s.setting}; curves: seed {seed}; matrix: mean over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def make_record(s: GateSettings, trained: dict, null: np.ndarray, linear: dict) -> dict:
    """What the results JSON holds: the per-seed figures and their mean, the null, the linear fit."""
    model_over, _, statistic = SETTINGS[s.setting]
    per_seed = trained["per_seed"]
    mean = {k: float(np.mean([x[k] for x in per_seed.values()])) for k in (*SOURCES, "matched", "matched_abs")}
    names_hold = {name: all(x[name] > 0.4 for x in per_seed.values()) for name in SOURCES}
    return {
        "benchmark": "gate_recovery",
        "machine": machine(),
        "command": " ".join(sys.argv),
        "setting": s.setting,
        "model_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in model_over.items()},
        "statistic": statistic,
        "per_seed": per_seed,
        "mean": mean,
        "null": {
            "n": s.null,
            "median": float(np.median(null)),
            "p95": float(np.quantile(null, 0.95)),
            "max": float(null.max()),
            "values": null.round(4).tolist(),
        },
        "context_linear_fit": linear,
        "recovered_seeds": int(sum(r["above_null_95"] for r in per_seed.values())),
        "names_hold_on_every_seed": names_hold,
        "matrix_mean": np.mean(trained["matrices"], 0).round(4).tolist(),
    }


def main(argv=None) -> int:
    s = parse(argv)
    model_over, _, statistic = SETTINGS[s.setting]
    data = load_prepared(prepare_source("synthetic", Path("runs/data/synthetic")))
    split = make_split(data.user_offsets, 1)
    null = chance_null(s, data, split, model_over, statistic)
    trained = train_seeds(s, data, split, float(np.quantile(null, 0.95)))
    linear = context_linear_fit(data, trained["targets"])
    plot(s, data, trained, null, linear, RESULTS / f"gate_recovery_{s.setting}.png")
    record = make_record(s, trained, null, linear)
    write_json(RESULTS / f"gate_recovery_{s.setting}.json", record)
    print(
        f"recovered above the null's 95th percentile on {record['recovered_seeds']} of {len(trained['per_seed'])} "
        f"seeds; context-only linear fit r {linear['mean']:.3f}; names hold on every seed: "
        f"{record['names_hold_on_every_seed']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
