"""The NetworkPolicies of k8s/ evaluated against the labels of the pods KubeRay and the plain
workloads make, and the disruption budgets selected by the same labels."""

from __future__ import annotations

from k8s_helpers import KUBERAY_MANIFESTS, NAMESPACE, _kuberay_labels, load, pod_templates


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
