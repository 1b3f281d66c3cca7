"""Soak: does replica memory level off under a stream of distinct intents and new users?

    python benchmarks/serve_soak.py                                # 20,000 intents, 5,000 new users
    python benchmarks/serve_soak.py --intents 4000 --new-users 1000 --every 500

The app (`ray_app.serve.app.build_app`, one replica per deployment, the default text cache of
10,000 vectors) is sent, by a closed loop of `--concurrency` async clients, a stream in which
every request is new to it:
  - POST /recommend for a known user with an intent no request used before (the Encoder's cache
    sees each text once), by a service token;
  - every fourth step also a new user: a user token minted for it (the rate limit's counters see
    each token once), POST /users/{id}/events with three events, then POST /recommend for it.
After every `--every` intents the resident memory (VmRSS) of each replica is read from /proc.
The figure is each replica's RSS at the end over its RSS after the first `--baseline` intents
(target ≤ 1.2). Records benchmarks/results/serve_soak.json and serve_soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from models.cli import add_settings, setting, settings_from
from models.files import write_json
from serve_common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA,
    RESULTS,
    api_access,
    command_line,
    ensure_checkpoint,
    machine,
    wait_healthy,
)

WORDS = (
    "quiet",
    "loud",
    "old",
    "new",
    "dark",
    "funny",
    "slow",
    "fast",
    "french",
    "space",
    "war",
    "love",
    "heist",
    "jazz",
    "winter",
    "summer",
    "ghost",
    "robot",
    "family",
    "detective",
    "island",
    "road",
    "music",
    "sea",
)


def replica_rss(app: str = "soak") -> dict[str, int]:
    """{deployment: resident bytes} of the replica processes of Serve app `app` on this machine
    (Ray titles each `ray::ServeReplica:<app>:<deployment>`)."""
    import psutil

    prefix = f"ray::ServeReplica:{app}:"
    out: dict[str, int] = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith(prefix) and proc.info["memory_info"] is not None:
            name = title[len(prefix) :].split()[0].split(".")[0]
            out[name] = out.get(name, 0) + proc.info["memory_info"].rss
    return out


class Stream:
    """The soak's requests, each new to the app; counts what was sent and what failed."""

    def __init__(self, users: list[str], item_ids: list[str], secret: str, service_token: str, seed: int):
        self.users, self.item_ids, self.secret = users, item_ids, secret
        self.service = {"Authorization": f"Bearer {service_token}"}
        self.rng = np.random.default_rng(seed)
        self.next_intent = 0
        self.new_users = 0
        self.errors: list[str] = []
        self.n_errors = 0

    def intent(self, i: int) -> str:
        words = self.rng.choice(WORDS, size=3, replace=False)
        return f"{' '.join(words)} number {i}"  # distinct text: the number is in it

    async def step(self, http: httpx.AsyncClient, with_new_user: bool) -> None:
        from ray_app.serve.auth import mint

        i = self.next_intent
        self.next_intent += 1
        user = self.users[int(self.rng.integers(len(self.users)))]
        await self._send(
            http, "/recommend", {"user_id": user, "k": 10, "context": {"intent": self.intent(i)}}, self.service
        )
        if with_new_user:
            self.new_users += 1
            uid = f"soak-{self.new_users}-{int(self.rng.integers(1 << 30))}"
            headers = {"Authorization": f"Bearer {mint(self.secret, 'user', uid, ttl_s=3600)}"}
            t = time.time() - 3600
            events = [
                {"item_id": str(self.rng.choice(self.item_ids)), "rating": 4.0, "timestamp": t + 60 * j}
                for j in range(3)
            ]
            await self._send(http, f"/users/{uid}/events", {"events": events}, headers)
            await self._send(http, "/recommend", {"user_id": uid, "k": 10}, headers)

    async def _send(self, http: httpx.AsyncClient, path: str, body: dict, headers: dict) -> None:
        try:
            r = await http.post(path, json=body, headers=headers)
            ok, msg = r.status_code == 200, f"{path}: HTTP {r.status_code} {r.text[:160]}"
        except httpx.HTTPError as e:
            ok, msg = False, f"{path}: {type(e).__name__}: {e}"
        if not ok:
            self.n_errors += 1
            if len(self.errors) < 10:
                self.errors.append(msg)


