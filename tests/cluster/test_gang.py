"""Multi-pod replica groups against the real API server and scheduler with Kubernetes' gang
scheduling on (the devcluster enables the GenericWorkload and GangScheduling feature gates):
the pods carry the leader's address and their ranks; a group that cannot fit binds no pod; two
deployments that each fit alone but not together do not deadlock, one of them schedules whole."""

import json
import time
import uuid

import pytest
from moe_operator.api import names

from devtools.harness import install_crd, running_operator, wait_for

pytestmark = pytest.mark.cluster

SIMULATED = {"devcluster.serving.moe.dev/simulated": "true"}


def md(name, namespace, nodes, replicas=1, gpus=8, pods=2):
    """A deployment of `replicas` groups of `pods` pods x `gpus` GPUs, on the simulated nodes `nodes`."""
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": list(nodes)}]}]}}}
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "model": {"source": "builtin:tiny-mixtral"},
                     "resources": {"gpus": gpus}, "topology": {"podsPerReplica": pods},
                     "scheduling": {"nodeSelector": SIMULATED, "affinity": affinity}}}


@pytest.fixture(scope="session")
def cluster(plain_cluster):
    return plain_cluster


@pytest.fixture(scope="module")
def ns(cluster):
    install_crd(cluster)
    name = f"gang-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(cluster, ns):
    with running_operator(cluster, namespaces=[ns], resync_seconds=1.0) as op:
        yield op


@pytest.fixture(autouse=True)
def clean_slate(cluster, ns):
    yield
    cluster.kubectl("delete", "md", "--all", "-n", ns, "--wait=true", "--timeout=60s", timeout=90)
    wait_for("the previous test's pods to go", lambda: not get(cluster, "pods", "-n", ns)["items"], 60, 0.2)


def get(cluster, *args):
    return json.loads(cluster.kubectl("get", "-o", "json", *args).stdout)


def pods(cluster, ns, name):
    items = get(cluster, "pods", "-n", ns, "-l", f"{names.LABEL_DEPLOYMENT}={name}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def bound(cluster, ns, name):
    return [p for p in pods(cluster, ns, name) if p["spec"].get("nodeName")]


def env_of(pod):
    (container,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_cluster_serves_the_gang_api(cluster):
    resources = cluster.kubectl("api-resources", "--api-group=scheduling.k8s.io", "-o", "name").stdout
    assert "podgroups.scheduling.k8s.io" in resources


def test_a_group_is_one_pod_group_whose_pods_carry_the_leaders_address(cluster, ns, operator):
    cluster.apply(md("pair", ns, ["devcluster-gpu-0", "devcluster-gpu-1"]))
    running = wait_for("both pods of the group bound", lambda: len(bound(cluster, ns, "pair")) == 2 and
                       bound(cluster, ns, "pair"), 60, 0.2)
    rev = running[0]["metadata"]["labels"][names.LABEL_REVISION]
    group = f"pair-{rev}-0"
    by_rank = {int(p["metadata"]["labels"][names.LABEL_RANK]): p for p in running}
    for rank, pod in by_rank.items():
        assert pod["spec"]["hostname"] == f"rank-{rank}" and pod["spec"]["subdomain"] == group
        assert pod["spec"]["schedulingGroup"] == {"podGroupName": group}
        env = env_of(pod)
        assert env["MOE_LEADER_ADDRESS"] == f"rank-0.{group}.{ns}" and env["MOE_RANK"] == str(rank)
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("--node-rank") + 1] == str(rank)
        assert args[args.index("--tensor-parallel-size") + 1] == "16"
    service = get(cluster, "service", group, "-n", ns)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod_group = get(cluster, "podgroups.scheduling.k8s.io", group, "-n", ns)
    assert pod_group["spec"]["schedulingPolicy"] == {"gang": {"minCount": 2}}
    assert pod_group["metadata"]["ownerReferences"][0]["name"] == "pair"
    cluster.kubectl("wait", "--for=condition=Available", "md/pair", "-n", ns, "--timeout=60s", timeout=70)


def test_a_group_that_cannot_fit_binds_no_pod(cluster, ns, operator):
    cluster.apply(md("toolarge", ns, ["devcluster-gpu-2"]))   # two 8-GPU pods, one 8-GPU node
    wait_for("both pods created", lambda: len(pods(cluster, ns, "toolarge")) == 2, 30, 0.2)
    time.sleep(5)   # the scheduler has had every chance to bind one of them
    assert bound(cluster, ns, "toolarge") == [], "a half-scheduled group holds GPUs it cannot use"


def test_two_deployments_that_fit_only_one_at_a_time_do_not_deadlock(cluster, ns, operator):
    nodes = ["devcluster-gpu-0", "devcluster-gpu-1"]   # 16 GPUs: one group of 2 x 8, not two
    cluster.apply(md("left", ns, nodes))
    cluster.apply(md("right", ns, nodes))
    whole = wait_for("one deployment scheduled whole", lambda: [
        n for n in ("left", "right") if len(bound(cluster, ns, n)) == 2], 60, 0.2)
    (winner,) = whole
    loser = "right" if winner == "left" else "left"
    time.sleep(3)
    assert bound(cluster, ns, loser) == [], "the other deployment holds part of the GPUs"
    cluster.kubectl("delete", "md", winner, "-n", ns, "--wait=true", "--timeout=60s", timeout=70)
    wait_for(f"{loser} scheduled whole once the GPUs are free", lambda: len(bound(cluster, ns, loser)) == 2, 60, 0.2)
