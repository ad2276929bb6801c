"""Gang scheduling where the cluster serves no Workload API: the operator's own admission by scheduling
gates (`--gang-scheduling gates`, what `auto` does on such a cluster), against the real API server and
scheduler. A group's pods are created behind the gate and released together only when all of them fit:
a group that cannot fit binds no pod, and of two deployments that fit only one at a time, one
schedules whole and the other waits, gated, until the GPUs are free."""

import time
import uuid

import pytest
from moe_operator.api import names
from test_gang import bound, get, md, pods

from devtools.harness import install_crd, running_operator, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="session")
def cluster(plain_cluster):
    return plain_cluster


@pytest.fixture(scope="module")
def ns(cluster):
    install_crd(cluster)
    name = f"gates-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(cluster, ns):
    with running_operator(cluster, namespaces=[ns], resync_seconds=1.0,
                          extra_args=("--gang-scheduling", "gates")) as op:
        yield op


@pytest.fixture(autouse=True)
def clean_slate(cluster, ns):
    yield
    cluster.kubectl("delete", "md", "--all", "-n", ns, "--wait=true", "--timeout=60s", timeout=90)
    wait_for("the previous test's pods to go", lambda: not get(cluster, "pods", "-n", ns)["items"], 60, 0.2)


def gated(pod):
    return [g["name"] for g in pod["spec"].get("schedulingGates") or ()] == [names.GANG_GATE]


def test_a_group_that_fits_is_released_whole_without_pod_groups(cluster, ns, operator):
    cluster.apply(md("pair", ns, ["devcluster-gpu-0", "devcluster-gpu-1"]))
    running = wait_for("both pods of the group bound", lambda: len(bound(cluster, ns, "pair")) == 2 and
                       bound(cluster, ns, "pair"), 60, 0.2)
    assert {p["spec"]["nodeName"] for p in running} == {"devcluster-gpu-0", "devcluster-gpu-1"}
    assert not any(p["spec"].get("schedulingGates") or p["spec"].get("schedulingGroup") for p in running)
    assert "podgroups" not in cluster.kubectl("get", "podgroups.scheduling.k8s.io", "-n", ns, "-o", "name").stdout
    cluster.kubectl("wait", "--for=condition=Available", "md/pair", "-n", ns, "--timeout=60s", timeout=70)
    assert "released: its 2 pods fit" in operator.log()


def test_a_group_that_cannot_fit_stays_behind_its_gate(cluster, ns, operator):
    cluster.apply(md("toolarge", ns, ["devcluster-gpu-2"]))   # two 8-GPU pods, one 8-GPU node
    created = wait_for("both pods created", lambda: len(pods(cluster, ns, "toolarge")) == 2 and
                       pods(cluster, ns, "toolarge"), 30, 0.2)
    assert all(gated(p) for p in created)
    time.sleep(5)   # the gate keeper has looked several times
    assert bound(cluster, ns, "toolarge") == [], "a half-scheduled group holds GPUs it cannot use"
    assert all(gated(p) for p in pods(cluster, ns, "toolarge"))
    assert operator.metric("moe_operator_gang_waiting_groups") >= 1


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
    assert all(gated(p) for p in pods(cluster, ns, loser)) and len(pods(cluster, ns, loser)) == 2
    cluster.kubectl("delete", "md", winner, "-n", ns, "--wait=true", "--timeout=60s", timeout=70)
    wait_for(f"{loser} scheduled whole once the GPUs are free", lambda: len(bound(cluster, ns, loser)) == 2, 60, 0.2)
