"""The docs tables of the system benchmarks: Ray Train, serving load and floor, the incremental
update, tuning, the newcomer's first command, the scale benchmark, the approximate top-k and the
multi-node cluster (views of results_doc.py)."""

from __future__ import annotations

from models.evaluation.report import format_table


def table(header: list[str], rows: list[list]) -> str:
    return format_table([dict(zip(header, map(str, r))) for r in rows], header)


def ray_train(records: list[dict]) -> str:
    """The plain loop against Ray Train with one and two workers."""
    f = records[0]["figures"]
    label = {"local": "plain local loop"}
    body = []
    for key in ("local", "one_worker", "two_workers"):
        x = f[key]
        workers, cpus = x.get("workers"), x.get("cpus_per_worker")
        name = label.get(key) or f"Ray Train, {workers} worker{'s' * (workers > 1)} × {cpus} CPU{'s' * (cpus > 1)}"
        body.append([name, f"{x['loop_s']:.1f}", f"{x['sequences_per_s']:.0f}", f"{x['final_valid_ndcg@10']:.4f}"])
    return table(["", f"wall s, {records[0]['epochs']} epochs", "sequences/s", "final valid NDCG@10"], body)


def serve_load(records: list[dict]) -> str:
    """The autoscaled app per client count, and the same model in-process."""
    r = records[0]
    body = []
    for clients, x in r["autoscaled"].items():
        rec = x["per_op"]["recommend"]
        body.append(
            [clients, f"{x['throughput_rps']:.1f}", x["errors"], f"{rec['p50_ms']:.0f} / {rec['p99_ms']:.0f} ms"]
        )
    inproc = r["in_process"]
    body.append(
        [
            "same model in-process",
            f"{inproc['throughput_rps']:.0f}",
            "–",
            f"{inproc['per_op']['recommend']['p50_ms']:.1f} ms",
        ]
    )
    return table(["clients", "req/s", "errors", "`/recommend` p50 / p99"], body)


def floor(records: list[dict]) -> str:
    """The app against the no-op chain of the same hops, per mode and connection count."""
    body = []
    for mode, levels in records[0]["vs_floor"].items():
        for conns, x in levels.items():
            body.append(
                [
                    mode.replace("_", "-"),
                    conns,
                    f"{x['app_rps']:.1f}",
                    f"{x['floor_rps']:.1f}",
                    f"{x['throughput_vs_floor']:.2f}",
                    f"{x['p99_vs_floor']:.2f}",
                ]
            )
    return table(["mode", "connections", "app req/s", "floor req/s", "app ÷ floor", "p99 app ÷ floor"], body)


def incremental(records: list[dict]) -> str:
    """One step per event against the history length and against recomputing from the whole history."""
    f = records[0]["figures"]
    body = [
        [
            "model",
            f"{f['model_update_p50_ratio_1000_vs_50']:.2f}",
            f"{f['model_recompute_vs_update_p50_at_1000']:.1f}×",
        ],
        [
            "Decomposer replica code + SQLite",
            f"{f['replica_update_p50_ratio_1000_vs_50']:.2f}",
            f"{f['replica_rebuild_vs_update_p50_at_1000']:.1f}×",
        ],
        [
            "HTTP `POST /users/{id}/events`",
            f"{f['http_post_event_p50_ratio_1000_vs_50']:.2f}",
            f"{f['http_post_event_rebuilt_vs_post_event_p50_at_1000']:.2f}×",
        ],
    ]
    return table(["level", "p50 at 1000 events ÷ at 50", "full recompute ÷ one step, at 1000 events"], body)


def tuning(records: list[dict]) -> str:
    """Per search: best validation NDCG@10 and trials to the target."""
    body = []
    for name, s in records[0]["searches"].items():
        reached = s["trials_to_target"] if s["trials_to_target"] is not None else "not reached"
        body.append([name, s["trials"], f"{s['best']:.4f}", reached])
    return table(["search", "trials", "best valid NDCG@10", f"trials to {records[0]['target']:.4f}"], body)


def newcomer(records: list[dict]) -> str:
    """The first command's runs: fresh clone (per pip cache) and the install cached."""
    body = []
    for r in records:
        runs = [("fresh clone" + (", pip's cache" if r["pip_cache"] else ", every package from the index"), r["fresh"])]
        if r.get("install_cached"):
            runs.append(("install and data cached", r["install_cached"]))
        for label, x in runs:
            answered = sum(c["ok"] for c in x["curls"])
            body.append(
                [
                    label,
                    f"{x['seconds_to_healthz']:.0f} s",
                    f"{x['seconds_to_demo']:.0f} s",
                    x["lines_before_banner"],
                    x["ray_internal_lines_before_banner"],
                    f"{answered} of {len(x['curls'])} answer",
                ]
            )
    header = ["run", "to `/healthz`", "to the demo", "lines before the banner", "Ray internals among them"]
    return table([*header, "curl lines"], body)


