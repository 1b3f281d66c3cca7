"""A real multi-node Ray cluster on one Linux machine: each host a network namespace.

    cluster = NetnsCluster(Path("/tmp/mn"), workers=3)
    with cluster:                       # bridge, namespaces, `ray start` on every host, Redis on the head
        cluster.kill("w2")              # every process of host w2, SIGKILL: the node is gone
        cluster.start_node("w2")        # a fresh node on the same address

Each host is an `ip netns` with its own loopback and one veth pair to a bridge in the machine's
own namespace, on a /24 the cluster picks among addresses no interface uses. The head runs
`ray start --head` with no CPUs (GCS, the job server, Train's controller, Serve's controller and
a proxy), the workers one CPU each, so Ray must place two 1-CPU workers on two different hosts.
Redis (AOF, fsync on every write, a password) runs on the head host. Ray's token
authentication is on, with a token made here. Every host shares the file system, as a
cluster with a shared volume does; only the network separates them.

Two settings a real cluster needs too: Gloo (the CPU process group of DDP) picks the address its
hostname resolves to, which is loopback when every host has the same name, so each host sets
`GLOO_SOCKET_IFNAME` to its own interface; and Ray starts with a small object store per host.

Needs root (CAP_NET_ADMIN) and iproute2; `available()` says whether this machine has them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
GCS_PORT = 6379
DASHBOARD_PORT = 8265
REDIS_PORT = 6390
REDIS_PASSWORD_ENV = "DYNAMIC_INTEREST_REDIS_PASSWORD"  # the name k8s/rayservice.yaml gives it
IFNAME = "eth0"  # the host's side of its veth pair, inside its namespace


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def available() -> str | None:
    """None if hosts can be made here and reach each other, else why not: a bridge and two namespaces
    are built, one listens on TCP and the other connects, and all of it is removed again."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not on PATH (apt-get install iproute2)"
    try:
        probe = NetnsCluster(Path("/tmp"), workers=1)  # only its network is built: no Ray, no Redis
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        return f"cannot list this machine's addresses: {e}"
    a, b = probe.hosts["head"], probe.hosts["w1"]
    try:
        probe._network()
        server = (
            "import socket; s = socket.socket(); s.bind(('{ip}', 7)); s.listen(); s.settimeout(10); s.accept()"
        ).format(ip=a.ip)
        listen = subprocess.Popen(["ip", "netns", "exec", a.netns, sys.executable, "-c", server])
        client = (
            "import socket, time\n"
            "for _ in range(50):\n"
            "    try: socket.create_connection(('{ip}', 7), timeout=1); break\n"
            "    except ConnectionRefusedError: time.sleep(0.1)\n"
            "else: raise SystemExit(1)"
        ).format(ip=a.ip)
        reached = subprocess.run(
            ["ip", "netns", "exec", b.netns, sys.executable, "-c", client], capture_output=True, timeout=20
        )
        listen.wait(timeout=15)
        if reached.returncode != 0:
            return "two network namespaces on a bridge cannot reach each other here (a firewall on bridged traffic?)"
        return None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", "") or e
        return f"cannot build hosts in network namespaces (needs root / CAP_NET_ADMIN): {str(detail).strip()}"
    finally:
        probe.down()


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no interface of this machine is on."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for net in ipaddress.ip_network("10.213.0.0/16").subnets(new_prefix=24):
        if f" {net.network_address.exploded.rsplit('.', 1)[0]}." not in used:
            return net
    raise RuntimeError("no free /24 in 10.213.0.0/16 for the test cluster")


@dataclass
class Host:
    name: str  # "head", "w1", ...
    netns: str
    ip: str
    veth: str  # the bridge's side of the pair, in the machine's own namespace
    cpus: int


