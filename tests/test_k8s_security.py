"""The hardening of k8s/: every manifest in the namespace with restricted pod security, every
pod (non-root, read-only root filesystem, no privilege escalation or capabilities, seccomp,
limits), an image that writes only under /tmp, probes, and images pinned by digest."""

from __future__ import annotations

import re

from k8s_helpers import K8S, MANIFESTS, NAMESPACE, cluster_specs, image_name, load, pod_templates

PLACEHOLDER_DIGEST = "@sha256:DIGEST"


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
