"""The KubeRay manifests in k8s/ against the KubeRay v1.7.0 CRDs (offline, ../shared/schemas/kuberay),
the RayService's serveConfigV2 against Ray Serve's own schema and against k8s/render.py's output,
and the RayJob entrypoints against the real argument parsers.

A CRD's openAPIV3Schema is a *structural* schema: Kubernetes rejects (or prunes) fields it does
not declare, whereas JSON Schema accepts them unless `additionalProperties: false` says so.
`strict()` adds that, so a typo'd field fails here as it would fail `kubectl apply`.
"""
from __future__ import annotations

import copy
import functools
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
KIND_TO_CRD = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
               "RayService": "ray.io_rayservices.yaml"}
KUBERAY_MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml", "rayservice.yaml"]

sys.path.insert(0, str(K8S))  # k8s/render.py is a script, not part of the installed package
import render  # noqa: E402


def strict(schema):
    """A CRD schema with Kubernetes' unknown-field semantics, as plain JSON Schema."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {name: strict(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    for key in ("items", "not"):
        if key in schema:
            out[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "type" not in schema:
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


@functools.cache
def validator(kind: str) -> jsonschema.Validator:
    path = CRDS / KIND_TO_CRD[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (the repository expects ../shared beside it)")
    # libyaml's loader when present: the CRDs are ~1 MB each, slow for the pure-Python one.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    # OpenAPI v3.0 schemas are JSON Schema draft 4 in the parts CRDs use.
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(doc["kind"]).iter_errors(doc)]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec, standalone or embedded in a RayJob / RayService."""
    specs = []
    for name in KUBERAY_MANIFESTS:
        for doc in load(name):
            spec = {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
                    "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])
            specs.append((name, spec))
    return specs


# -- CRD schemas -------------------------------------------------------------------------

@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_manifest_validates_against_kuberay_crd(name):
    docs = load(name)
    assert docs and all(d["apiVersion"] == "ray.io/v1" for d in docs)
    for doc in docs:
        assert errors(doc) == [], f"{name}: {doc['kind']} does not match the KubeRay v1.7.0 CRD"


@pytest.mark.parametrize("path, typo", [
    (("spec",), "enableInTreeAutoscalling"),                                    # top level
    (("spec", "autoscalerOptions"), "idleTimeoutSecond"),                       # nested option
    (("spec", "headGroupSpec", "template", "spec", "containers", 0), "resource"),  # inside the pod template
    (("spec", "workerGroupSpecs", 0), "maxReplica"),
])
def test_typo_in_a_field_name_fails(path, typo):
    (doc,) = load("raycluster.yaml")
    bad = copy.deepcopy(doc)
    node = bad
    for key in path:
        node = node[key]
    node[typo] = node.get(typo.rstrip("s"), 1)
    assert any(typo in e for e in errors(bad)), f"{typo!r} was accepted"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="eight"), "is not of type 'integer'"),
    (lambda d: d["spec"]["autoscalerOptions"].update(version="v3"), "is not one of"),
    (lambda d: d["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
])
def test_wrong_value_fails(mutate, message):
    (doc,) = load("raycluster.yaml")
    bad = copy.deepcopy(doc)
    mutate(bad)
    assert any(message in e for e in errors(bad))


def test_rayservice_typo_inside_embedded_cluster_fails():
    (doc,) = load("rayservice.yaml")
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in errors(bad))


# -- what the cluster specs promise ---------------------------------------------------------

def test_versions_match_the_pinned_ray():
    import ray

    for name, spec in cluster_specs():
        assert spec["rayVersion"] == ray.__version__, name
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray.__version__}-py311\n" in dockerfile
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile  # the GPU variant


def test_head_takes_no_work_and_gpu_groups_request_gpus():
    for name, spec in cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (name, group["groupName"])
            (container,) = group["template"]["spec"]["containers"]
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if group["groupName"] == "gpu":
                assert gpus == "1" and container["image"].endswith("-gpu"), (name, "gpu group")
            else:
                assert gpus is None and not container["image"].endswith("-gpu"), (name, group["groupName"])
    (cluster,) = load("raycluster.yaml")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["autoscalerOptions"]["version"] == "v2"
    assert {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]} == {"cpu", "gpu"}


def test_every_pod_mounts_the_shared_volume():
    (pvc,) = load("storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name, spec in cluster_specs():
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for t in templates:
            claims = {v["persistentVolumeClaim"]["claimName"]: v["name"]
                      for v in t["spec"]["volumes"] if "persistentVolumeClaim" in v}
            assert pvc["metadata"]["name"] in claims, name
            mounts = {m["name"]: m["mountPath"] for m in t["spec"]["containers"][0]["volumeMounts"]}
            assert mounts[claims[pvc["metadata"]["name"]]] == render.SHARED_MOUNT, name


# -- RayJobs ------------------------------------------------------------------------------

def _entrypoint_args(name: str, module: str) -> list[str]:
    (job,) = load(name)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", module]
    for flag in ("--storage-path", "--prepared-dir"):  # on the shared volume, not the pod's disk
        assert argv[argv.index(flag) + 1].startswith(render.SHARED_MOUNT + "/"), (name, flag)
    return argv[3:]


def test_train_job_entrypoint_parses():
    from ray_app.train import parse_args

    settings, _ = parse_args(_entrypoint_args("rayjob-train.yaml", "ray_app.train"))
    (job,) = load("rayjob-train.yaml")
    (gpu,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert settings.use_gpu and settings.num_workers == gpu["replicas"] == gpu["maxReplicas"]


def test_tune_job_entrypoint_parses():
    from tuning.search import parse_args

    settings, _ = parse_args(_entrypoint_args("rayjob-tune.yaml", "tuning.search"))
    (job,) = load("rayjob-tune.yaml")
    assert settings.use_gpu and job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
