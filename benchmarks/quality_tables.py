"""The quality benchmark's tables from its recorded runs: per-protocol rows, the declared comparison,
the intent and cold-start tables, exploratory intervals, and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.data.batching import INTENT_REGIMES
from models.evaluation.metrics import seed_user_bootstrap
from models.evaluation.report import format_table
from quality_variants import FUSED, METRICS, PRIMARY, fused_name, intent_name

COLUMNS = ["model", "seeds", *METRICS, "ndcg@10 unmasked", "ndcg@10 new targets", "valid ndcg@10", "train s"]


def cold_table(runs: dict, protocol: str) -> dict:
    """Per model (no words): NDCG@10 on the cold-start targets, mean over seeds."""
    by: dict[str, list] = {}
    for key, r in runs.items():
        if key.startswith(protocol + "/") and "cold_items" in r:
            by.setdefault(key.split("/")[1], []).append(r["cold_items"])
    return {
        name: {
            "targets": rs[0]["targets"],
            "seeds": len(rs),
            "ndcg@10": round(float(np.mean([c["ndcg@10"] for c in rs])), 6),
            "hr@10": round(float(np.mean([c["hr@10"] for c in rs])), 6),
        }
        for name, rs in by.items()
    }


def by_variant(runs: dict, protocol: str) -> dict[str, list[dict]]:
    """The runs of `protocol`, grouped by variant name (one entry per seed)."""
    out: dict[str, list[dict]] = {}
    for key, r in runs.items():
        if key.startswith(protocol + "/"):
            out.setdefault(key.split("/")[1], []).append(r)
    return out


def table_rows(runs: dict, protocol: str) -> list[dict]:
    """One formatted row per variant (mean ± std over seeds), best test NDCG@10 first."""
    rows = []
    for name, rs in by_variant(runs, protocol).items():
        row = {"model": name, "seeds": len(rs)}
        for m in METRICS:
            v = np.array([r["masked"][m] for r in rs])
            row[m] = f"{v.mean():.4f} ± {v.std():.4f}"
        u = np.array([r["unmasked"]["ndcg@10"] for r in rs])
        row["ndcg@10 unmasked"] = f"{u.mean():.4f}"
        new = [r["masked_new"]["ndcg@10"] for r in rs if r.get("masked_new")]
        row["ndcg@10 new targets"] = f"{np.mean(new):.4f}" if new else ""
        valid = [r["valid_ndcg@10"] for r in rs if "valid_ndcg@10" in r]
        row["valid ndcg@10"] = f"{np.mean(valid):.4f}" if valid else ""
        row["train s"] = f"{np.mean([r['train_seconds'] for r in rs]):.0f}"
        rows.append(row)
    rows.sort(key=lambda r: -float(r["ndcg@10"].split()[0]))
    return rows


def aggregate(runs: dict, protocol: str) -> tuple[list[dict], dict]:
    """The rows of `protocol`, and exploratory intervals of each decomposer variant against each baseline."""
    rows = table_rows(runs, protocol)
    groups = by_variant(runs, protocol)
    per_seed = {n: np.array([r["user_ndcg@10"] for r in rs]) for n, rs in groups.items()}  # (S, U)
    boot = {}
    baselines = [n for n in per_seed if n.startswith(("sasrec", "gru4rec", "lstm")) and " intent" not in n]
    baselines += ["decomposer", "plain decomposer"]
    for other in baselines:
        for name in [n for n in per_seed if n.startswith("decomposer") and " intent" not in n]:
            if other in per_seed and name != other:
                boot[f"{name} − {other}"] = seed_user_bootstrap(per_seed[name], per_seed[other])
    return rows, boot


def seed_means(runs: dict, protocol: str, name: str, metric: str = "ndcg@10") -> list[float]:
    return [r["masked"][metric] for k, r in runs.items() if k.rsplit("/", 1)[0] == f"{protocol}/{name}"]


def primary_comparison(runs: dict) -> dict | None:
    """The declared comparison (PRIMARY) from the runs recorded so far; None until both sides have run."""
    p = PRIMARY
    users = {}
    for side in ("model", "baseline"):
        users[side] = np.array(
            [r["user_ndcg@10"] for k, r in runs.items() if k.rsplit("/", 1)[0] == f"{p['protocol']}/{p[side]}"]
        )
    if not len(users["model"]) or not len(users["baseline"]):
        return None
    a = float(np.mean(seed_means(runs, p["protocol"], p["model"], p["metric"])))
    b = float(np.mean(seed_means(runs, p["protocol"], p["baseline"], p["metric"])))
    boot = seed_user_bootstrap(users["model"], users["baseline"])
    return {
        **p,
        "model_mean": round(a, 6),
        "baseline_mean": round(b, 6),
        "ratio": round(a / b, 4),
        "difference": round(a - b, 6),
        "lo": round(boot["lo"], 6),
        "hi": round(boot["hi"], 6),
        "seeds": boot["seeds"],
        "users": boot["users"],
        "interval": "95%, bootstrap over seeds and users (paired by user)",
    }


def intent_table(runs: dict, protocol: str) -> dict:
    """Per regime: the decomposer with the words against the strongest baseline given the same words."""
    out = {}
    no_words = seed_means(runs, protocol, "decomposer")
    for regime in INTENT_REGIMES:
        mine = seed_means(runs, protocol, intent_name("decomposer", regime))
        rivals = {
            name: seed_means(runs, protocol, intent_name(name, regime))
            for name in ("text retrieval", "phrase popularity", *map(fused_name, FUSED))
        }
        rivals = {n: float(np.mean(v)) for n, v in rivals.items() if v}
        if not mine or not rivals:
            continue
        name = max(rivals, key=rivals.get)
        m = float(np.mean(mine))
        out[regime] = {
            "model": round(m, 6),
            "baseline": round(rivals[name], 6),
            "baseline_name": name,
            "ratio": round(m / rivals[name], 4) if rivals[name] else None,
            "model_seeds": len(mine),
            "oracle": regime == "oracle",
        }
        if no_words:
            out[regime]["model_without_words"] = round(float(np.mean(no_words)), 6)
    return out


def plot(tables: dict, dataset: str, path: Path) -> None:
    """NDCG@10 (history-masked) per model and protocol, mean and std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 3.6), squeeze=False)
    for ax, (protocol, t) in zip(axes[0], tables.items()):
        rows = t["rows"][::-1]
        mean = [float(r["ndcg@10"].split()[0]) for r in rows]
        std = [float(r["ndcg@10"].split()[-1]) for r in rows]
        ax.barh([r["model"] for r in rows], mean, xerr=std, color="tab:blue", alpha=0.8)
        ax.set(title=f"{dataset}, {protocol}", xlabel="NDCG@10 (history-masked)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(runs: dict, protocols: list[str], dataset: str, n_targets: dict[str, int]) -> dict:
    """Print every table and return what the results file records of them."""
    tables = {}
    for protocol in protocols:
        rows, boot = aggregate(runs, protocol)
        tables[protocol] = {"rows": rows, "bootstrap": boot}
        print(
            f"\n### {dataset}, protocol {protocol} ({n_targets[protocol]} test targets, "
            f"history-masked, mean ± std over seeds)\n"
        )
        print(format_table(rows, COLUMNS))
        print(
            "\nExploratory: NDCG@10 differences, 95% bootstrap over seeds and users "
            "(not the declared comparison; read as leads, not findings):"
        )
        for k, v in boot.items():
            print(f"- {k}: {v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] ({v['seeds'][0]}/{v['seeds'][1]} seeds)")
    primary = primary_comparison(runs)
    if primary:
        print(
            f"\nPrimary comparison (declared before the runs), {primary['protocol']} NDCG@10: "
            f"{primary['model']} {primary['model_mean']:.4f} against {primary['baseline']} "
            f"{primary['baseline_mean']:.4f}: ratio {primary['ratio']:.3f}, difference "
            f"{primary['difference']:+.4f} [{primary['lo']:+.4f}, {primary['hi']:+.4f}] "
            f"({primary['seeds'][0]} and {primary['seeds'][1]} seeds, {primary['users']} users)"
        )
    cold = cold_table(runs, PRIMARY["protocol"])
    if cold:
        print(
            f"\nCold-start targets ({PRIMARY['protocol']}: items no training event holds; id-only models "
            "have nothing learned about them, their scores are untrained embeddings):"
        )
        for name, c in sorted(cold.items(), key=lambda kv: -kv[1]["ndcg@10"]):
            print(
                f"- {name}: NDCG@10 {c['ndcg@10']:.4f}, HR@10 {c['hr@10']:.4f} "
                f"({c['targets']} targets, {c['seeds']} seeds)"
            )
    intent = intent_table(runs, PRIMARY["protocol"])
    for regime, r in intent.items():
        label = " (oracle: the words come from the target)" if r["oracle"] else ""
        print(
            f"intent {regime}{label}: decomposer {r['model']:.4f} against {r['baseline_name']} "
            f"{r['baseline']:.4f} (ratio {r['ratio']}); without words {r.get('model_without_words', float('nan')):.4f}"
        )
    return {"summary": tables, "primary": primary, "cold_items": cold, "intent": intent}
