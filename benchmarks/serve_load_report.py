"""The report of `serve_load.py`: the headline figures of a record, and its plot (throughput,
latency percentiles, replicas over time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve_load_app import OPS  # sibling script


def plot(record: dict, path: Path) -> None:
    """Throughput, latency percentiles and replicas over time, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    runs = record["autoscaled"]
    levels = sorted(int(c) for c in runs)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.5))
    a1.plot(levels, [runs[str(c)]["throughput_rps"] for c in levels], marker="o", label="Serve, batched, autoscaled")
    a1.axhline(record["in_process"]["throughput_rps"], color="grey", ls="--", label="in-process, sequential")
    for key, marker in (("batched", "s"), ("unbatched", "x")):
        run = record["batching"][key]
        a1.scatter(
            [run["concurrency"]],
            [run["throughput_rps"]],
            marker=marker,
            s=60,
            zorder=3,
            label=f"Serve, {key}, 1 replica each",
        )
    a1.set(
        xscale="log",
        xticks=levels,
        xticklabels=levels,
        xlabel="concurrent clients",
        ylabel="requests/s",
        title="throughput",
    )
    a1.legend(fontsize=7)
    for q, ls in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
        for op, color in (("recommend", "C0"), ("recommend_intent", "C1"), ("post_event", "C2")):
            a2.plot(
                levels,
                [runs[str(c)]["per_op"][op].get(q, np.nan) for c in levels],
                ls=ls,
                color=color,
                marker="o",
                ms=3,
                label=f"{op} {q[:-3]}",
            )
    a2.set(
        xscale="log",
        yscale="log",
        xticks=levels,
        xticklabels=levels,
        xlabel="concurrent clients",
        ylabel="latency (ms)",
        title="latency percentiles",
    )
    a2.legend(fontsize=6, ncol=3)
    samples = [s for s in record["replicas_over_time"] if "replicas" in s]
    names = sorted({n for s in samples for n in s["replicas"]})
    for name in names:
        a3.step([s["t"] for s in samples], [s["replicas"].get(name, 0) for s in samples], where="post", label=name)
    spans: dict[str, list[float]] = {}
    for s in samples:
        spans.setdefault(s["phase"], []).append(s["t"])
    for j, (phase, ts) in enumerate(spans.items()):
        if phase.startswith("load"):
            a3.axvspan(min(ts), max(ts), color=f"C{j % 10}", alpha=0.08)
            a3.text(min(ts), 0.2, phase.replace("load ", ""), fontsize=7)
    a3.set(xlabel="seconds since the app started", ylabel="RUNNING replicas", title="replicas over time")
    a3.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (a1, a2):
        ax.xaxis.set_minor_formatter(NullFormatter())
    a3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figures(record: dict, levels: list[int]) -> dict:
    """The headline figures of a record: throughput and errors per level, p99 at 8 clients, the ratios."""
    runs, base = record["autoscaled"], record["in_process"]
    one = runs[str(min(levels))]
    f = {f"throughput_rps_{c}_clients": runs[str(c)]["throughput_rps"] for c in levels}
    f.update({f"errors_{c}_clients": runs[str(c)]["errors"] for c in levels})
    if "8" in runs:
        f["recommend_p99_ms_8_clients"] = runs["8"]["per_op"]["recommend"].get("p99_ms")
        f["recommend_intent_p99_ms_8_clients"] = runs["8"]["per_op"]["recommend_intent"].get("p99_ms")
    f["in_process_throughput_rps"] = base["throughput_rps"]
    # Serve overhead at one client: same operations, same model code, one request at a time.
    f["serve_overhead_latency_ratio_p50_1_client"] = {
        op: one["per_op"][op]["p50_ms"] / base["per_op"][op]["p50_ms"] for op in OPS if one["per_op"][op].get("count")
    }
    f["in_process_over_serve_throughput_1_client"] = base["throughput_rps"] / one["throughput_rps"]
    b = record["batching"]
    f[f"batched_over_unbatched_throughput_{max(levels)}_clients"] = (
        b["batched"]["throughput_rps"] / b["unbatched"]["throughput_rps"]
    )
    f["autoscaling_max_replicas"] = {n: s["max_seen"] for n, s in record["scaling"].items()}
    f["downscale_back_to_min_after_s"] = record["downscale_after_s"]
    for mode, by_level in record.get("vs_floor", {}).items():
        for c, v in by_level.items():
            f[f"{mode}_{c}_conns_vs_floor"] = {
                "throughput": v["throughput_vs_floor"],
                "p99": v["p99_vs_floor"],
                "app_rps": v["app_rps"],
                "floor_rps": v["floor_rps"],
            }
    return f
