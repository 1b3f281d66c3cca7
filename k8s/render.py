"""Generate the RayService's `serveConfigV2` from `ray_app/serve/config.yaml`.

The serve config is written once, in the repository, in `serve build` form; the RayService
embeds the same config with only what differs on the cluster replaced (`ClusterSettings`):
the state store points at Redis (its password from the environment), the checkpoint and the data are on the shared volume, the
code comes from the image rather than a working_dir upload. tests/test_k8s_serve_config.py fails when
k8s/rayservice.yaml is out of date.

The RayService serves one checkpoint file, pinned by its sha256: `--checkpoint FILE --sha256 HEX`
pins it (from `python -m ray_app.serve.pin /mnt/runs/ray/ml-1m` run in a pod once the training job
is done); without them the pin already in k8s/rayservice.yaml is kept. A rollback is applying the
previous rayservice.yaml (its pin) again.

    python k8s/render.py            # rewrite serveConfigV2 in k8s/rayservice.yaml
    python k8s/render.py --checkpoint /mnt/runs/ray/ml-1m/checkpoint_000012/model.pt --sha256 HEX
    python k8s/render.py --check    # exit 1 if k8s/rayservice.yaml is out of date
    python k8s/render.py --print    # print the rendered serve config
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "ray_app" / "serve" / "config.yaml"
RAYSERVICE = ROOT / "k8s" / "rayservice.yaml"
SHARED_MOUNT = "/mnt/runs"  # where every Ray pod mounts the shared volume (k8s/storage.yaml)


@dataclass(frozen=True)
class ClusterSettings:
    """What differs on the cluster; every other setting is the repository's."""

    # The Service in k8s/redis.yaml, as its ACL user; each replica reads the password from its
    # environment (ray_app/store/), set from the Secret dynamic-interest-redis by the pod templates.
    store_url: str = "redis://dynamic-interest:${DYNAMIC_INTEREST_REDIS_PASSWORD}@redis:6379/0"
    # The model file served, in the run folder of k8s/rayjob-train.yaml, and its digest: placeholders
    # until pinned (an app whose file does not have the digest refuses to deploy, naming both).
    checkpoint: str = f"{SHARED_MOUNT}/ray/ml-1m/checkpoint_000000/model.pt"
    checkpoint_sha256: str = "0" * 64
    data_dir: str = f"{SHARED_MOUNT}/data/ml-1m"  # the data that run was trained on
    # Upper bounds of Serve's autoscaling per deployment: a cluster has room for more replicas
    # than a laptop (the worker group's maxReplicas bounds the pods behind them).
    max_replicas: dict[str, int] = field(default_factory=lambda: {"Ingress": 4, "Decomposer": 8, "Combiner": 8})


def render_serve_config(source: dict, cluster: ClusterSettings = ClusterSettings()) -> dict:
    """The serve config as the RayService runs it."""
    if not isinstance(source, dict) or not source.get("applications"):
        raise ValueError(f"{SERVE_CONFIG}: expected a `serve build` config with an `applications` list")
    config = copy.deepcopy(source)
    for app in config["applications"]:
        app.setdefault("args", {}).update(store_url=cluster.store_url, data_dir=cluster.data_dir)
        for deployment in app.get("deployments", []):
            # The model deployments get the pinned file and digest as user_config (swapped in place).
            if "checkpoint" in (deployment.get("user_config") or {}):
                deployment["user_config"] = {"checkpoint": cluster.checkpoint, "sha256": cluster.checkpoint_sha256}
            scaling = deployment.get("autoscaling_config")
            if scaling and deployment["name"] in cluster.max_replicas:
                scaling["max_replicas"] = cluster.max_replicas[deployment["name"]]
        runtime_env = app.get("runtime_env") or {}
        # The image holds the code (k8s/Dockerfile); a working_dir would be resolved on the
        # machine that applies the manifest, which KubeRay cannot upload from.
        runtime_env.pop("working_dir", None)
        if runtime_env:
            app["runtime_env"] = runtime_env
        else:
            app.pop("runtime_env", None)
    # Serve must listen on the pod's address for the serve Service to reach it.
    config.setdefault("http_options", {})["host"] = "0.0.0.0"
    return config


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)


# `serveConfigV2: |` and the indented block that follows it (blank lines included).
_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)serveConfigV2:[ \t]*\|[-+]?[ \t]*\n(?P<body>(?:(?:(?P=indent)[ \t]+.*)?\n)*)", re.MULTILINE
)


def render_rayservice(text: str, config: dict) -> str:
    """`text` (the RayService manifest) with its serveConfigV2 block replaced by `config`,
    the rest of the file (comments included) untouched."""
    matches = list(_BLOCK.finditer(text))
    if len(matches) != 1:
        raise ValueError(f"{RAYSERVICE}: expected one `serveConfigV2: |` block, found {len(matches)}")
    m = matches[0]
    pad = m["indent"] + "  "
    body = "".join(f"{pad}{line}\n" if line else "\n" for line in dump(config).splitlines())
    old = m["body"]
    blank_after = len(old) - len(old.rstrip("\n")) - 1 if old.strip() else 0  # keep the spacing below
    return f"{text[: m.start()]}{m['indent']}serveConfigV2: |\n{body}{chr(10) * blank_after}{text[m.end() :]}"


def current_pin(text: str) -> tuple[str, str] | None:
    """The (checkpoint, checkpoint_sha256) that the RayService manifest `text` serves, if it names them."""
    m = _BLOCK.search(text)
    if m is None:
        return None
    deployments = (yaml.safe_load(textwrap.dedent(m["body"])) or {}).get("applications", [{}])[0].get("deployments", [])
    for d in deployments:
        pin = d.get("user_config") or {}
        if pin.get("checkpoint") and pin.get("sha256"):
            return str(pin["checkpoint"]), str(pin["sha256"])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if k8s/rayservice.yaml is out of date")
    mode.add_argument("--print", action="store_true", help="print the rendered serve config")
    p.add_argument("--checkpoint", help="pin this model file (on the shared volume); needs --sha256")
    p.add_argument("--sha256", help="the pinned file's sha256")
    a = p.parse_args(argv)
    if (a.checkpoint is None) != (a.sha256 is None):
        p.error("--checkpoint and --sha256 go together")
    if a.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", a.sha256):
        p.error("--sha256 must be 64 hexadecimal digits")
    current = RAYSERVICE.read_text()
    pin = (a.checkpoint, a.sha256.lower()) if a.checkpoint else current_pin(current)
    cluster = ClusterSettings(**dict(zip(("checkpoint", "checkpoint_sha256"), pin))) if pin else ClusterSettings()
    config = render_serve_config(yaml.safe_load(SERVE_CONFIG.read_text()), cluster)
    if a.print:
        print(dump(config), end="")
        return 0
    wanted = render_rayservice(current, config)
    if a.check:
        if wanted != current:
            print(f"{RAYSERVICE} is out of date with {SERVE_CONFIG}: run python k8s/render.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        RAYSERVICE.write_text(wanted)
        print(f"wrote serveConfigV2 of {RAYSERVICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
