"""What the tests of k8s/ share: the manifests as parsed YAML, the Ray clusters and pod templates
they make, and the names (namespace, Redis users and Secret) that tie them together."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERAY_MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml", "rayservice.yaml"]
NAMESPACE = "dynamic-interest"
REDIS_SECRET = "dynamic-interest-redis"
STORE_USER, GCS_USER = "dynamic-interest", "ray-gcs"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))

sys.path.insert(0, str(K8S))  # k8s/render.py is a script, not part of the installed package
import render  # noqa: E402, F401 - re-exported for the tests


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec, standalone or embedded in a RayJob / RayService."""
    specs = []
    for name in KUBERAY_MANIFESTS:
        for doc in load(name):
            spec = {
                "RayCluster": lambda s: s,
                "RayJob": lambda s: s["rayClusterSpec"],
                "RayService": lambda s: s["rayClusterConfig"],
            }[doc["kind"]](doc["spec"])
            specs.append((name, spec))
    return specs


def image_name(image: str) -> str:
    """`name:tag` of `name:tag@sha256:...`."""
    return image.split("@", 1)[0]


def pod_templates() -> list[tuple[str, str, dict]]:
    """(manifest, what, pod template) for every pod the manifests make: the plain workloads, every
    Ray head and worker group, and the RayJobs' submitters."""
    out = []
    for name in MANIFESTS:
        for doc in load(name):
            if doc["kind"] in ("Deployment", "StatefulSet"):
                out.append((name, doc["kind"], doc["spec"]["template"]))
            elif doc["apiVersion"] == "ray.io/v1":
                spec = {
                    "RayCluster": lambda s: s,
                    "RayJob": lambda s: s["rayClusterSpec"],
                    "RayService": lambda s: s["rayClusterConfig"],
                }[doc["kind"]](doc["spec"])
                out.append((name, "head", spec["headGroupSpec"]["template"]))
                out += [(name, f"worker {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
                if doc["kind"] == "RayJob":
                    out.append((name, "submitter", doc["spec"]["submitterPodTemplate"]))
    return out


def acl_users() -> dict[str, str]:
    """The users of k8s/redis.yaml's ACL template: name -> its rules."""
    conf = next(d for d in load("redis.yaml") if d["kind"] == "ConfigMap")["data"]
    return {line.split()[1]: line for line in conf["users.acl.in"].splitlines() if line.startswith("user ")}


def _kuberay_labels(template: dict, what: str) -> dict:
    """The labels of the pod KubeRay makes of a template (the ones the policies select on)."""
    labels = dict(template["metadata"].get("labels", {}))
    if what == "head" or what.startswith("worker"):
        labels.update({"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if what == "head" else "worker"})
    return labels
