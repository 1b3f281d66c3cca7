"""The serving floor: the app's POST /recommend against a no-op chain of the same three hops, in
Serve's default mode and its throughput-optimized mode, under wrk (an outside load generator).

    python benchmarks/serve_floor.py                     # both modes, 8 and 32 connections, 3 rounds of 10 s
    python benchmarks/serve_floor.py --modes throughput_optimized --unbatched   # + the app without batching

`benchmarks/serve_load.py` runs this in the same run as its other steps. The no-op chain
(`serve_floor_app.py`) is a FastAPI ingress that parses the same JSON body and calls two
deployments in a chain, the first's response passed on unresolved to the second as the app passes
the user's state to the Combiner; both return constants. It is what any three-hop Serve app costs
on this machine: the floor. Both apps get one replica per deployment (no access log in the inner
stages; fractional CPUs), are deployed side by side in the same Ray instance (the floor under
/floor) and take turns: at each level, round after round, app then floor, so that a drift in the
shared machine's speed falls on both alike. Each mode runs in a process of its own, because Serve
reads RAY_SERVE_THROUGHPUT_OPTIMIZED when it is imported, in the driver and in every Ray process.
wrk runs on the same cores as Serve. Results: one record per mode and connection count with
req/s, p50/p99 and errors for the app and the floor, and their ratios under `vs_floor`.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from models.files import write_json

HERE = Path(__file__).resolve().parent
MODES = {"default": "0", "throughput_optimized": "1"}
WRK_SCRIPT = HERE / "wrk_recommend.lua"
FLOOR_APP = "floor"


# ---- wrk ---------------------------------------------------------------------------------------


def run_wrk(
    url: str,
    connections: int,
    duration_s: float,
    users_file: Path,
    threads: int = 2,
    path: str = "/recommend",
    honour_retry_after: bool = False,
) -> dict:
    """One wrk run of POST `path` -> req/s, latency percentiles (ms), errors."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    cmd = [
        wrk,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        env={
            **os.environ,
            "WRK_USERS": str(users_file),
            "WRK_PATH": path,
            "WRK_HONOUR_RETRY_AFTER": "1" if honour_retry_after else "0",
        },
    )
    found = re.search(r"^WRK_JSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    w = json.loads(found.group(1))
    errors = sum(w[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return {
        "connections": connections,
        "duration_s": w["duration_us"] / 1e6,
        "requests": w["requests"],
        "throughput_rps": w["requests"] / (w["duration_us"] / 1e6),
        "errors": errors,
        "error_kinds": {
            k: w[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        },
        "mean_ms": w["mean_us"] / 1e3,
        "p50_ms": w["p50_us"] / 1e3,
        "p90_ms": w["p90_us"] / 1e3,
        "p99_ms": w["p99_us"] / 1e3,
        "max_ms": w["max_us"] / 1e3,
    }


def _print(mode: str, what: str, r: dict) -> None:
    print(
        f"{mode:>21} {what:>5} {r['connections']:>3} conns: {r['throughput_rps']:6.1f} req/s, "
        f"p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms, errors {r['errors']}",
        flush=True,
    )


# ---- one mode, in its own process --------------------------------------------------------------


def _app_args(checkpoint: Path, data: Path, store_url: str, unbatched: bool):
    """The app with one replica per deployment -> (its AppArgs, the CPUs of one replica)."""
    from ray_app.serve.app import AppArgs, DeploymentSettings

    # 0.2 CPU a replica; 0.15 with the third app, so that its replicas fit the 2 cores too (a
    # fraction only schedules: every replica runs one thread either way).
    one = dict(num_cpus=0.15 if unbatched else 0.2, min_replicas=1, max_replicas=1, access_log=False)
    app_args = AppArgs(
        checkpoint=str(checkpoint),
        data_dir=str(data),
        store_url=store_url,
        encoder=DeploymentSettings(**one),
        decomposer=DeploymentSettings(**one),
        combiner=DeploymentSettings(**one),
        ingress=DeploymentSettings(**{**one, "access_log": True}, max_ongoing_requests=100),
    )
    return app_args, one["num_cpus"]


def _deploy_side_by_side(app_args, num_cpus: float, url: str, unbatched: bool) -> float:
    """The app at /, the floor at /floor (and the unbatched app at /unbatched), all healthy -> seconds it took."""
    from ray import serve

    from ray_app.serve.app import build_app
    from serve_common import wait_healthy
    from serve_floor_app import floor_app

    t0 = time.time()
    serve.run(build_app(app_args), name="app", route_prefix="/")
    serve.run(floor_app(num_cpus), name=FLOOR_APP, route_prefix=f"/{FLOOR_APP}")
    if unbatched:  # the same app with max_batch_size 1 in every stage: batching's own share
        serve.run(
            build_app(app_args.model_copy(update={"batching": False})), name="unbatched", route_prefix="/unbatched"
        )
        wait_healthy(f"{url}/unbatched")
    wait_healthy(url)
    wait_healthy(f"{url}/{FLOOR_APP}")
    return time.time() - t0


def _take_turns(
    mode: str, url: str, paths: dict, levels: list[int], duration_s: float, users_file: Path, rounds: int
) -> list[dict]:
    """A warm-up of each app, then wrk at every level, round by round, app after app -> every run,
    each with the CPU ms per request of every Ray process (`replica_cpu.py`)."""
    import replica_cpu

    for what in paths:  # warm-up, not recorded
        run_wrk(url, 8, min(5.0, duration_s), users_file, path=paths[what])
    # Both apps stay deployed and take turns, level by level, round by round: a drift in the
    # machine's speed (shared cores) falls on both alike.
    runs = []
    for r in range(rounds):
        for c in levels:
            for what in paths:
                before = replica_cpu.snapshot()
                res = {"round": r, "app": what, **run_wrk(url, c, duration_s, users_file, path=paths[what])}
                res["cpu_ms_per_request"] = replica_cpu.per_request(before, replica_cpu.snapshot(), res["requests"])
                runs.append(res)
                _print(mode, what, res)
    return runs


def _compare(out: dict, paths: dict, levels: list[int], unbatched: bool) -> None:
    """Each app's rounds pooled per level into `out`, and the app over the floor (and over the unbatched app)."""
    for what in paths:
        out[what] = {
            str(c): _pooled([x for x in out["runs"] if x["app"] == what and x["connections"] == c]) for c in levels
        }
    out["vs_floor"] = {
        str(c): {
            "throughput": out["app"][str(c)]["throughput_rps"] / out["floor"][str(c)]["throughput_rps"],
            "p99": out["app"][str(c)]["p99_ms"] / out["floor"][str(c)]["p99_ms"],
            "p50": out["app"][str(c)]["p50_ms"] / out["floor"][str(c)]["p50_ms"],
        }
        for c in levels
    }
    if unbatched:
        out["batched_over_unbatched"] = {
            str(c): out["app"][str(c)]["throughput_rps"] / out["unbatched"][str(c)]["throughput_rps"] for c in levels
        }


def measure_mode(
    mode: str,
    checkpoint: Path,
    data: Path,
    levels: list[int],
    duration_s: float,
    port: int,
    users_file: Path,
    store_url: str,
    rounds: int,
    unbatched: bool = False,
) -> dict:
    """Runs in a fresh process whose environment already holds RAY_SERVE_THROUGHPUT_OPTIMIZED."""
    import ray
    from ray import serve

    from serve_common import api_access

    api_access()
    url = f"http://127.0.0.1:{port}"
    app_args, num_cpus = _app_args(checkpoint, data, store_url, unbatched)
    out = {
        "mode": mode,
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED"),
        "rounds": rounds,
        "runs": [],
    }
    paths = {"app": "/recommend", "floor": f"/{FLOOR_APP}/recommend"}
    if unbatched:
        paths["unbatched"] = "/unbatched/recommend"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        out["startup_s"] = _deploy_side_by_side(app_args, num_cpus, url, unbatched)
        out["runs"] = _take_turns(mode, url, paths, levels, duration_s, users_file, rounds)
    finally:
        serve.shutdown()
        ray.shutdown()
    _compare(out, paths, levels, unbatched)
    return out


def _pooled(runs: list[dict]) -> dict:
    """The rounds of one app and level: req/s over all of them; the median round's percentiles."""
    import statistics

    secs = sum(r["duration_s"] for r in runs)
    return {
        "connections": runs[0]["connections"],
        "rounds": len(runs),
        "duration_s": secs,
        "requests": sum(r["requests"] for r in runs),
        "throughput_rps": sum(r["requests"] for r in runs) / secs,
        "errors": sum(r["errors"] for r in runs),
        **{q: statistics.median(r[q] for r in runs) for q in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")},
        "max_ms": max(r["max_ms"] for r in runs),
        "cpu_ms_per_request": _pooled_cpu(runs),
    }


def _pooled_cpu(runs: list[dict]) -> dict[str, float]:
    """Each process's CPU ms per request over the rounds, weighted by their requests."""
    n = sum(r["requests"] for r in runs)
    names = {k for r in runs for k in r.get("cpu_ms_per_request", {})}
    pooled = {k: sum(r.get("cpu_ms_per_request", {}).get(k, 0.0) * r["requests"] for r in runs) / n for k in names}
    return dict(sorted(pooled.items(), key=lambda x: -x[1]))


def floor_runs(
    checkpoint: Path,
    data: Path,
    users: list[str],
    modes: list[str],
    levels: list[int],
    duration_s: float,
    port: int,
    rounds: int,
    unbatched: bool = False,
) -> dict:
    """Each mode in a child process of its own -> {mode: record}."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="serve-floor-") as tmp:
        users_file = Path(tmp) / "users.txt"
        users_file.write_text("\n".join(users) + "\n")
        for mode in modes:
            result = Path(tmp) / f"{mode}.json"
            env = {
                **os.environ,
                "RAY_SERVE_THROUGHPUT_OPTIMIZED": MODES[mode],
                "RAY_USAGE_STATS_ENABLED": "0",
                # the replicas import the no-op chain's classes from this folder
                "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
            }
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                mode,
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(data),
                "--levels",
                ",".join(map(str, levels)),
                "--duration",
                str(duration_s),
                "--rounds",
                str(rounds),
                "--port",
                str(port),
                "--users-file",
                str(users_file),
                "--store-url",
                f"sqlite:///{tmp}/{mode}.db",
                "--out",
                str(result),
                *(["--unbatched"] if unbatched else []),
            ]
            subprocess.run(cmd, check=True, env=env, timeout=1800)
            out[mode] = json.loads(result.read_text())
    return out


def summary(runs: dict) -> dict:
    """The figures the targets name: per mode and connection count, the app over the floor."""
    return {
        mode: {
            c: {
                "app_rps": r["app"][c]["throughput_rps"],
                "floor_rps": r["floor"][c]["throughput_rps"],
                "app_p99_ms": r["app"][c]["p99_ms"],
                "floor_p99_ms": r["floor"][c]["p99_ms"],
                "throughput_vs_floor": r["vs_floor"][c]["throughput"],
                "p99_vs_floor": r["vs_floor"][c]["p99"],
                "errors": r["app"][c]["errors"] + r["floor"][c]["errors"],
            }
            for c in r["app"]
        }
        for mode, r in runs.items()
    }


def main(argv=None) -> int:
    from serve_common import DEFAULT_CHECKPOINT, DEFAULT_DATA, RESULTS, command_line, ensure_checkpoint, machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--levels", default="8,32", help="wrk connection counts")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of one wrk run")
    p.add_argument("--rounds", type=int, default=3, help="turns each app takes at each level")
    p.add_argument("--port", type=int, default=8033)
    p.add_argument("--users", type=int, default=200, help="known users the requests pick from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--unbatched",
        action="store_true",
        help="also the app without batching, side by side and taking turns: batched over unbatched",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "serve_floor.json")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--users-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--store-url", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    levels = [int(c) for c in a.levels.split(",")]
    if a.child:
        record = measure_mode(
            a.child,
            a.checkpoint.resolve(),
            a.data.resolve(),
            levels,
            a.duration,
            a.port,
            a.users_file,
            a.store_url,
            a.rounds,
            a.unbatched,
        )
        write_json(a.out, record, indent=None)
        return 0
    from serve_load_app import make_spec

    ensure_checkpoint(a.checkpoint, a.data)
    users = make_spec(a.data, a.users, a.seed)["users"]
    runs = floor_runs(
        a.checkpoint, a.data, users, a.modes.split(","), levels, a.duration, a.port, a.rounds, a.unbatched
    )
    record = {
        "benchmark": "serve_floor",
        "command": command_line(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine("wrk runs on the same 2 cores as Serve"),
        "modes": runs,
        "vs_floor": summary(runs),
        **(
            {"batched_over_unbatched": {m: r["batched_over_unbatched"] for m, r in runs.items()}} if a.unbatched else {}
        ),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, record)
    print(json.dumps(record["vs_floor"], indent=1))
    print(f"recorded in {a.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
