"""The RayService's serveConfigV2 against Ray Serve's own schema and against k8s/render.py's
output; the serving cluster against what its deployments need (CPUs, the Redis store, the
training job's checkpoint), and the demo against the Serve service."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from k8s_helpers import REDIS_SECRET, STORE_USER, acl_users, load, render

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


def test_render_pins_a_checkpoint_and_keeps_the_pin(tmp_path, monkeypatch):
    """`--checkpoint FILE --sha256 HEX` pins the RayService's model; a later render without them keeps
    that pin; rendering the previous manifest's pin again is the rollback."""
    copy, original = tmp_path / "rayservice.yaml", render.RAYSERVICE.read_text()
    copy.write_text(original)
    monkeypatch.setattr(render, "RAYSERVICE", copy)
    before = render.current_pin(copy.read_text())
    assert render.main(["--checkpoint", "/mnt/runs/ray/ml-1m/checkpoint_000012/model.pt", "--sha256", "ab" * 32]) == 0
    pinned = ("/mnt/runs/ray/ml-1m/checkpoint_000012/model.pt", "ab" * 32)
    assert render.current_pin(copy.read_text()) == pinned
    assert render.main([]) == 0 and render.current_pin(copy.read_text()) == pinned
    assert render.main(["--checkpoint", before[0], "--sha256", before[1]]) == 0
    assert copy.read_text() == original  # the previous pin, byte for byte
    with pytest.raises(SystemExit):
        render.main(["--checkpoint", "/x/model.pt"])  # a file without its digest is no pin


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
        # The serving checkpoint is a model file of the training job's run folder, pinned by its digest.
        train_argv = shlex.split(load("rayjob-train.yaml")[0]["spec"]["entrypoint"])
        run_dir = f"{train_argv[train_argv.index('--storage-path') + 1]}/{train_argv[train_argv.index('--name') + 1]}"
        pins = [d["user_config"] for d in app["deployments"] if "user_config" in d]
        assert len(pins) == 2 and pins[0] == pins[1] and "checkpoint" not in app["args"]
        assert pins[0]["checkpoint"].startswith(run_dir + "/") and pins[0]["checkpoint"].endswith("/model.pt")
        assert re.fullmatch(r"[0-9a-f]{64}", pins[0]["sha256"])
        assert app["args"]["data_dir"] == train_argv[train_argv.index("--prepared-dir") + 1]


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
