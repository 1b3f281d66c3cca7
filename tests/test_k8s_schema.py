"""The KubeRay manifests in k8s/ against the KubeRay v1.7.0 CRDs (offline, ../shared/schemas/kuberay),
and the plain Deployments/StatefulSets against Kubernetes' PodSpec as the CRDs embed it.

A CRD's openAPIV3Schema is a *structural* schema: Kubernetes rejects (or prunes) fields it does
not declare, whereas JSON Schema accepts them unless `additionalProperties: false` says so.
`strict()` adds that, so a typo'd field fails here as it would fail `kubectl apply`.
"""

from __future__ import annotations

import copy
import functools

import jsonschema
import pytest
import yaml

from k8s_helpers import KUBERAY_MANIFESTS, ROOT, load

CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
KIND_TO_CRD = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


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


def errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(doc["kind"]).iter_errors(doc)]


# -- CRD schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_manifest_validates_against_kuberay_crd(name):
    docs = load(name)
    assert docs and all(d["apiVersion"] == "ray.io/v1" for d in docs)
    for doc in docs:
        assert errors(doc) == [], f"{name}: {doc['kind']} does not match the KubeRay v1.7.0 CRD"


@pytest.mark.parametrize(
    "path, typo",
    [
        (("spec",), "enableInTreeAutoscalling"),  # top level
        (("spec", "autoscalerOptions"), "idleTimeoutSecond"),  # nested option
        (("spec", "headGroupSpec", "template", "spec", "containers", 0), "resource"),  # inside the pod template
        (("spec", "workerGroupSpecs", 0), "maxReplica"),
    ],
)
def test_typo_in_a_field_name_fails(path, typo):
    (doc,) = load("raycluster.yaml")
    bad = copy.deepcopy(doc)
    node = bad
    for key in path:
        node = node[key]
    node[typo] = 1  # any value: the name alone must be refused
    assert any(typo in e for e in errors(bad)), f"{typo!r} was accepted"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="eight"), "is not of type 'integer'"),
        (lambda d: d["spec"]["autoscalerOptions"].update(version="v3"), "is not one of"),
        (lambda d: d["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    ],
)
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


@functools.cache
def pod_spec_validator() -> jsonschema.Validator:
    """Kubernetes' PodSpec as the RayCluster CRD embeds it (the head's pod template): the one
    core schema available offline, used for the pods of the plain Deployments/StatefulSets."""
    head = validator("RayCluster").schema["properties"]["spec"]["properties"]["headGroupSpec"]
    return jsonschema.Draft4Validator(head["properties"]["template"]["properties"]["spec"])


@pytest.mark.parametrize("name", ["redis.yaml", "demo.yaml"])
def test_plain_workloads_have_valid_pod_specs(name):
    workloads = [d for d in load(name) if d["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for w in workloads:
        pod = w["spec"]["template"]
        assert w["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        problems = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in pod_spec_validator().iter_errors(pod["spec"])
        ]
        assert problems == [], f"{name} {w['kind']}"
    bad = copy.deepcopy(workloads[0]["spec"]["template"]["spec"])
    bad["containers"][0]["readinesProbe"] = bad["containers"][0].pop("readinessProbe")
    assert not pod_spec_validator().is_valid(bad)
