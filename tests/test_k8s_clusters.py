"""What the Ray cluster specs of k8s/ promise (the pinned Ray, a head that takes no work, GPU
groups that request GPUs, the shared volume on every pod), and the RayJob entrypoints against
the real argument parsers."""

from __future__ import annotations

import shlex

from k8s_helpers import K8S, cluster_specs, image_name, load, render


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
