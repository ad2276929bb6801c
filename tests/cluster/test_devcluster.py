"""The devcluster's control plane behaves like a real cluster: scheduling on simulated GPU nodes,
capacity shortage, namespace deletion, admission as hardened clusters run it, Prometheus discovery and
alerts to a webhook."""

import ipaddress
import json

import pytest
from moe_operator.api import names
from moe_operator.app.permissions import RULES

from devcluster.wait import poll
from devtools.harness import install_crd

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


def role(name: str, namespace: str, without: tuple[str, str] | None = None) -> dict:
    """A Role with the operator's namespaced rules (permissions.RULES), less (verb, resource) `without`."""
    rules = [{"apiGroups": [rule.group], "resources": [resource],
              "verbs": [v for v in rule.verbs if (v, resource) != without]}
             for rule in RULES if not rule.cluster_scoped for resource in rule.resources]
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": namespace}, "rules": [r for r in rules if r["verbs"]]}


def test_block_owner_deletion_needs_update_on_the_owners_finalizers(cluster, namespace):
    """OwnerReferencesPermissionEnforcement is on (as in OpenShift and other hardened clusters): whoever
    sets `blockOwnerDeletion` on an ownerReference must be allowed to update the owner's finalizers. The
    operator's rules have that; without it the API server refuses the operator's pods."""
    install_crd(cluster)
    owner = json.loads(cluster.kubectl("create", "-n", namespace, "-o", "json", "-f", "-", input=json.dumps({
        "apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "owner"},
        "spec": {"replicas": 0, "model": {"source": "builtin:tiny-mixtral"}}})).stdout)
    for user, without in (("operator", None), ("narrowed", ("update", "modeldeployments/finalizers"))):
        create(cluster, namespace, role(user, namespace, without))
        cluster.kubectl("create", "rolebinding", user, "-n", namespace, f"--role={user}", f"--user={user}")

    def create_pod_as(user: str, block: bool):
        pod = gpu_pod("child", 1)
        pod["metadata"]["ownerReferences"] = [{
            "apiVersion": names.API_VERSION, "kind": names.KIND, "name": "owner",
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": block}]
        return cluster.kubectl("create", "-n", namespace, f"--as={user}", "--dry-run=server", "-f", "-",
                               input=json.dumps(pod), check=False)

    # The API server's admission maps kinds to resources from discovery, refreshed every 30 s: a kind
    # whose CRD is younger than that may not be found yet (then the plugin refuses too).
    poll("the operator's rules to allow blockOwnerDeletion",
         lambda: create_pod_as("operator", True).returncode == 0, 40, 1.0)
    refused = create_pod_as("narrowed", True)
    assert refused.returncode != 0 and "resource you can't set finalizers on" in refused.stderr, refused.stderr
    assert create_pod_as("narrowed", False).returncode == 0
