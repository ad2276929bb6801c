"""The devcluster's local node runs pods as local processes, as a kubelet would run containers."""

import ipaddress
import json
import urllib.request

import pytest

from devcluster.cluster.control_plane import local_pod_cidr
from devcluster.wait import poll

pytestmark = pytest.mark.cluster

LOCAL = {"devcluster.serving.moe.dev/local": "true"}
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def local_pod(name, namespace, containers, **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeSelector": LOCAL, "terminationGracePeriodSeconds": 5, "containers": containers,
                     **spec}}


def get_pod(cluster, namespace, name):
    result = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def container_status(pod):
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def condition(pod, ctype):
    for c in ((pod or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return c["status"]
    return None


def wait_pod(cluster, namespace, name, check, what, timeout=30.0):
    """Polls the pod until check(pod) holds; returns the pod."""
    seen = {}

    def ok():
        seen["pod"] = get_pod(cluster, namespace, name)
        return bool(check(seen["pod"]))

    poll(f"pod {namespace}/{name}: {what}", ok, timeout, 0.3,
         on_timeout=lambda: f"; last status: {json.dumps((seen.get('pod') or {}).get('status'))}")
    return seen["pod"]


def test_local_node_is_registered_with_gpus(cluster):
    node = cluster.get_json("node", "devcluster-local")
    assert node["metadata"]["labels"]["devcluster.serving.moe.dev/local"] == "true"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert condition(node, "Ready") == "True"
    lease = cluster.get_json("lease", "-n", "kube-node-lease", "devcluster-local")
    assert lease["spec"]["holderIdentity"] == "devcluster-local"


def test_http_server_pod_becomes_ready_on_its_own_loopback_ip(cluster, namespace):
    cluster.apply(local_pod("web", namespace, [{
        "name": "web", "image": "python:3.11",
        "command": ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"], "env": [POD_IP_ENV],
        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}]))
    pod = wait_pod(cluster, namespace, "web", lambda p: condition(p, "Ready") == "True", "Ready")
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(local_pod_cidr(cluster.state_dir))
    assert pod["status"]["phase"] == "Running" and pod["spec"]["nodeName"] == "devcluster-local"
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as response:
        assert response.status == 200


def test_missing_command_reports_a_clear_waiting_reason(cluster, namespace):
    cluster.apply(local_pod("typo", namespace, [{"name": "c", "image": "x",
                                                 "command": ["moe-runtime-with-a-typo", "serve"]}]))
    pod = wait_pod(cluster, namespace, "typo",
                   lambda p: container_status(p).get("state", {}).get("waiting", {}).get("reason")
                   == "RunContainerError", "RunContainerError")
    message = container_status(pod)["state"]["waiting"]["message"]
    assert 'exec: "moe-runtime-with-a-typo": executable file not found in $PATH' in message
    assert condition(pod, "Ready") == "False"


def test_crashing_container_backs_off_with_growing_restart_count(cluster, namespace):
    cluster.apply(local_pod("crash", namespace, [{"name": "c", "image": "x",
                                                  "command": ["sh", "-c", "echo dying; exit 3"],
                                                  "terminationMessagePolicy": "FallbackToLogsOnError"}]))
    pod = wait_pod(cluster, namespace, "crash",
                   lambda p: container_status(p).get("state", {}).get("waiting", {}).get("reason")
                   == "CrashLoopBackOff", "CrashLoopBackOff")
    first = container_status(pod)["restartCount"]
    last = container_status(pod)["lastState"]["terminated"]
    assert last["exitCode"] == 3 and last["message"] == "dying"
    # kubectl logs reaches the local node's log endpoint.
    assert cluster.kubectl("logs", "crash", "-n", namespace, "--previous").stdout == "dying\n"
    # The kubelet's schedule: the first restart is immediate, the next after 10 s.
    pod = wait_pod(cluster, namespace, "crash", lambda p: container_status(p).get("restartCount", 0) > first,
                   "another restart", timeout=25)
    assert pod["status"]["phase"] == "Running"  # restartPolicy Always: still running, between restarts


def test_deleting_a_pod_stops_it_with_sigterm_then_removes_the_object(cluster, namespace, tmp_path):
    script = ("import os, signal, sys, time\n"
              "out = os.environ['DEVCLUSTER_MOUNT_OUT']\n"
              "def term(*_):\n"
              "    open(os.path.join(out, 'signal'), 'w').write('SIGTERM')\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, term)\n"
              "open(os.path.join(out, 'started'), 'w').write('yes')\n"
              "while True: time.sleep(1)\n")
    tmp_path.chmod(0o777)
    cluster.apply(local_pod("graceful", namespace, [{
        "name": "c", "image": "x", "command": ["python", "-c", script],
        "volumeMounts": [{"name": "out", "mountPath": "/out"}]}],
        volumes=[{"name": "out", "hostPath": {"path": str(tmp_path), "type": "Directory"}}]))
    poll("the pod's process to start", lambda: (tmp_path / "started").exists(), 30, 0.2)
    cluster.kubectl("delete", "pod", "graceful", "-n", namespace, "--wait=false")
    poll("the pod object to go", lambda: get_pod(cluster, namespace, "graceful") is None, 20, 0.3)
    assert (tmp_path / "signal").read_text() == "SIGTERM"


def test_service_account_gets_a_kubeconfig_and_rbac_applies(cluster, namespace):
    role_rules = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
    cluster.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader", "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "read-configmaps", "namespace": namespace}, "rules": role_rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "reader", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    script = ("import os\n"
              "from kubernetes import client, config\n"
              "from kubernetes.client.exceptions import ApiException\n"
              "config.load_kube_config()\n"
              "api = client.CoreV1Api()\n"
              "ns = open(os.path.join(os.environ['DEVCLUSTER_SERVICEACCOUNT_DIR'], 'namespace')).read()\n"
              "api.list_namespaced_config_map(ns)\n"
              "try:\n"
              "    api.list_namespaced_secret(ns)\n"
              "    raise SystemExit('secrets were readable')\n"
              "except ApiException as e:\n"
              "    assert e.status == 403, e.status\n"
              "print('RBAC enforced')\n")
    cluster.apply(local_pod("rbac", namespace, [{"name": "c", "image": "x", "command": ["python", "-c", script]}],
                            serviceAccountName="reader", restartPolicy="Never"))
    pod = wait_pod(cluster, namespace, "rbac", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                   "to finish", timeout=60)
    log = (cluster.state_dir / "node" / "pods" / f"{namespace}_rbac" / "c.log").read_text()
    assert pod["status"]["phase"] == "Succeeded", log
    assert "RBAC enforced" in log


def test_no_service_account_token_when_automount_is_off(cluster, namespace):
    script = "import os; assert 'KUBECONFIG' not in os.environ, os.environ['KUBECONFIG']"
    cluster.apply(local_pod("no-token", namespace, [{"name": "c", "image": "x", "command": ["python", "-c", script]}],
                            automountServiceAccountToken=False, restartPolicy="Never"))
    pod = wait_pod(cluster, namespace, "no-token", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                   "to finish")
    assert pod["status"]["phase"] == "Succeeded"


def test_init_container_runs_first_and_shares_an_empty_dir(cluster, namespace):
    mount = [{"name": "work", "mountPath": "/work"}]
    cluster.apply(local_pod("job", namespace, [{"name": "main", "image": "x", "volumeMounts": mount,
                                                "command": ["sh", "-c", "test -f $DEVCLUSTER_MOUNT_WORK/init"]}],
                            restartPolicy="Never",
                            initContainers=[{"name": "prepare", "image": "x", "volumeMounts": mount,
                                             "command": ["sh", "-c", "touch $DEVCLUSTER_MOUNT_WORK/init"]}],
                            volumes=[{"name": "work", "emptyDir": {}}]))
    pod = wait_pod(cluster, namespace, "job", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                   "to finish")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert condition(pod, "Initialized") == "True"


def test_liveness_failure_restarts_the_container(cluster, namespace):
    cluster.apply(local_pod("live", namespace, [{
        "name": "c", "image": "x", "command": ["sleep", "600"],
        "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2}}]))
    pod = wait_pod(cluster, namespace, "live", lambda p: container_status(p).get("restartCount", 0) >= 1,
                   "a restart after the liveness probe failed")
    last = container_status(pod)["lastState"]["terminated"]
    assert last["exitCode"] == 143 and "Liveness probe failed" in last["message"]


def test_fifty_pods_come_and_go(cluster, namespace):
    replicas = 50
    cluster.apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "many", "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "many"}},
                 "template": {"metadata": {"labels": {"app": "many"}},
                              "spec": {"nodeSelector": LOCAL, "terminationGracePeriodSeconds": 2,
                                       "containers": [{"name": "c", "image": "x", "command": ["sleep", "600"]}]}}}})

    def pods():
        return cluster.get_json("pods", "-n", namespace, "-l", "app=many")["items"]

    poll(f"{replicas} Ready pods", lambda: sum(condition(p, "Ready") == "True" for p in pods()) == replicas, 90, 1)
    ips = [p["status"]["podIP"] for p in pods()]
    assert len(set(ips)) == replicas
    cluster.kubectl("scale", "deployment", "many", "-n", namespace, "--replicas=0")
    poll("every pod to go", lambda: not pods(), 60, 1)
    recorded = json.loads((cluster.state_dir / "node" / "processes.json").read_text())
    assert not [entry for entry in recorded.values() if entry["pod"].startswith(f"{namespace}/")]
