"""The KubeRay manifests in k8s/ against the KubeRay v1.7.0 CRDs (offline, ../shared/schemas/kuberay),
the RayService's serveConfigV2 against Ray Serve's own schema and against k8s/render.py's output,
and the RayJob entrypoints against the real argument parsers. Then the hardening: every pod
(non-root, read-only root filesystem, no privilege escalation or capabilities, seccomp, limits),
images pinned by digest, the NetworkPolicies evaluated against the pods' labels, the disruption
budgets, Redis run as its StatefulSet runs it (ACL users, memory cap) with the store and Ray's
GCS going through it, and checkov, an outside policy scanner, on all of it.

A CRD's openAPIV3Schema is a *structural* schema: Kubernetes rejects (or prunes) fields it does
not declare, whereas JSON Schema accepts them unless `additionalProperties: false` says so.
`strict()` adds that, so a typo'd field fails here as it would fail `kubectl apply`.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
KIND_TO_CRD = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
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
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(doc["kind"]).iter_errors(doc)]


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
            image = image_name(container["image"])
            if group["groupName"] == "gpu":
                assert gpus == "1" and image.endswith("-gpu"), (name, "gpu group")
            else:
                assert gpus is None and not image.endswith("-gpu"), (name, group["groupName"])
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
            claims = {
                v["persistentVolumeClaim"]["claimName"]: v["name"]
                for v in t["spec"]["volumes"]
                if "persistentVolumeClaim" in v
            }
            assert pvc["metadata"]["name"] in claims, name
            mounts = {m["name"]: m for m in t["spec"]["containers"][0]["volumeMounts"]}
            runs = mounts[claims[pvc["metadata"]["name"]]]
            assert runs["mountPath"] == render.SHARED_MOUNT, name
            # Serving only reads checkpoints and data; training and tuning write them.
            assert runs.get("readOnly", False) == (name == "rayservice.yaml"), name


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
    from ray_app.train.settings import parse_args

    settings, _ = parse_args(_entrypoint_args("rayjob-train.yaml", "ray_app.train"))
    (job,) = load("rayjob-train.yaml")
    (gpu,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert settings.use_gpu and settings.num_workers == gpu["replicas"] == gpu["maxReplicas"]


def test_tune_job_entrypoint_parses():
    from tuning.search import parse_args

    settings, _ = parse_args(_entrypoint_args("rayjob-tune.yaml", "tuning.search"))
    (job,) = load("rayjob-tune.yaml")
    assert settings.use_gpu and job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True


# -- RayService: serveConfigV2 ------------------------------------------------------------


def _repo_serve_config() -> dict:
    return yaml.safe_load(render.SERVE_CONFIG.read_text())


def _embedded_serve_config() -> dict:
    (service,) = load("rayservice.yaml")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_serve_config_v2_is_rendered_from_the_repository_config():
    text = render.RAYSERVICE.read_text()
    rendered = render.render_serve_config(_repo_serve_config())
    assert _embedded_serve_config() == rendered
    assert render.render_rayservice(text, rendered) == text, "stale: run python k8s/render.py"
    assert render.main(["--check"]) == 0


def test_render_detects_a_changed_serve_config():
    source = _repo_serve_config()
    source["applications"][0]["deployments"][0]["max_ongoing_requests"] += 1
    text = render.RAYSERVICE.read_text()
    changed = render.render_rayservice(text, render.render_serve_config(source))
    assert changed != text
    # Only the block changed: the rest of the manifest (comments included) is kept.
    assert changed.split("serveConfigV2: |")[0] == text.split("serveConfigV2: |")[0]
    assert changed.split("\n  rayClusterConfig:")[1] == text.split("\n  rayClusterConfig:")[1]


def _dropped_keys(given, parsed, path=""):
    """Keys of `given` that a pydantic model silently ignored (Ray's schemas allow extra keys)."""
    if isinstance(given, dict):
        out = []
        for k, v in given.items():
            out += (
                [f"{path}{k}"]
                if not isinstance(parsed, dict) or k not in parsed
                else _dropped_keys(v, parsed[k], f"{path}{k}.")
            )
        return out
    if isinstance(given, list) and isinstance(parsed, list):
        return [d for i, (a, b) in enumerate(zip(given, parsed)) for d in _dropped_keys(a, b, f"{path}{i}.")]
    return []


def serve_config_problems(config: dict) -> list[str]:
    """Ray Serve's ServeDeploySchema, plus the unknown keys it would ignore without a word."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(config)  # raises on a wrong type or value
    problems = _dropped_keys(config, parsed.model_dump(exclude_unset=True))
    for app in config["applications"]:
        for d in app.get("deployments", []):
            if "autoscaling_config" in d:  # a free-form dict in DeploymentSchema
                scaling = AutoscalingConfig.model_validate(d["autoscaling_config"])
                problems += [
                    f"{d['name']}.autoscaling_config.{k}"
                    for k in _dropped_keys(d["autoscaling_config"], scaling.model_dump(exclude_unset=True))
                ]
    return problems


def test_serve_config_v2_validates_against_serve_schema():
    from ray_app.serve.app import AppArgs

    config = _embedded_serve_config()
    assert serve_config_problems(config) == []
    for app in config["applications"]:
        AppArgs.model_validate(app["args"])  # the app builder's own typed arguments
        assert "working_dir" not in app.get("runtime_env", {})  # the code is in the image


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda c: c.update(proxy_locaton="EveryNode"), "proxy_locaton"),
        (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=5), "max_ongoing_request"),
        (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(max_replica=5), "max_replica"),
    ],
)
def test_serve_config_typo_fails(mutate, problem):
    config = _embedded_serve_config()
    mutate(config)
    assert any(p.endswith(problem) for p in serve_config_problems(config))


def test_serve_config_wrong_value_fails():
    from pydantic import ValidationError

    config = _embedded_serve_config()
    config["applications"][0]["deployments"][0]["max_ongoing_requests"] = "many"
    with pytest.raises(ValidationError):
        serve_config_problems(config)


def test_serving_cluster_fits_the_deployments_and_reaches_redis():
    from urllib.parse import urlparse

    (service,) = load("rayservice.yaml")
    config = _embedded_serve_config()
    (cpu,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker_cpus = float(cpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    for app in config["applications"]:
        need = [d.get("ray_actor_options", {}).get("num_cpus", 1) for d in app["deployments"]]
        assert sum(need) <= worker_cpus, "one replica of every deployment must fit one worker pod"
        assert not any(d.get("ray_actor_options", {}).get("num_gpus") for d in app["deployments"])
        store = urlparse(app["args"]["store_url"])
        redis_service = next(d for d in load("redis.yaml") if d["kind"] == "Service")
        assert store.scheme == "redis" and store.hostname == redis_service["metadata"]["name"]
        assert store.port == redis_service["spec"]["ports"][0]["port"]
        # As the store's ACL user, with the password from each pod's environment, never literally.
        assert store.username == STORE_USER and store.username in acl_users()
        variable = re.fullmatch(r"\$\{([A-Z_]+)\}", store.password)[1]
        for template in _ray_templates(service):
            assert _env(template)[variable] == {"secretKeyRef": {"name": REDIS_SECRET, "key": "store-password"}}
            # Serve's throughput-optimized mode is read by every Ray process: every pod sets it.
            assert _env(template)["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        # The serving checkpoint is the training job's run folder on the shared volume.
        train_argv = shlex.split(load("rayjob-train.yaml")[0]["spec"]["entrypoint"])
        run_dir = f"{train_argv[train_argv.index('--storage-path') + 1]}/{train_argv[train_argv.index('--name') + 1]}"
        assert app["args"]["checkpoint"] == run_dir
        assert app["args"]["data_dir"] == train_argv[train_argv.index("--prepared-dir") + 1]


def test_redis_is_durable_and_persistent():
    docs = {d["kind"]: d for d in load("redis.yaml")}
    conf = docs["ConfigMap"]["data"]["redis.conf"].splitlines()
    assert "appendonly yes" in conf and "appendfsync always" in conf and "maxmemory-policy noeviction" in conf
    sts = docs["StatefulSet"]
    mounts = {m["name"]: m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    assert mounts["data"] == "/data" and "dir /data" in conf


def test_demo_talks_to_the_serve_service():
    from urllib.parse import urlparse

    from gradio_demo.__main__ import parse_args

    deployment = next(d for d in load("demo.yaml") if d["kind"] == "Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "gradio_demo"]
    args = parse_args(command[3:])
    (service,) = load("rayservice.yaml")
    api = urlparse(args.api)
    assert api.hostname == f"{service['metadata']['name']}-serve-svc"
    assert api.port == _embedded_serve_config()["http_options"]["port"]
    assert args.host == "0.0.0.0"


# -- hardening: namespace, pods, images ------------------------------------------------------

NAMESPACE = "dynamic-interest"
REDIS_SECRET = "dynamic-interest-redis"
STORE_USER, GCS_USER = "dynamic-interest", "ray-gcs"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))
PLACEHOLDER_DIGEST = "@sha256:DIGEST"


def image_name(image: str) -> str:
    """`name:tag` of `name:tag@sha256:...`."""
    return image.split("@", 1)[0]


def _ray_templates(doc: dict) -> list[dict]:
    spec = {
        "RayCluster": lambda s: s,
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayService": lambda s: s["rayClusterConfig"],
    }[doc["kind"]](doc["spec"])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _env(template: dict) -> dict:
    (container,) = template["spec"]["containers"]
    return {e["name"]: e.get("valueFrom", e.get("value")) for e in container.get("env", [])}


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


def test_every_manifest_is_in_the_namespace_with_restricted_pod_security():
    (ns,) = load("namespace.yaml")
    assert ns["kind"] == "Namespace" and ns["metadata"]["name"] == NAMESPACE
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name in MANIFESTS:
        for doc in load(name):
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == NAMESPACE, (name, doc["kind"], doc["metadata"]["name"])


def _hardened(where, security: dict, pod_security: dict):
    assert security.get("allowPrivilegeEscalation") is False, where
    assert security.get("readOnlyRootFilesystem") is True, where
    assert security.get("capabilities") == {"drop": ["ALL"]}, where
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
    assert security.get("runAsUser", pod_security.get("runAsUser", 1)) != 0, where
    seccomp = security.get("seccompProfile", pod_security.get("seccompProfile"))
    assert seccomp == {"type": "RuntimeDefault"}, where


def test_every_pod_is_hardened():
    """Non-root, read-only root filesystem with an emptyDir at /tmp, no privilege escalation, no
    capabilities, seccomp RuntimeDefault, CPU and memory requests and limits; the service account
    token only where KubeRay's autoscaler needs it."""
    templates = pod_templates()
    assert {what for _, what, _ in templates} >= {"Deployment", "StatefulSet", "head", "submitter"}
    for name, what, template in templates:
        spec = template["spec"]
        pod_security = spec["securityContext"]
        emptydirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = (name, what, c["name"])
            _hardened(where, c.get("securityContext", {}), pod_security)
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in emptydirs, (where, "/tmp must be an emptyDir")
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (where, kind)
        autoscaled = what == "head" and next(spec_ for n, spec_ in cluster_specs() if n == name).get(
            "enableInTreeAutoscaling"
        )
        assert spec.get("automountServiceAccountToken", True) is bool(autoscaled), (name, what)
    for name, spec in cluster_specs():
        if spec.get("enableInTreeAutoscaling"):  # the sidecar KubeRay adds to the head
            options = spec["autoscalerOptions"]
            _hardened((name, "autoscaler"), options["securityContext"], {})
            assert {m["mountPath"] for m in options["volumeMounts"]} == {"/tmp"}, name
            assert {"cpu", "memory"} <= set(options["resources"]["limits"]), name


def test_the_image_writes_only_under_tmp():
    """With a read-only root filesystem, what the programs write goes to the /tmp emptyDir: the
    image points the project's cache and the libraries' caches and configuration there."""
    from models.data.encoder import CACHE_ENV

    dockerfile = (K8S / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s+([A-Z_]+)=(\S+?)(?: \\)?$", dockerfile, re.M))
    for variable in (CACHE_ENV, "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR"):
        assert env.get(variable, "").startswith("/tmp/"), variable
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert re.search(r"^USER 1000:100$", dockerfile, re.M), "a numeric user, which runAsNonRoot can verify"


def test_probes():
    """The plain workloads probe themselves; the Ray containers leave it to KubeRay, which injects
    raylet/GCS health checks and, on the RayService's workers, the Serve proxy's readiness."""
    for name, what, template in pod_templates():
        (c,) = template["spec"]["containers"]
        if what in ("Deployment", "StatefulSet"):
            assert c.get("livenessProbe") and c.get("readinessProbe"), (name, what)
        else:
            assert "livenessProbe" not in c and "readinessProbe" not in c, (name, what)


def test_images_are_pinned_by_digest_or_the_placeholder_the_readme_replaces():
    images = set()
    for name, what, template in pod_templates():
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            assert re.fullmatch(r"[^@\s]+:[^@\s]+@sha256:(DIGEST|[0-9a-f]{64})", c["image"]), (name, what, c["image"])
            images.add(c["image"])
    readme = (K8S / "README.md").read_text()
    for image in images:
        if image.endswith(PLACEHOLDER_DIGEST):  # step 2 of k8s/README.md pins each one
            assert f"s#image: {image}#image: $" in readme, f"k8s/README.md does not pin {image}"
    assert {image_name(i) for i in images} == {"dynamic-interest:0.1.0", "dynamic-interest:0.1.0-gpu", "redis:7.4"}


# -- NetworkPolicies ---------------------------------------------------------------------------


def _kuberay_labels(template: dict, what: str) -> dict:
    """The labels of the pod KubeRay makes of a template (the ones the policies select on)."""
    labels = dict(template["metadata"].get("labels", {}))
    if what == "head" or what.startswith("worker"):
        labels.update({"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if what == "head" else "worker"})
    return labels


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what these manifests use
    return selector.get("matchLabels", {}).items() <= labels.items()


def admits(pod: dict, port: int, source: dict, source_namespace: str = NAMESPACE) -> bool:
    """Whether the NetworkPolicies of k8s/networkpolicy.yaml let `source` (labels) reach `pod`
    (labels) on a TCP port: the union of the rules of every policy that selects the pod."""
    policies = [p for p in load("networkpolicy.yaml") if _selects(p["spec"]["podSelector"], pod)]
    assert policies, "every pod is selected (at least by the default deny)"
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"]
        for rule in p["spec"].get("ingress", []):
            ports = [x["port"] for x in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                ns_ok = (
                    _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_namespace})
                    if "namespaceSelector" in peer
                    else source_namespace == NAMESPACE
                )
                if ns_ok and _selects(peer.get("podSelector", {}), source):
                    return True
    return False


def _pods() -> dict[tuple[str, str], dict]:
    return {(name, what): _kuberay_labels(t, what) for name, what, t in pod_templates()}


def test_only_ray_pods_reach_redis():
    pods = _pods()
    redis_pod = pods[("redis.yaml", "StatefulSet")]
    rays = {k: v for k, v in pods.items() if v.get("ray.io/is-ray-node") == "yes"}
    assert {name for name, _ in rays} == set(KUBERAY_MANIFESTS)
    for labels in rays.values():
        assert admits(redis_pod, 6379, labels)
    cleanup_job = dict(pods[("rayservice.yaml", "head")], **{"ray.io/node-type": "redis-cleanup"})
    assert admits(redis_pod, 6379, cleanup_job)  # KubeRay's GCS cleanup Job: the head's labels
    for outsider in (pods[("demo.yaml", "Deployment")], pods[("rayjob-train.yaml", "submitter")], {}):
        assert not admits(redis_pod, 6379, outsider)
    assert not admits(redis_pod, 6379, rays[("rayservice.yaml", "head")], source_namespace="default")
    assert not admits(redis_pod, 6380, rays[("rayservice.yaml", "head")])


def test_only_the_serve_port_and_the_demo_are_reachable_from_outside():
    pods = _pods()
    outside = ({}, "default")
    for (name, what), labels in pods.items():
        for port in (6379, 8000, 8080, 8265, 10001, 52365, 7860):
            reachable = admits(labels, port, *outside)
            expected = (name == "rayservice.yaml" and port == 8000) or (name == "demo.yaml" and port == 7860)
            assert reachable == expected, (name, what, port)
    head = pods[("rayservice.yaml", "head")]
    assert admits(head, 8265, {}, "kuberay-system")  # the operator: serve config, status
    for (name, what), labels in pods.items():  # Prometheus, on Ray's metrics port only
        assert admits(labels, 8080, {}, "monitoring") == (labels.get("ray.io/is-ray-node") == "yes"), (name, what)
        assert not admits(labels, 8265, {}, "monitoring")
    assert admits(head, 6379, pods[("rayservice.yaml", "worker cpu")])  # the cluster's own traffic
    assert admits(pods[("rayjob-train.yaml", "head")], 8265, pods[("rayjob-train.yaml", "submitter")])
    assert admits(pods[("rayservice.yaml", "worker cpu")], 8000, pods[("demo.yaml", "Deployment")])


def test_disruption_budgets_cover_redis_and_the_serving_workers():
    pods = _pods()
    (redis_pdb,) = [d for d in load("redis.yaml") if d["kind"] == "PodDisruptionBudget"]
    assert _selects(redis_pdb["spec"]["selector"], pods[("redis.yaml", "StatefulSet")])
    assert redis_pdb["spec"]["maxUnavailable"] == 0
    (serving,) = load("serving-pdb.yaml")
    selected = [k for k, labels in pods.items() if _selects(serving["spec"]["selector"], labels)]
    assert selected == [("rayservice.yaml", "worker cpu")]
    (service,) = load("rayservice.yaml")
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert serving["spec"]["minAvailable"] < group["minReplicas"], "a drain must be able to evict one"


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

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not on PATH (apt-get install redis-server)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManifestRedis:
    def __init__(self, root: Path, *extra: str):
        docs = {d["kind"]: d for d in load("redis.yaml")}
        (container,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
        self.root, self.port = root, _free_port()
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

    from ray_app.store.base import Event, StoredState
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
    events = [Event(i, 4.0, 1.7e9 + i) for i in range(5)]
    assert store.append_events("u1", events[:2]) == 2
    assert store.append_once("u1", "key-1", events[2:4]) == (4, False)
    assert store.append_once("u1", "key-1", events[2:4]) == (4, True)
    assert store.events("u1", start=1, limit=2) == events[1:3] and store.count_events("u1") == 4
    assert sorted(store.seen_items("u1")) == sorted({e.item_id for e in events[:4]})
    store.put_state("u1", StoredState("v1", 4, b"blob"))
    assert store.get_state("u1") == StoredState("v1", 4, b"blob")
    store.bulk_load({"u2": events, "u10": events[:1]})
    assert store.users(prefix="u1") == [("u1", 4), ("u10", 1)]
    store.close()
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
        batch = [Event(i, 4.0, 1.7e9 + i) for i in range(2000)]
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


# -- checkov, an outside policy scanner --------------------------------------------------------


def _checkov_version() -> str:
    return re.search(r"^\s*CHECKOV_VERSION=([0-9.]+)", (ROOT / "scripts" / "setup.sh").read_text(), re.M)[1]


def _checkov() -> str | None:
    """The pinned checkov of scripts/setup.sh dev (.venv/checkov), or one on PATH of that version."""
    pinned = ROOT / ".venv" / "checkov" / "bin" / "checkov"
    if pinned.exists() and glob.glob(
        str(
            ROOT / ".venv" / "checkov" / "lib" / "python*" / "site-packages" / f"checkov-{_checkov_version()}.dist-info"
        )
    ):
        return str(pinned)
    found = shutil.which("checkov")
    if (
        found
        and subprocess.run([found, "--version"], capture_output=True, text=True).stdout.strip() == _checkov_version()
    ):
        return found
    return None


def kuberay_pods() -> list[dict]:
    """Each Ray pod template as the Pod KubeRay makes of it (its labels added; the probes KubeRay
    injects are not, hence the skips in the templates), and each RayJob's submitter Pod: checkov
    scans Pods and Deployments, not the pod templates inside KubeRay's custom resources."""
    pods = []
    for name in KUBERAY_MANIFESTS:
        (doc,) = load(name)
        for what, template in [(w, t) for n, w, t in pod_templates() if n == name]:
            labels = _kuberay_labels(template, what) | {"ray.io/cluster": doc["metadata"]["name"]}
            pods.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"{doc['kind'].lower()}-{doc['metadata']['name']}-{what.replace(' ', '-')}",
                        "namespace": doc["metadata"]["namespace"],
                        "labels": labels,
                        "annotations": template["metadata"].get("annotations", {}),
                    },
                    "spec": template["spec"],
                }
            )
    return pods


# The checks skipped inline, each with its reason in the manifest: a new one needs a look here.
ALLOWED_SKIPS = {
    "CKV_K8S_8",
    "CKV_K8S_9",  # liveness/readiness: KubeRay injects them; a submitter Job has none
    "CKV_K8S_35",  # secrets as files: the app reads its secrets from the environment
    "CKV_K8S_38",  # service account token: the autoscaler sidecar of autoscaled heads
    "CKV_K8S_40",  # high UID: the Ray image's user is uid 1000
    "CKV_DOCKER_2",  # HEALTHCHECK: Kubernetes ignores it; the pods have probes
    "CKV_DOCKER_7",  # base image tag: ARG RAY_IMAGE, which checkov does not expand
}


def test_checkov_finds_no_failed_check(tmp_path):
    """checkov (Kubernetes and Dockerfile checks) on k8s/ and on the Ray pods: no failed check,
    every skip inline with a one-line reason, and only the skips listed above."""
    checkov = _checkov()
    if checkov is None:
        message = (
            f"checkov {_checkov_version()} is not installed (bash scripts/setup.sh dev installs it in .venv/checkov)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    scanned = tmp_path / "k8s"  # the manifests and the Dockerfile, beside the Ray pods, in one scan
    shutil.copytree(K8S, scanned, ignore=shutil.ignore_patterns("__pycache__"))
    (scanned / "kuberay-pods.yaml").write_text(yaml.safe_dump_all(kuberay_pods(), sort_keys=False))
    run = subprocess.run(
        [
            checkov,
            "--directory",
            str(scanned),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, LOG_LEVEL="ERROR"),
    )
    reports = json.loads(run.stdout)
    reports = {r["check_type"]: r for r in (reports if isinstance(reports, list) else [reports])}
    assert set(reports) == {"kubernetes", "dockerfile"}, run.stderr[-2000:]
    counts = {kind: r["summary"] for kind, r in reports.items()}
    print(
        "checkov",
        _checkov_version(),
        {k: {x: c[x] for x in ("passed", "failed", "skipped")} for k, c in counts.items()},
    )
    failed = [
        (c["check_id"], c["resource"], c["check_name"]) for r in reports.values() for c in r["results"]["failed_checks"]
    ]
    assert failed == [] and all(c["parsing_errors"] == 0 for c in counts.values()), failed
    skipped = [c for r in reports.values() for c in r["results"]["skipped_checks"]]
    for c in skipped:
        reason = c["check_result"].get("suppress_comment", "").strip()
        assert reason and reason != "No comment provided" and "\n" not in reason, (c["check_id"], c["resource"])
    assert {c["check_id"] for c in skipped} <= ALLOWED_SKIPS
    # The Ray pods were scanned, and the hardening checks passed on them.
    passed = {(c["check_id"], c["resource"]) for r in reports.values() for c in r["results"]["passed_checks"]}
    for pod in kuberay_pods():
        resource = f"Pod.{NAMESPACE}.{pod['metadata']['name']}"
        for check in ("CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_43"):
            assert (check, resource) in passed, (check, resource)