@dataclass
class NetnsCluster:
    root: Path  # logs, Ray's temp dirs, Redis's data; short (Ray's socket paths have a length limit)
    workers: int = 3
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every host's Ray
    object_store_bytes: int = 300 * 2**20

    def __post_init__(self):
        tag = secrets.token_hex(2)
        self.bridge = f"dibr{tag}"
        net = free_subnet()
        addrs = list(net.hosts())
        self.gateway = str(addrs[-1])  # the machine's own address on the bridge: where tests connect from
        names = ["head"] + [f"w{i}" for i in range(1, self.workers + 1)]
        self.hosts = {
            n: Host(n, f"di{tag}{n}", str(addrs[i]), f"v{tag}{n}", 0 if n == "head" else 1) for i, n in enumerate(names)
        }
        self.token = secrets.token_hex(32)
        self.redis_password = secrets.token_hex(16)

    # -- addresses --------------------------------------------------------------------
    @property
    def head(self) -> Host:
        return self.hosts["head"]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def job_address(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@{self.head.ip}:{REDIS_PORT}/0"

    @property
    def store_url(self) -> str:
        """The URL a serve config names: the password from each host's environment, as in `k8s/`."""
        return f"redis://:${{{REDIS_PASSWORD_ENV}}}@{self.head.ip}:{REDIS_PORT}/0"

    @property
    def token_path(self) -> Path:
        return self.root / "ray_token"

    def client_env(self) -> dict[str, str]:
        """The environment of a `ray job` / `serve` command run from this machine's namespace."""
        env = {**os.environ, **self._ray_env()}
        env.pop("RAY_ADDRESS", None)
        return env

    def _ray_env(self) -> dict[str, str]:
        return {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    # -- life cycle -------------------------------------------------------------------
    def __enter__(self) -> NetnsCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(self.token)
        self._network()
        self._redis()
        self.start_node("head")
        self.start_node(*[name for name in self.hosts if name != "head"])  # the workers join side by side
        self.wait_for_nodes(len(self.hosts))

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts.values():
            subprocess.run(["ip", "netns", "add", h.netns], check=True, capture_output=True)
            _ip("link", "set", "lo", "up", netns=h.netns)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", IFNAME, "netns", h.netns)
            _ip("link", "set", h.veth, "master", self.bridge, "up")
            _ip("addr", "add", f"{h.ip}/24", "dev", IFNAME, netns=h.netns)
            _ip("link", "set", IFNAME, "up", netns=h.netns)

    def _redis(self) -> None:
        data = self.root / "redis"
        data.mkdir(exist_ok=True)
        self.popen(
            "head",
            [shutil.which("redis-server") or "redis-server", "--bind", self.head.ip, "--port", str(REDIS_PORT)]
            + ["--requirepass", self.redis_password, "--appendonly", "yes", "--appendfsync", "always"]
            + ["--dir", str(data), "--save", "", "--protected-mode", "no"],
            log=self.root / "redis.log",
        )
        import redis

        r = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                r.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis on {self.head.ip} never answered: {self._tail('redis.log')}") from None
                time.sleep(0.2)

    def popen(self, host: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A process on `host` (inside its namespace), its output in `log`."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[host].netns, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or os.environ.copy(),
                start_new_session=True,
            )

    def start_node(self, *names: str) -> None:
        """`ray start` on each host of `names` (the head, or workers joining it) at once; returns once all are up."""
        procs = {name: self._ray_start(name) for name in names}
        for name, proc in procs.items():
            if proc.wait(timeout=180) != 0:
                raise RuntimeError(f"ray start on {name} exited with {proc.returncode}: {self._tail(f'{name}.log')}")

    def _ray_start(self, name: str) -> subprocess.Popen:
        h = self.hosts[name]
        env = {**os.environ, **self._ray_env(), "GLOO_SOCKET_IFNAME": IFNAME, **self.env}
        env[REDIS_PASSWORD_ENV] = self.redis_password
        env.pop("RAY_ADDRESS", None)
        temp = self.root / f"ray-{name}"
        argv = [str(BIN / "ray"), "start", "--node-ip-address", h.ip, "--num-cpus", str(h.cpus)]
        argv += ["--object-store-memory", str(self.object_store_bytes), "--temp-dir", str(temp)]
        argv += ["--disable-usage-stats"]
        if name == "head":
            argv += ["--head", "--port", str(GCS_PORT), "--include-dashboard", "true"]
            argv += ["--dashboard-host", h.ip, "--dashboard-port", str(DASHBOARD_PORT)]
        else:
            argv += ["--address", self.gcs_address]
        return self.popen(name, argv, log=self.root / f"{name}.log", env=env)

    def wait_for_nodes(self, n: int, timeout_s: float = 120) -> None:
        """Until the cluster counts `n` alive nodes."""
        deadline = time.monotonic() + timeout_s
        while (alive := self.alive_nodes()) != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{alive} of {n} Ray nodes alive after {timeout_s:.0f} s")
            time.sleep(1)

    def alive_nodes(self) -> int:
        out = subprocess.run(
            [str(BIN / "ray"), "list", "nodes", "--address", self.gcs_address, "--filter", "state=ALIVE", "--format"]
            + ["json"],
            capture_output=True,
            text=True,
            env=self.client_env(),
            timeout=60,
        )
        import json

        try:
            return len(json.loads(out.stdout))
        except ValueError:
            return -1

    def pids(self, name: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.hosts[name].netns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def host_of(self, pattern: str) -> list[str]:
        """The hosts running a process whose command line holds `pattern` (Ray sets actors' titles)."""
        found = []
        for name in self.hosts:
            for pid in self.pids(name):
                with contextlib.suppress(OSError):
                    if pattern in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                        found.append(name)
                        break
        return found

    def kill(self, name: str) -> None:
        """SIGKILL every process of host `name`, as a machine that loses power: no clean shutdown."""
        for _ in range(10):  # a process that was forking may leave a child: sweep again
            pids = self.pids(name)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        raise RuntimeError(f"host {name}: processes {self.pids(name)} outlived SIGKILL")

    def down(self) -> None:
        for name in reversed(list(self.hosts)):
            with contextlib.suppress(Exception):
                self.kill(name)
        for h in self.hosts.values():
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", h.veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def _tail(self, log: str, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.root / log).read_text()[-n:]
        return ""