def scale(records: list[dict]) -> str:
    """Per size: seconds and peak RSS of each stage (training: the epoch its measured sequences/s project)."""

    def cell(rec: dict | None, seconds: float | None) -> str:
        if not rec:
            return "not run"
        if "failed" in rec:
            return f"failed: {rec['failed']}"
        return f"{seconds:.1f} s, {rec['peak_rss'] / 2**30:.2f} GiB"

    body = []
    for z in records[0]["sizes"]:
        st = z["stages"]
        prep, srv, sto = st.get("prepare"), st.get("serve"), st.get("store")
        row = [f"{z['events']:,} × {z['items']:,}"]
        row.append(cell(prep, prep and prep.get("read_s", 0) + prep.get("prepare_s", 0)))
        row.append(f"{prep['encode_s']:.0f} s" if prep and "encode_s" in prep else "–")
        row.append(cell(st.get("load"), st.get("load", {}).get("load_s")))
        for loss in ("sampled", "full"):
            rec = st.get(f"train-{loss}")
            row.append(cell(rec, rec and rec.get(loss, {}).get("epoch_s")))
        row.append(
            f"{srv['p50_ms']:.2f} ms, {srv['peak_rss'] / 2**30:.2f} GiB" if srv and "p50_ms" in srv else cell(srv, 0)
        )
        row.append(f"{sto['sqlite_s']:.0f} s / {sto['redis_s']:.0f} s" if sto and "sqlite_s" in sto else cell(sto, 0))
        body.append(row)
    header = ["events × items", "read + prepare", "encoding", "load + split"]
    header += ["epoch, sampled softmax", "epoch, full softmax", "`/recommend` p50, RSS", "bulk load SQLite / Redis"]
    return table(header, body)


def ann(records: list[dict]) -> str:
    """Per catalogue size: the smallest efSearch with recall@10 ≥ the target, against the exact top-10."""
    body = []
    for z in records[0]["sizes"]:
        c = z["chosen"]
        if c is None:  # no efSearch of the sweep reached the target
            best = max(z["sweep"], key=lambda x: x["recall_at_10"])
            body.append([f"{z['items']:,}", f"none ≥ target (best {best['recall_at_10']:.3f})", *[""] * 6])
            continue
        body.append(
            [
                f"{z['items']:,}",
                c["ef_search"],
                f"{c['recall_at_10']:.3f}",
                f"{c['p50_ms']:.3f} / {c['p99_ms']:.3f} ms",
                f"{z['exact']['p50_ms']:.2f} / {z['exact']['p99_ms']:.2f} ms",
                f"{c['p50_ratio_to_exact']:.3f}",
                f"{z['build_s']:.0f} s",
                f"{z['index_bytes'] / 2**20:.0f} MiB",
            ]
        )
    header = ["items", "efSearch", "recall@10", "HNSW p50 / p99", "exact p50 / p99", "p50 ratio", "build", "index"]
    return table(header, body)


def multinode(records: list[dict]) -> str:
    """A host killed in training and in serving: what happened and how long recovery took."""
    t, s = records[0]["training"], records[0]["serving"]
    if s is None:
        return table(["", "figure"], [["training", t["status"]], ["serving", "not run: training did not succeed"]])
    resumed = ", ".join(map(str, t["resumed_from_epoch"])) or "no resume line"
    body = [
        [
            "training: workers' hosts before → after the kill",
            f"{' + '.join(t['workers_hosts_before'])} → "
            f"{' + '.join(t['workers_hosts_after'])} ({t['killed_host']} killed)",
        ],
        ["training: epochs reported at the kill, resumed from", f"{t['reported_epochs_at_kill']}, {resumed}"],
        ["training: kill → next epoch", f"{t['seconds_kill_to_next_epoch']:.0f} s"],
        ["training: job, epochs", f"{t['status']}, {t['last_epoch']} of {t['epochs']}"],
        ["serving: Ingress hosts, killed", f"{' + '.join(s['ingress_hosts_before'])}, {s['killed_host']}"],
        ["serving: kill → a replacement Ingress", f"{s['seconds_to_replacement_ingress']} s"],
        [
            "serving: events acknowledged (before the kill) / stored / lost / duplicated",
            f"{s['events_acknowledged']:,} ({s['events_acknowledged_before_kill']}) / {s['events_stored']:,} / "
            f"{s['events_lost']} / {s['events_duplicated']}",
        ],
        ["serving: event retries (same key)", s["event_retries"]],
        [
            "serving: `/recommend` after the kill: answered 200 / asked",
            f"{s['recommend_ok_after_kill']} / "
            f"{s['recommend_after_kill']} (longest gap {s['recommend_longest_gap_after_kill_s']} s)",
        ],
    ]
    return table(["", "figure"], body)


def scale_ray(records: list[dict]) -> str:
    """Per size and worker count: the driver's and the workers' peak RSS, and the events a worker held."""
    body = []
    for z in records[0]["sizes"]:
        for workers, r in z["runs"].items():
            if "failed" in r:
                body.append([f"{z['events']:,} × {z['items']:,}", workers, f"failed: {r['failed']}", "", "", ""])
                continue
            body.append(
                [
                    f"{z['events']:,} × {z['items']:,}",
                    workers,
                    f"{r['worker_events_max']:,}",
                    f"{r['worker_peak_rss_max'] / 2**30:.2f} GiB",
                    f"{r['peak_rss'] / 2**30:.2f} GiB",
                    f"{r['sequences_per_s']:.0f}",
                ]
            )
    header = ["events × items", "workers", "events per worker (most)", "worker peak RSS (most)", "driver peak RSS"]
    return table(header + ["sequences/s"], body)