async def soak(
    url: str, stream: Stream, n_intents: int, new_user_every: int, every: int, concurrency: int
) -> list[dict]:
    samples = [{"intents": 0, "new_users": 0, "t": 0.0, "rss": replica_rss()}]
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as http:

        async def worker(stop: int) -> None:
            while stream.next_intent < stop:
                await stream.step(http, with_new_user=stream.next_intent % new_user_every == 0)

        for stop in range(every, n_intents + 1, every):
            await asyncio.gather(*(worker(stop) for _ in range(concurrency)))
            samples.append(
                {
                    "intents": stream.next_intent,
                    "new_users": stream.new_users,
                    "t": time.perf_counter() - t0,
                    "rss": replica_rss(),
                    "errors": stream.n_errors,
                }
            )
            s = samples[-1]
            print(
                f"{s['intents']:>6} intents, {s['new_users']:>5} new users, {s['t']:6.0f} s: "
                + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(s["rss"].items()))
                + f"; errors {stream.n_errors}",
                flush=True,
            )
    return samples


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    samples = record["samples"]
    for name in sorted(samples[-1]["rss"]):
        ax.plot(
            [s["intents"] for s in samples],
            [s["rss"].get(name, np.nan) / 2**20 for s in samples],
            marker="o",
            ms=3,
            label=name,
        )
    ax.axvline(record["baseline_intents"], color="grey", ls=":", lw=1)
    ax.set(
        xlabel="distinct intents sent (a new user every 4th)",
        ylabel="replica RSS (MiB)",
        title="replica memory under a stream of new intents and users",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class SoakSettings:
    """The app's checkpoint and data, the stream's length and mix, how often memory is read, the port."""

    checkpoint: Path = setting(DEFAULT_CHECKPOINT)
    data: Path = setting(DEFAULT_DATA)
    intents: int = setting(20_000)
    new_users: int = setting(5_000)
    every: int = setting(1_000, "intents between two memory readings")
    baseline: int = setting(2_000, "the reading the end is compared with")
    concurrency: int = setting(8)
    port: int = setting(8034)
    seed: int = setting(0)
    out: Path = setting(RESULTS / "serve_soak.json")


def parse(argv) -> SoakSettings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, SoakSettings)
    s = settings_from(SoakSettings, p.parse_args(argv))
    if s.baseline % s.every or s.intents % s.every or s.new_users < 1:
        p.error("--baseline and --intents must be multiples of --every, and --new-users >= 1")
    return s


def soak_app_args(s: SoakSettings, store_url: str):
    """One replica per deployment, no access log in the inner stages."""
    from ray_app.serve.app import AppArgs, DeploymentSettings

    one = dict(min_replicas=1, max_replicas=1, num_cpus=0.2)
    return AppArgs(
        checkpoint=str(s.checkpoint),
        data_dir=str(s.data),
        store_url=store_url,
        encoder=DeploymentSettings(**one, access_log=False),
        decomposer=DeploymentSettings(**one, access_log=False),
        combiner=DeploymentSettings(**one, access_log=False),
        ingress=DeploymentSettings(**one, max_ongoing_requests=100),
    )


def run_soak(s: SoakSettings, spec: dict) -> tuple[dict, Stream, list[dict]]:
    """The app up on a Ray of its own, the stream sent, Ray down -> (the app's settings as JSON,
    the stream, the memory readings)."""
    import ray
    from ray import serve

    from ray_app.serve.app import build_app
    from ray_app.serve.auth import SECRET_ENV, TOKEN_ENV

    new_user_every = max(1, s.intents // s.new_users)
    url = f"http://127.0.0.1:{s.port}"
    with tempfile.TemporaryDirectory(prefix="serve-soak-") as tmp:
        app_args = soak_app_args(s, f"sqlite:///{tmp}/soak.db")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": s.port})
            serve.run(build_app(app_args), name="soak", route_prefix="/")
            wait_healthy(url)
            stream = Stream(spec["users"], spec["item_ids"], os.environ[SECRET_ENV], os.environ[TOKEN_ENV], s.seed)
            samples = asyncio.run(soak(url, stream, s.intents, new_user_every, s.every, s.concurrency))
        finally:
            serve.shutdown()
            ray.shutdown()
    return json.loads(app_args.model_dump_json()), stream, samples


def make_record(s: SoakSettings, mode: bool, app_args: dict, stream: Stream, samples: list[dict]) -> dict:
    """What the results JSON holds: the readings, and each replica's memory at the end over its baseline."""
    base = next(x for x in samples if x["intents"] == s.baseline)["rss"]
    end = samples[-1]["rss"]
    record = {
        "benchmark": "serve_soak",
        "command": command_line(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(),
        "throughput_optimized": mode,
        "app_args": app_args,
        "intents": stream.next_intent,
        "new_users": stream.new_users,
        "errors": stream.n_errors,
        "error_samples": stream.errors,
        "baseline_intents": s.baseline,
        "samples": samples,
        "rss_end_over_baseline": {k: end[k] / base[k] for k in end if k in base},
        "rss_end_mib": {k: v / 2**20 for k, v in end.items()},
    }
    record["max_ratio"] = max(record["rss_end_over_baseline"].values())
    return record


def main(argv=None) -> int:
    s = parse(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray_app.serve import mode as serve_mode

    mode = serve_mode.use()
    ensure_checkpoint(s.checkpoint, s.data)
    api_access()
    from serve_load_app import make_spec

    spec = make_spec(s.data, 200, s.seed)
    app_args, stream, samples = run_soak(s, spec)
    record = make_record(s, mode, app_args, stream, samples)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(s.out, record)
    plot(record, s.out.with_suffix(".png"))
    print(
        json.dumps(
            {k: record[k] for k in ("intents", "new_users", "errors", "rss_end_over_baseline", "max_ratio")}, indent=1
        )
    )
    print(f"recorded in {s.out} and {s.out.with_suffix('.png')}")
    return 0 if stream.n_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
