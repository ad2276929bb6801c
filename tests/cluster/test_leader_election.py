"""Two operator replicas with --leader-elect against the real API server: only the Lease holder
reconciles; SIGKILL it and the other takes over (failover time measured) and reconciles."""

import json
import time
import uuid

import pytest
from moe_operator.api import names

from devtools.harness import install_crd, running_operator, wait_for

pytestmark = pytest.mark.cluster

SIMULATED = {"devcluster.serving.moe.dev/simulated": "true"}
LEASE_SECONDS = 6.0


@pytest.fixture(scope="session")
def cluster(plain_cluster):
    return plain_cluster


@pytest.fixture(scope="module")
def ns(cluster):
    install_crd(cluster)
    name = f"ha-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def md(name, namespace, replicas=1):
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "model": {"source": "builtin:tiny-mixtral"}, "resources": {"gpus": 1},
                     "scheduling": {"nodeSelector": SIMULATED}}}


def pods(cluster, ns, name):
    items = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-l", f"{names.LABEL_DEPLOYMENT}={name}",
                                       "-o", "json").stdout)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def holder(cluster, ns):
    result = cluster.kubectl("get", "lease", "moe-operator-leader", "-n", ns, "-o", "json", check=False)
    return json.loads(result.stdout)["spec"].get("holderIdentity") if result.returncode == 0 else None


def test_one_replica_leads_and_the_other_takes_over_when_it_dies(cluster, ns):
    args = ("--leader-elect", "--leader-election-namespace", ns,
            "--leader-election-lease-seconds", str(LEASE_SECONDS))
    with running_operator(cluster, namespaces=[ns], resync_seconds=2.0, extra_args=args) as first:
        wait_for("the first replica to lead", lambda: "leading:" in first.log(), 30, 0.2)
        with running_operator(cluster, namespaces=[ns], resync_seconds=2.0, extra_args=args) as second:
            # both serve /healthz; only the first reconciles
            assert second.get("/healthz")[0] == 200
            lease_holder = holder(cluster, ns)
            assert lease_holder and lease_holder.split("_")[0]
            cluster.apply(md("ha", ns))
            wait_for("the leader to create the pod", lambda: len(pods(cluster, ns, "ha")) == 1, 30, 0.2)
            assert "leading:" not in second.log() and "waiting for the lease" in second.log()
            first.process.kill()   # SIGKILL: no release, the Lease must expire
            killed = time.monotonic()
            wait_for("the standby to lead", lambda: "leading:" in second.log(), 30, 0.2)
            failover = time.monotonic() - killed
            assert holder(cluster, ns) != lease_holder
            # the new leader reconciles: a scale to 2 is carried out
            cluster.kubectl("scale", "md", "ha", "-n", ns, "--replicas=2")
            wait_for("the new leader to scale", lambda: len(pods(cluster, ns, "ha")) == 2, 30, 0.2)
            reconciled = time.monotonic() - killed
            print(f"failover: leader after {failover:.1f} s, reconciling after {reconciled:.1f} s "
                  f"(lease {LEASE_SECONDS:g} s)")
            assert failover <= LEASE_SECONDS + 8


def test_a_status_computed_from_an_old_version_is_refused_by_the_api_server(cluster, ns):
    """The second-writer guard is the API server's: a status merge patch carrying the
    resourceVersion it was computed from fails once the object moved on (no operator runs here)."""
    from kubernetes import config, dynamic
    from moe_operator.apply import StatusConflict, Writer

    writer = Writer(dynamic.DynamicClient(config.new_client_from_config(config_file=str(cluster.kubeconfig))))
    cluster.apply(md("cas", ns, replicas=0))
    version = json.loads(cluster.kubectl("get", "md", "cas", "-n", ns, "-o", "json").stdout)["metadata"]["resourceVersion"]
    written = writer.patch_status(ns, "cas", {"message": "computed from the current version"}, version)
    assert written["status"]["message"] == "computed from the current version"
    with pytest.raises(StatusConflict):
        writer.patch_status(ns, "cas", {"message": "computed from an old version"}, version)
    stored = json.loads(cluster.kubectl("get", "md", "cas", "-n", ns, "-o", "json").stdout)
    assert stored["status"]["message"] == "computed from the current version"
