"""The operator's start as its ServiceAccount sees it: with exactly the rules of `permissions.RULES` in
a Role (nothing cluster-scoped), /healthz turns 200 only once the watches are listed, quickly, without a
403 in the log; with a narrowed Role, the log and /healthz name the missing permission, and fixing the
Role makes it ready without a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from moe_operator.api import names
from moe_operator.app.permissions import RULES

from devtools.harness import RunningOperator, free_port, install_crd, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
SA = "moe-op"


@pytest.fixture(scope="session")
def cluster(plain_cluster):
    """These tests need no Prometheus or Alertmanager."""
    return plain_cluster


@pytest.fixture
def ns(cluster):
    install_crd(cluster)
    name = f"start-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("create", "serviceaccount", SA, "-n", name)
    cluster.kubectl("create", "rolebinding", SA, "-n", name, f"--role={SA}", f"--serviceaccount={name}:{SA}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def grant(cluster, ns: str, without: tuple[str, str] | None = None) -> None:
    """The Role `moe-op`: the table's namespaced rules, less (verb, resource) `without`."""
    rules = []
    for rule in RULES:
        if rule.cluster_scoped:
            continue
        for resource in rule.resources:
            verbs = [v for v in rule.verbs if (v, resource) != without]
            rules.append({"apiGroups": [rule.group], "resources": [resource], "verbs": verbs})
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": SA, "namespace": ns}, "rules": rules}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(role))


def service_account_kubeconfig(cluster, ns: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a TokenRequest token), as in a pod."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    token = cluster.kubectl("create", "token", SA, "-n", ns, "--duration=1h").stdout.strip()
    config = {"apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
              "users": [{"name": SA, "user": {"token": token}}],
              "contexts": [{"name": SA, "context": {"cluster": admin["clusters"][0]["name"], "user": SA,
                                                    "namespace": ns}}],
              "current-context": SA}
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def started_operator(cluster, kubeconfig: Path, ns: str) -> Iterator[RunningOperator]:
    """`moe-operator run --namespace ns` as the ServiceAccount, not waited for (its start is the test)."""
    port = free_port()
    log_path = Path(cluster.state_dir) / "logs" / f"moe-operator-startup-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moe_operator.app.cli", "run", "--kubeconfig", str(kubeconfig), "--host", "127.0.0.1",
           "--port", str(port), "--namespace", ns, "--resync-seconds", "5"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, **cluster.env, "KUBECONFIG": str(kubeconfig)})
    try:
        yield RunningOperator(process, port, log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def alive(op: RunningOperator) -> None:
    assert op.process.poll() is None, f"moe-operator exited with {op.process.returncode}:\n{op.log()[-4000:]}"


def test_ready_only_once_its_watches_are_listed_with_a_role_alone(cluster, ns, tmp_path):
    grant(cluster, ns)
    kubeconfig = service_account_kubeconfig(cluster, ns, tmp_path / "kubeconfig")
    started = time.monotonic()
    with started_operator(cluster, kubeconfig, ns) as op:
        answers = []

        def ready():
            alive(op)
            answers.append(op.get("/healthz"))
            return answers[-1][0] == 200

        wait_for("/healthz 200", ready, 30, 0.05)
        took = time.monotonic() - started
        # 200 comes after the first LISTs (the line is logged before /healthz can say ok) ...
        assert f"ready: watching {ns}" in op.log()
        assert all(body.startswith("starting") for status, body in answers if status == 503), answers
        # ... without kopf's cluster-wide scanning: no 403 retried for a minute (the Role is all it has)
        assert took < 20, f"/healthz 200 after {took:.1f}s"
        assert "forbidden" not in op.log().lower(), op.log()
        assert op.get("/livez")[0] == 200
        # and a ModelDeployment applied now is reconciled at once
        manifest = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "m", "namespace": ns},
                    "spec": {"replicas": 1, "model": {"source": "builtin:tiny-mixtral"}, "resources": {"gpus": 1},
                             "scheduling": {"nodeSelector": {"devcluster.serving.moe.dev/simulated": "true"}}}}
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        wait_for("the operator's pod", lambda: cluster.kubectl(
            "get", "pods", "-n", ns, "-l", f"{names.LABEL_DEPLOYMENT}=m", "-o", "name").stdout.strip(), 15, 0.2)
        cluster.kubectl("delete", "md", "m", "-n", ns, "--wait=false")


def test_a_narrowed_role_is_named_in_the_log_and_on_healthz_until_fixed(cluster, ns, tmp_path):
    grant(cluster, ns, without=("list", "pods"))
    kubeconfig = service_account_kubeconfig(cluster, ns, tmp_path / "kubeconfig")
    line = f"missing permission: list pods in namespace {ns} (ServiceAccount {ns}/{SA})"
    with started_operator(cluster, kubeconfig, ns) as op:
        def reported():
            alive(op)
            status, body = op.get("/healthz")
            return status == 503 and line in body and body
        body = wait_for("/healthz naming the missing permission", reported, 30, 0.2)
        assert f"grant it in the Role bound to it in namespace {ns}" in body and len(body.strip().splitlines()) == 1
        assert line in op.log()
        assert op.get("/livez")[0] == 200
        grant(cluster, ns)      # fixed: ready without a restart
        wait_for("/healthz 200 after the fix", lambda: alive(op) or op.get("/healthz")[0] == 200, 30, 0.2)
        assert op.log().count(line) == 1, "one line per missing permission, not one per check"
