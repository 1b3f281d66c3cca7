"""The checked-in `ray_app/serve/config.yaml` against Ray Serve's schema and the app's own
arguments, without starting Ray: it must fit 2 cores at full scale."""

from __future__ import annotations

import yaml
from ray.serve.schema import ServeDeploySchema

from ray_app.serve.app import AppArgs
from serve_helpers import CONFIG


def test_config_yaml_is_a_valid_serve_build_config():
    cfg = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    app = schema.applications[0]
    assert app.import_path == "ray_app.serve.app:build_app"
    args = AppArgs.model_validate(app.args)
    assert {d.name for d in app.deployments} == {"Ingress", "Encoder", "Decomposer", "Combiner"}
    for d in app.deployments:
        assert 0 < d.ray_actor_options.num_cpus <= 0.5
        assert d.autoscaling_config["min_replicas"] >= 1
    cpus = sum(d.ray_actor_options.num_cpus * d.autoscaling_config["max_replicas"] for d in app.deployments)
    assert cpus <= 2, "at full scale the app must still fit 2 cores"
    # One checkpoint FILE and its digest, the same in both model deployments' user_config (a
    # lightweight update: swapped in place), never a run folder that each replica would resolve;
    # not in `args`, whose change would restart every replica.
    pins = {d.name: d.user_config for d in app.deployments if d.name in ("Decomposer", "Combiner")}
    assert pins["Decomposer"] == pins["Combiner"] and set(pins["Combiner"]) == {"checkpoint", "sha256"}
    assert pins["Combiner"]["checkpoint"].endswith(".pt") and len(pins["Combiner"]["sha256"]) == 64
    assert args.checkpoint is None
