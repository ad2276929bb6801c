"""The devcluster's control plane behaves like a real cluster: scheduling on simulated GPU nodes,
capacity shortage, namespace deletion, Prometheus discovery and alerts to a webhook."""

import ipaddress
import json

import pytest

from devcluster.control_plane import poll

pytestmark = pytest.mark.cluster

SIMULATED = {"devcluster.serving.moe.dev/simulated": "true"}


def gpu_pod(name: str, gpus: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": SIMULATED,
            "containers": [{
                "name": "main",
                "image": "ghcr.io/moe-operator/runtime:0.1.0",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }],
        },
    }


def create(cluster, namespace: str, obj: dict) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(obj))


def pod(cluster, namespace: str, name: str) -> dict:
    return cluster.get_json("-n", namespace, "pod", name)


def test_eight_gpu_pod_runs_on_a_simulated_node_with_a_loopback_ip(cluster, namespace):
    create(cluster, namespace, gpu_pod("big", 8))
    cluster.kubectl("wait", "-n", namespace, "--for=jsonpath={.status.phase}=Running", "pod/big",
                    "--timeout=30s")
    status = pod(cluster, namespace, "big")
    node = cluster.get_json("node", status["spec"]["nodeName"])
    assert node["metadata"]["labels"]["devcluster.serving.moe.dev/simulated"] == "true"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert ipaddress.ip_address(status["status"]["podIP"]) in ipaddress.ip_network("127.200.0.0/16")


def test_pod_asking_for_more_gpus_than_any_node_has_stays_unschedulable(cluster, namespace):
    create(cluster, namespace, gpu_pod("too-big", 9))

    def unschedulable() -> bool:
        conditions = pod(cluster, namespace, "too-big")["status"].get("conditions", [])
        return any(c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"
                   for c in conditions)

    poll("the scheduler to report the pod Unschedulable", unschedulable, timeout=30, interval=0.3)
    status = pod(cluster, namespace, "too-big")
    assert status["status"]["phase"] == "Pending"
    assert "nvidia.com/gpu" in next(c["message"] for c in status["status"]["conditions"]
                                    if c["type"] == "PodScheduled")


def test_deleting_a_namespace_removes_its_pods(cluster):
    cluster.kubectl("create", "namespace", "doomed-ns")
    try:
        for i in range(3):
            create(cluster, "doomed-ns", gpu_pod(f"p{i}", 1))
        cluster.kubectl("wait", "-n", "doomed-ns", "--for=jsonpath={.status.phase}=Running", "pod", "--all",
                        "--timeout=30s")
        cluster.kubectl("delete", "namespace", "doomed-ns", "--timeout=60s")
    finally:
        cluster.kubectl("delete", "namespace", "doomed-ns", "--ignore-not-found", "--wait=false", check=False)
    assert cluster.kubectl("get", "namespace", "doomed-ns", check=False).returncode != 0
    assert cluster.get_json("pods", "-A", "--field-selector=metadata.namespace=doomed-ns")["items"] == []
