"""Redis as k8s/redis.yaml runs it: durable (AOF, fsync always) and persistent, ACL users and a
memory cap in its configuration, the RayService's GCS fault tolerance pointed at it; then a real
redis-server started with the StatefulSet's own script: the store and Ray's GCS work through
their ACL users and nothing else, and at the memory cap writes fail rather than evict."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k8s_helpers import GCS_USER, REDIS_SECRET, STORE_USER, acl_users, load
from store_helpers import free_port, needs_redis


def test_redis_is_durable_and_persistent():
    docs = {d["kind"]: d for d in load("redis.yaml")}
    conf = docs["ConfigMap"]["data"]["redis.conf"].splitlines()
    assert "appendonly yes" in conf and "appendfsync always" in conf and "maxmemory-policy noeviction" in conf
    sts = docs["StatefulSet"]
    mounts = {m["name"]: m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    assert mounts["data"] == "/data" and "dir /data" in conf


# -- Redis: ACL, memory, GCS fault tolerance --------------------------------------------------


def test_redis_has_acl_users_a_memory_cap_and_no_config():
    docs = {d["kind"]: d for d in load("redis.yaml")}
    conf = docs["ConfigMap"]["data"]["redis.conf"].splitlines()
    assert "maxmemory-policy noeviction" in conf and "aclfile /tmp/users.acl" in conf
    (cap,) = [line.split()[1] for line in conf if line.startswith("maxmemory ")]
    (container,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    limit = container["resources"]["limits"]["memory"]
    assert cap == "1gb" and limit == "2Gi", "the cap leaves room below the limit for an AOF rewrite"
    users = acl_users()
    assert set(users) == {"default", STORE_USER, GCS_USER}
    assert users["default"].split()[2] == "off"
    for user in (STORE_USER, GCS_USER):
        rules = users[user].split()
        assert "-@all" in rules and "resetkeys" in rules and not any(r.startswith(">") for r in rules)
        assert not {"+config", "+@all", "+@admin", "+@dangerous", "+acl", "+flushall", "+keys"} & set(rules), user
    # The passwords come from the Secret as files, never from git.
    volumes = {v["name"]: v for v in docs["StatefulSet"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == REDIS_SECRET
    assert "env" not in container


def test_rayservice_has_gcs_fault_tolerance_on_the_redis():
    (service,) = load("rayservice.yaml")
    ft = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    redis_service = next(d for d in load("redis.yaml") if d["kind"] == "Service")
    host, port = ft["redisAddress"].rsplit(":", 1)
    assert host == redis_service["metadata"]["name"] and int(port) == redis_service["spec"]["ports"][0]["port"]
    assert ft["redisUsername"] == {"value": GCS_USER} and GCS_USER in acl_users()
    assert ft["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": "gcs-password"}}}
    assert "externalStorageNamespace" not in ft, "KubeRay's default (the cluster's UID) keeps upgrades apart"


# A redis-server as the StatefulSet runs it: the container's own start script, with its paths
# moved under a temporary folder and random passwords in the Secret's files.


class ManifestRedis:
    def __init__(self, root: Path, *extra: str):
        docs = {d["kind"]: d for d in load("redis.yaml")}
        (container,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
        self.root, self.port = root, free_port()
        self.passwords = {STORE_USER: secrets.token_urlsafe(24), GCS_USER: secrets.token_urlsafe(24)}
        for d in ("conf", "auth", "tmp", "data"):
            (root / d).mkdir(parents=True, exist_ok=True)
        paths = {"/etc/redis/": f"{root}/", "/tmp/": f"{root}/tmp/", "dir /data": f"dir {root}/data"}
        moved = lambda text: re.sub("|".join(map(re.escape, paths)), lambda m: paths[m[0]], text)
        for key, text in docs["ConfigMap"]["data"].items():
            (root / "conf" / key).write_text(moved(text))
        (root / "auth" / "store-password").write_text(self.passwords[STORE_USER])
        (root / "auth" / "gcs-password").write_text(self.passwords[GCS_USER])
        assert container["command"] == ["sh", "-c"]
        self.script, self.arg0 = moved(container["args"][0]), container["args"][1]
        self.probe = moved(container["readinessProbe"]["exec"]["command"][2])
        self.extra = ["--port", str(self.port), "--bind", "127.0.0.1", *extra]
        self.proc = None

    def start(self, admin_password: str | None = None) -> "ManifestRedis":
        if admin_password:  # for the tests' own checks (ACL LOG): appended to the rendered file
            self.script = self.script.replace(
                "\nexec redis-server",
                f"\necho 'user admin on >{admin_password} ~* &* +@all' >> {self.root}/tmp/users.acl\nexec redis-server",
                1,
            )
        self.proc = subprocess.Popen(
            ["sh", "-c", self.script, self.arg0, *self.extra, "--logfile", str(self.root / "log")]
        )
        for _ in range(100):
            if self.probe_ok():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.root / 'log').read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("redis-server did not become ready")

    def probe_ok(self) -> bool:
        return (
            subprocess.run(
                ["sh", "-c", self.probe.replace("redis-cli", f"redis-cli -p {self.port}")], capture_output=True
            ).returncode
            == 0
        )

    def url(self, user: str = STORE_USER) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def manifest_redis(tmp_path):
    server = ManifestRedis(tmp_path / "redis").start(admin_password="admin-" + secrets.token_hex(8))
    yield server
    server.stop()


def _admin(server: ManifestRedis):
    import redis

    pw = re.search(r"user admin on >(\S+)", server.script)[1]
    return redis.Redis(host="127.0.0.1", port=server.port, username="admin", password=pw, decode_responses=True)


@needs_redis
def test_redis_acl_lets_the_store_work_and_nothing_else(manifest_redis):
    import redis

    from ray_app.store.base import AddedItem, Event, StoredState
    from ray_app.store.opener import open_store

    server = manifest_redis
    # Without credentials, or with the wrong ones: nothing.
    with redis.Redis(host="127.0.0.1", port=server.port) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(server.url(STORE_USER).replace(server.passwords[STORE_USER], "wrong")).ping()
    # Every operation of the store, as its user.
    store = open_store(server.url())
    assert store.durable is None  # CONFIG is denied: the manifest's conf is checked here instead
    events = [Event(str(i), 4.0, 1.7e9 + i) for i in range(5)]
    assert store.append_events("u1", events[:2]) == 2
    assert store.append_once("u1", "key-1", events[2:4]) == (4, False)
    assert store.append_once("u1", "key-1", events[2:4]) == (4, True)
    assert store.events("u1", start=1, limit=2) == events[1:3] and store.count_events("u1") == 4
    assert sorted(store.seen_items("u1")) == sorted({e.item_id for e in events[:4]})
    store.put_state("u1", StoredState("v1", 4, b"blob"))
    assert store.get_state("u1") == StoredState("v1", 4, b"blob")
    store.bulk_load({"u2": events, "u10": events[:1]})
    assert store.users(prefix="u1") == [("u1", 4), ("u10", 1)]
    assert store.snapshot("u1", with_seen=True).n_events == 4
    store.revoke_token("jti-1", time.time() + 60)
    assert store.revoked_tokens() == {"jti-1"}
    assert store.erase_user("u2") == 5 and store.count_events("u2") == 0
    item = AddedItem("new-1", "A film", ("comedy",), (), "", b"\0" * 1536, time.time())
    assert store.add_item(item, max_items=10) == 1 and store.count_items() == 1
    assert store.items_since(0) == [item] and store.get_item("new-1") == item
    store.close()
    # The shared rate limits count on the same Redis, as the same user.
    import asyncio

    from ray_app.serve.auth import Principal
    from ray_app.serve.quotas import Quotas, QuotaSettings

    async def limited() -> list[bool]:
        quotas, answers = Quotas(QuotaSettings(user_per_minute=2), server.url()), []
        for _ in range(3):
            try:
                await quotas.admit(Principal("user", "7", token_key="k" * 32))
                answers.append(True)
            except Exception:
                answers.append(False)
        return answers + [quotas.shared]

    assert asyncio.run(limited()) == [True, True, False, True], "counted on the Redis, refused past the limit"
    # Nothing beyond it: administration, other keys, other users' keys.
    with redis.Redis.from_url(server.url(STORE_USER)) as r:
        for command in (
            ("CONFIG", "GET", "*"),
            ("CONFIG", "SET", "appendfsync", "no"),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("ACL", "LIST"),
            ("INFO",),
            ("SHUTDOWN",),
            ("DEBUG", "SLEEP", "0"),
            ("GET", "RAYns@KV"),
            ("SET", "other", "1"),
            ("MONITOR",),
        ):
            with pytest.raises(redis.ResponseError, match="NOPERM|no permissions|not allowed"):
                r.execute_command(*command)
    with redis.Redis.from_url(server.url(GCS_USER)) as r:
        assert r.hset("RAYns@KV", "k", "v") == 1 and r.hget("RAYns@KV", "k") == b"v"
        for command in (("LRANGE", "di:ev:u1", 0, -1), ("CONFIG", "GET", "*"), ("FLUSHDB",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                r.execute_command(*command)
        memory = r.info("memory")  # INFO is the GCS user's: the live settings of the manifest
        assert memory["maxmemory"] == 1 << 30 and memory["maxmemory_policy"] == "noeviction"
        persistence = r.info("persistence")
        assert persistence["aof_enabled"] == 1
    with _admin(server) as admin:
        assert admin.config_get("appendfsync") == {"appendfsync": "always"}
        denied = [e for e in admin.acl_log() if e["username"] != "admin"]
        assert {e["username"] for e in denied} <= {STORE_USER, GCS_USER}  # only the refusals above


@needs_redis
def test_redis_refuses_writes_at_the_memory_cap_and_evicts_nothing(tmp_path):
    """noeviction: past maxmemory a write fails and every acknowledged event is still there."""
    from ray_app.store.base import Event
    from ray_app.store.opener import open_store

    server = ManifestRedis(tmp_path / "redis", "--maxmemory", "3mb").start()
    try:
        store = open_store(server.url())
        acknowledged, refused = 0, None
        batch = [Event(str(i), 4.0, 1.7e9 + i) for i in range(2000)]
        for i in range(200):
            try:
                store.append_events(f"u{i}", batch)
            except Exception as e:  # the store's error for a refused write
                refused = e
                break
            acknowledged += len(batch)
        assert refused is not None and "maxmemory" in str(refused), "the cap was never reached"
        assert sum(store.count_events(f"u{j}") for j in range(i + 1)) == acknowledged > 0
        store.close()
    finally:
        server.stop()


GCS_FLOW = r"""
import os, sys, ray, redis
import ray.util.scheduling_strategies
from ray._private.gcs_utils import cleanup_redis_storage
host, port, password, ns, temp = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ray.init(num_cpus=1, include_dashboard=False, _redis_username="ray-gcs", _redis_password=password,
         _temp_dir=temp, logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0)
