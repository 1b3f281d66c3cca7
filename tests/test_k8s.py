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
    node[typo] = 1  # any value: the name alone must be refused
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
        problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                    for e in pod_spec_validator().iter_errors(pod["spec"])]
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
            out += [f"{path}{k}"] if not isinstance(parsed, dict) or k not in parsed else \
                _dropped_keys(v, parsed[k], f"{path}{k}.")
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
                problems += [f"{d['name']}.autoscaling_config.{k}" for k in
                             _dropped_keys(d["autoscaling_config"], scaling.model_dump(exclude_unset=True))]
    return problems


def test_serve_config_v2_validates_against_serve_schema():
    from ray_app.serve import AppArgs

    config = _embedded_serve_config()
    assert serve_config_problems(config) == []
    for app in config["applications"]:
        AppArgs.model_validate(app["args"])  # the app builder's own typed arguments
        assert "working_dir" not in app.get("runtime_env", {})  # the code is in the image


@pytest.mark.parametrize("mutate, problem", [
    (lambda c: c.update(proxy_locaton="EveryNode"), "proxy_locaton"),
    (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=5), "max_ongoing_request"),
    (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(max_replica=5), "max_replica"),
])
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
