"""checkov, an outside policy scanner, on k8s/ (manifests and Dockerfile) and on the pods KubeRay
makes of the Ray pod templates."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from k8s_helpers import K8S, KUBERAY_MANIFESTS, NAMESPACE, ROOT, _kuberay_labels, load, pod_templates


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
