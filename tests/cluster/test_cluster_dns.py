"""Cluster DNS for local pods, as in a real cluster: a headless Service's pods are found by
`<hostname>.<subdomain>` (the search path) and by their FQDN, at their loopback pod IPs, through glibc's
getaddrinfo in the pod (what torch.distributed's TCPStore and httpx use); not-ready pods only with
publishNotReadyAddresses; nothing outside the cluster resolves."""

import json
import uuid

import pytest

from devcluster.dns import CLUSTER_DOMAIN
from devcluster.node.resolv import HOST_RESOLV_CONF
from devcluster.wait import poll

pytestmark = pytest.mark.cluster

LOCAL = {"devcluster.serving.moe.dev/local": "true"}
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}

# The client pod: resolves each name with getaddrinfo and prints one JSON line (addresses, or the
# error), its /etc/resolv.conf, and what an HTTP GET to the URL in argv[1] answers ("-": none).
RESOLVE = """
import json, socket, sys, urllib.request
found, http = {}, None
for name in sys.argv[2:]:
    try:
        found[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 8080, type=socket.SOCK_STREAM)})
    except socket.gaierror as e:
        found[name] = f"error: {e}"
try:
    if sys.argv[1] != "-":
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(sys.argv[1], timeout=10) as response:
            http = response.status
except Exception as e:
    http = repr(e)
print(json.dumps({"found": found, "resolv_conf": open("/etc/resolv.conf").read(), "http": http}))
"""


@pytest.fixture(scope="module")
def cluster(plain_cluster):
    state = plain_cluster.devcluster.read_state()
    if not state.cluster_dns:
        pytest.fail("this devcluster runs no cluster DNS (started by an older devcluster, or not as root): "
                    "`python -m devcluster down && python -m devcluster up`")
    return plain_cluster


@pytest.fixture
def namespace(cluster):
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def local_pod(name, namespace, command, *, labels=None, probe=None, **spec):
    container = {"name": "c", "image": "python:3.11", "command": command, "env": [POD_IP_ENV]}
    if probe:
        container["readinessProbe"] = {**probe, "periodSeconds": 1}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeSelector": LOCAL, "terminationGracePeriodSeconds": 2, "containers": [container],
                     **spec}}


def headless(name, namespace, publish):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": publish, "selector": {"app": "grp"},
                     "ports": [{"name": "dist", "port": 8080}]}}


def pod_status(cluster, namespace, name):
    result = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout).get("status", {}) if result.returncode == 0 else {}


def is_ready(status):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])


def wait_for(cluster, namespace, name, check, what, timeout=60.0):
    seen = {}

    def ok():
        seen["status"] = pod_status(cluster, namespace, name)
        return check(seen["status"])

    poll(f"pod {namespace}/{name} {what}", ok, timeout, 0.3, on_timeout=lambda: f"; status {seen.get('status')}")
    return seen["status"]


def resolve_in_pod(cluster, namespace, name, names, url="-", **spec):
    """Runs a client pod that resolves `names` (and GETs `url`); returns what it printed."""
    cluster.apply(local_pod(name, namespace, ["python", "-c", RESOLVE, url, *names], restartPolicy="Never",
                            **spec))
    status = wait_for(cluster, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), "to finish")
    output = cluster.kubectl("logs", name, "-n", namespace).stdout
    assert status["phase"] == "Succeeded", output
    return json.loads(output.strip().splitlines()[-1])


def test_replica_group_names_resolve_in_local_pods(cluster, namespace, tmp_path):
    dns_ip = cluster.devcluster.read_state().cluster_dns
    ready_flag = tmp_path / "lagging-ready"
    sleep = ["python", "-c", "import time; time.sleep(600)"]
    cluster.apply(
        headless("grp", namespace, publish=True),
        headless("strict", namespace, publish=False),
        local_pod("grp-0", namespace, ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
                  labels={"app": "grp"}, probe={"httpGet": {"path": "/", "port": 8080}},
                  hostname="leader", subdomain="grp"),
        local_pod("grp-1", namespace, sleep, labels={"app": "grp"}, probe={"exec": {"command": ["false"]}},
                  hostname="worker", subdomain="grp"),
        local_pod("lag-0", namespace, sleep, labels={"app": "grp"},
                  probe={"exec": {"command": ["test", "-e", str(ready_flag)]}},
                  hostname="lagging", subdomain="strict"))
    leader_ip = wait_for(cluster, namespace, "grp-0", is_ready, "to be Ready")["podIP"]
    running = lambda s: s.get("podIP") and all("running" in c.get("state", {})  # noqa: E731
                                                for c in s.get("containerStatuses") or [{}])
    worker_ip = wait_for(cluster, namespace, "grp-1", running, "to run")["podIP"]
    lagging_ip = wait_for(cluster, namespace, "lag-0", running, "to run")["podIP"]
    assert not is_ready(pod_status(cluster, namespace, "grp-1"))
    assert not is_ready(pod_status(cluster, namespace, "lag-0"))

    suffix = f"{namespace}.svc.{CLUSTER_DOMAIN}"
    dashed_leader = leader_ip.replace(".", "-")
    names = ["leader.grp", f"leader.grp.{namespace}", f"leader.grp.{suffix}", "worker.grp", "grp", f"strict.{suffix}", "lagging.strict",
             f"{dashed_leader}.{namespace}.pod.{CLUSTER_DOMAIN}", "example.com", "nobody.grp"]
    result = resolve_in_pod(cluster, namespace, "client", names, url="http://leader.grp:8080/")
    found = result["found"]

    assert found["leader.grp"] == [leader_ip]                      # short name, through the search path
    assert found[f"leader.grp.{namespace}"] == [leader_ip]         # LWS_LEADER_ADDRESS's form
    assert found[f"leader.grp.{suffix}"] == [leader_ip]            # the FQDN
    assert found["worker.grp"] == [worker_ip]                      # not Ready, but published
    assert found["grp"] == sorted([leader_ip, worker_ip, lagging_ip])
    assert found[f"strict.{suffix}"] == [leader_ip]                # ready endpoints only
    assert found["lagging.strict"].startswith("error")             # not Ready, not published
    assert found[f"{dashed_leader}.{namespace}.pod.{CLUSTER_DOMAIN}"] == [leader_ip]
    assert found["example.com"].startswith("error")                # never forwarded
    assert found["nobody.grp"].startswith("error")
    assert all(isinstance(v, str) or all(ip.startswith("127.") for ip in v) for v in found.values())
    assert result["http"] == 200                                   # connect by name to the leader
    assert result["resolv_conf"] == (f"nameserver {dns_ip}\n"
                                     f"search {suffix} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
                                     "options ndots:5\n")

    # Once the lagging pod is Ready, its name resolves without publishNotReadyAddresses too.
    ready_flag.touch()
    wait_for(cluster, namespace, "lag-0", is_ready, "to be Ready")
    found = resolve_in_pod(cluster, namespace, "client-2", ["lagging.strict", "strict"])["found"]
    assert found["lagging.strict"] == [lagging_ip]
    assert found["strict"] == sorted([leader_ip, lagging_ip])


def test_dns_policy_default_keeps_the_machines_resolv_conf(cluster, namespace):
    # Nothing is resolved here: the machine's nameserver may be off loopback.
    result = resolve_in_pod(cluster, namespace, "host-dns", [], dnsPolicy="Default")
    assert result["resolv_conf"] == HOST_RESOLV_CONF.read_text()