class Counter:
    def inc(self):
        return 1

actor = Counter.options(name="c", lifetime="detached").remote()
assert ray.get(actor.inc.remote()) == 1
pg = ray.util.placement_group([{"CPU": 0.5}])
ray.get(pg.ready(), timeout=60)
assert ray.get(ray.remote(num_cpus=0.5)(lambda: 2).options(
    scheduling_strategy=ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(pg)).remote()) == 2
from ray.experimental import internal_kv
internal_kv._internal_kv_put(b"k", b"v")
assert internal_kv._internal_kv_get(b"k") == b"v" and internal_kv._internal_kv_exists(b"k")
internal_kv._internal_kv_del(b"k")
ray.util.remove_placement_group(pg)
ray.kill(actor)
with redis.Redis(host=host, port=port, username="ray-gcs", password=password) as r:
    print("gcs keys", len(list(r.scan_iter(f"RAY{ns}@*"))))
ray.shutdown()
assert cleanup_redis_storage(host=host, port=port, password=password, use_ssl=False,
                             storage_namespace=ns, username="ray-gcs")
"""


@needs_redis
def test_ray_gcs_runs_on_the_redis_acl_user(manifest_redis):
    """Ray's GCS (the version in .venv) stores its tables through the ray-gcs user: start, actors,
    placement groups, jobs, KV, KubeRay's cleanup (cleanup_redis_storage); no command refused."""
    import tempfile

    server, ns = manifest_redis, "test-" + secrets.token_hex(4)
    temp = tempfile.mkdtemp(prefix="rgcs", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(
        os.environ,
        RAY_REDIS_ADDRESS=f"127.0.0.1:{server.port}",
        RAY_external_storage_namespace=ns,
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)  # a cluster of its own
    try:
        out = subprocess.run(
            [sys.executable, "-c", GCS_FLOW, "127.0.0.1", str(server.port), server.passwords[GCS_USER], ns, temp],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    with _admin(server) as admin:
        denied = [(e["username"], e["object"], e["reason"]) for e in admin.acl_log()]
        left = list(admin.scan_iter(f"RAY{ns}@*"))
    assert denied == [], f"the ACL of k8s/redis.yaml refused the GCS: {denied}"
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert int(re.search(r"gcs keys (\d+)", out.stdout)[1]) > 0, "the GCS did not use Redis"
    assert left == [], "KubeRay's cleanup left keys behind"
