"""The chart's tenancy guards against a real API server: the ValidatingAdmissionPolicy refuses each
field a namespace user could abuse (an image off the list, `hostpath://`, a Prometheus URL off the list,
a Secret not allowed, a PriorityClass not allowed), naming the field and what is allowed, and admits a
ModelDeployment within the lists; an object is checked again only when its spec changes; the
aggregated roles give a namespace's `edit` user the ModelDeployment verbs and `view` only reads; the
operator serves HTTPS with the certificate of the Secret (probes, `helm test` and /alerts over it) and
takes a namespace's own alerts token for that namespace only.

A devcluster of this module's own (as tests/cluster/test_helm.py): the policy and the roles are
cluster-wide and must not meet the shared cluster's other tests.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from moe_operator.api import names

from devcluster.cluster.certs import make_ca, sign
from devcluster.testing import running_cluster
from devtools.harness import wait_for
from devtools.loadgen import service_port

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "moe-operator"
RELEASE, NS = "moe", "moe-system"
FULLNAME = "moe-moe-operator"
SERVICE_DNS = f"{FULLNAME}.{NS}.svc"
TEAM, OTHER = "team-a", "team-b"
ALICE, BOB = "alice@example.com", "bob@example.com"       # `edit` and `view` in team-a
GITOPS = "gitops-bot"                                      # tenancy.admissionPolicy.exemptUsers, `edit` in team-a
TLS_MOUNT_ENV = "$(DEVCLUSTER_MOUNT_VAR_RUN_SECRETS_MOE_OPERATOR_TLS)"

VALUES = {
    # the devcluster's needs (docs/helm.md, "On the devcluster")
    "nodeSelector": {"devcluster.serving.moe.dev/local": "true"},
    "operator": {"listenAddress": "$(POD_IP)"},
    "alertsWebhook": {"tokenFile": "$(DEVCLUSTER_MOUNT_VAR_RUN_SECRETS_MOE_OPERATOR_ALERTS)/token",
                      "namespaceTokens": {"enabled": True}},
    "webhook": {"tls": {"enabled": True, "certFile": f"{TLS_MOUNT_ENV}/tls.crt", "keyFile": f"{TLS_MOUNT_ENV}/tls.key"}},
    "tests": {"caFile": f"{TLS_MOUNT_ENV}/ca.crt"},
    # beyond the defaults: a PriorityClass list (off by default) and a trusted user
    "tenancy": {"allowedPriorityClasses": ["model-serving"], "admissionPolicy": {"exemptUsers": [GITOPS]}},
}


def helm(cluster, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(["helm", *args], env={**os.environ, **cluster.env}, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(monitoring=False, gpu_nodes=1, state_dir=tmp_path_factory.mktemp("devcluster")) as running:
        yield running


@pytest.fixture(scope="module")
def tls(cluster) -> dict[str, bytes]:
    """A CA and the operator's serving certificate in Secret <fullname>-tls (as cert-manager writes it)."""
    ca_cert, ca_key = make_ca()
    cert, key = sign(ca_cert, ca_key, SERVICE_DNS, dns_names=(FULLNAME, f"{FULLNAME}.{NS}", SERVICE_DNS), server=True)
    cluster.kubectl("create", "namespace", NS)
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                   "metadata": {"name": f"{FULLNAME}-tls", "namespace": NS},
                   "data": {k: base64.b64encode(v).decode() for k, v in
                            (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca_cert))}})
    return {"ca": ca_cert, "cert": cert}


@pytest.fixture(scope="module")
def release(cluster, tls, tmp_path_factory):
    values = tmp_path_factory.mktemp("values") / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    for ns in (TEAM, OTHER):
        cluster.kubectl("create", "namespace", ns)
    # the operator's readiness probe is HTTPS now: --wait shows the devcluster's kubelet got 200 over it
    helm(cluster, "install", RELEASE, str(CHART), "-n", NS, "-f", str(values), "--wait", "--timeout", "120s")
    for user, role in ((ALICE, "edit"), (BOB, "view"), (GITOPS, "edit")):
        cluster.kubectl("create", "rolebinding", f"{role}-{user.split('@')[0]}", f"--clusterrole={role}",
                        f"--user={user}", "-n", TEAM)
    yield {"values": str(values)}
    cluster.kubectl("delete", "md", "--all", "-A", "--wait=false", check=False)
    helm(cluster, "uninstall", RELEASE, "-n", NS, "--timeout", "60s")


def model_deployment(name: str) -> dict:
    """A small ModelDeployment with no pods (replicas 0)."""
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": TEAM},
            "spec": {"replicas": 0, "model": {"source": "builtin:tiny-mixtral"}, "resources": {"gpus": 1}}}


def create(cluster, body: dict, *as_user: str) -> subprocess.CompletedProcess:
    return cluster.kubectl("create", *(f"--as={u}" for u in as_user), "-f", "-", input=json.dumps(body), check=False)


def refusal(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, f"admitted: {result.stdout}"
    assert "Forbidden" in result.stderr and f"ValidatingAdmissionPolicy '{FULLNAME}-tenancy'" in result.stderr, \
        result.stderr
    return result.stderr


ALLOWED_URLS = ("allowed: a URL starting with http://prometheus.monitoring:9090, http://prometheus.monitoring.svc:9090, "
                "http://prometheus.monitoring.svc.cluster.local:9090, http://prometheus-operated.monitoring.svc:9090 "
                "(the operator's Helm value tenancy.allowedPrometheusURLs)")
SECRET_ENV = lambda env, secret: [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}]  # noqa: E731

REFUSED = {
    "image": ({"runtime": {"image": "docker.io/someone/miner:1"}},
              "spec.runtime.image: docker.io/someone/miner:1 is not allowed; allowed: an image under "
              "ghcr.io/moe-operator/ (the operator's Helm value tenancy.allowedImages)"),
    "image-lookalike": ({"runtime": {"image": "ghcr.io/moe-operator-evil/runtime:1"}},
                        "spec.runtime.image: ghcr.io/moe-operator-evil/runtime:1 is not allowed"),
    "hostpath": ({"model": {"source": "hostpath:///var/lib/kubelet"}},
                 "spec.model.source: hostpath:///var/lib/kubelet is not allowed: hostpath:// sources mount a directory "
                 "of the node and are off (the operator's Helm value tenancy.allowHostPath); allowed: pvc://, hf://, builtin:"),
    "analysis-url": ({"rollout": {"analysis": {"prometheus": {"url": "http://169.254.169.254/latest/meta-data"}}}},
                     "spec.rollout.analysis.prometheus.url: http://169.254.169.254/latest/meta-data is not allowed; "
                     + ALLOWED_URLS),
    "analysis-url-userinfo": ({"rollout": {"analysis": {"prometheus": {"url": "http://prometheus.monitoring:9090@evil.example/"}}}},
                              "spec.rollout.analysis.prometheus.url: http://prometheus.monitoring:9090@evil.example/ "
                              "is not allowed"),
    "autoscaling-url": ({"autoscaling": {"minReplicas": 1, "maxReplicas": 2,
                                         "prometheus": {"url": "http://kubernetes.default.svc/api"}}},
                        "spec.autoscaling.prometheus.url: http://kubernetes.default.svc/api is not allowed; " + ALLOWED_URLS),
    "secret": ({"runtime": {"env": [{"name": "PLAIN", "value": "1"}, *SECRET_ENV("HF_TOKEN", "hf-token"),
                                    *SECRET_ENV("DB_PASSWORD", "db-password")]}},
               "spec.runtime.env: DB_PASSWORD reads Secret db-password, which is not allowed; allowed: the Secrets "
               "hf-token, hf-token-* (the operator's Helm value tenancy.allowedSecrets)"),
    "priority-class": ({"scheduling": {"priorityClassName": "system-cluster-critical"}},
                       "spec.scheduling.priorityClassName: system-cluster-critical is not allowed; allowed: model-serving "
                       "(the operator's Helm value tenancy.allowedPriorityClasses)"),
}


def merged(name: str, spec: dict) -> dict:
    body = model_deployment(name)
    for key, value in spec.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value}
    return body


def test_the_policy_type_checks_against_the_crd(cluster, release):
    policy = cluster.get_json("validatingadmissionpolicy", f"{FULLNAME}-tenancy")
    # the API server type-checks every expression against the CRD's schema and reports what fails here
    assert not (policy.get("status") or {}).get("typeChecking", {}).get("expressionWarnings"), policy["status"]
    binding = cluster.get_json("validatingadmissionpolicybinding", f"{FULLNAME}-tenancy")
    assert binding["spec"]["validationActions"] == ["Deny"] and binding["spec"]["policyName"] == f"{FULLNAME}-tenancy"


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_each_guard_refuses_with_the_field_and_the_allowed_values(cluster, release, case):
    spec, message = REFUSED[case]
    stderr = refusal(create(cluster, merged(f"refused-{case}", spec), ALICE))
    assert message in " ".join(stderr.split()), stderr


def test_a_modeldeployment_within_the_lists_is_admitted(cluster, release):
    body = merged("allowed", {
        "model": {"source": "hf://deepseek-ai/DeepSeek-V2-Lite"},
        "runtime": {"image": "ghcr.io/moe-operator/runtime:0.2.0",
                    "env": [*SECRET_ENV("HF_TOKEN", "hf-token"), *SECRET_ENV("HF_TOKEN_B", "hf-token-team-a"),
                            {"name": "POD_CONFIG", "valueFrom": {"configMapKeyRef": {"name": "any", "key": "k"}}}]},
        "rollout": {"analysis": {"prometheus": {"url": "http://prometheus.monitoring:9090/prometheus"}}},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 2,
                        "prometheus": {"url": "http://prometheus-operated.monitoring.svc:9090"}},
        "scheduling": {"priorityClassName": "model-serving"},
    })
    result = create(cluster, body, ALICE)
    assert result.returncode == 0, result.stderr
    assert cluster.get_json("md", "allowed", "-n", TEAM)["spec"]["runtime"]["image"] == "ghcr.io/moe-operator/runtime:0.2.0"
    # the default image (the CRD's default, filled in before admission) is the project's: allowed
    result = create(cluster, model_deployment("defaults"), ALICE)
    assert result.returncode == 0, result.stderr
    # and the policy covers the namespaces the operator does not watch as well (scope Cluster: all)
    assert "is not allowed" in refusal(create(cluster, {**merged("other", REFUSED["image"][0]),
                                                        "metadata": {"name": "other", "namespace": OTHER}}))


def test_an_object_is_checked_again_only_when_its_spec_changes(cluster, release):
    """An exempt user (a trusted GitOps controller) may create anything; a namespace user may still
    label or annotate that object (`kubectl moe pause`), but not change its spec outside the lists."""
    legacy = merged("legacy", {"runtime": {"image": "registry.internal/runtime:1"}})
    result = create(cluster, legacy, GITOPS)
    assert result.returncode == 0, result.stderr
    cluster.kubectl("annotate", f"--as={ALICE}", "md", "legacy", "-n", TEAM, "serving.moe.dev/paused=true")
    cluster.kubectl("label", f"--as={ALICE}", "md", "legacy", "-n", TEAM, "team=a")
    stderr = refusal(cluster.kubectl("patch", f"--as={ALICE}", "md", "legacy", "-n", TEAM, "--type=merge",
                                     "-p", '{"spec": {"runtime": {"args": ["--max-num-seqs", "8"]}}}', check=False))
    assert "spec.runtime.image: registry.internal/runtime:1 is not allowed" in stderr
    # the scale subresource is not the spec's door the policy watches (kubectl scale, the autoscaler)
    cluster.kubectl("scale", f"--as={ALICE}", "md", "legacy", "-n", TEAM, "--replicas=0")


def can_i(cluster, user: str, verb: str, resource: str, ns: str = TEAM, *extra: str) -> bool:
    result = cluster.kubectl("auth", "can-i", f"--as={user}", verb, resource, "-n", ns, *extra, check=False)
    return result.stdout.strip() == "yes"


def test_aggregated_roles_give_namespace_users_the_right_verbs(cluster, release):
    for role in ("admin", "edit", "view"):
        labels = cluster.get_json("clusterrole", f"{FULLNAME}-{role}")["metadata"]["labels"]
        assert labels[f"rbac.authorization.k8s.io/aggregate-to-{role}"] == "true"
    md = "modeldeployments.serving.moe.dev"
    # the aggregation controller copies the rules into edit/view shortly after the install
    wait_for("edit to take in the ModelDeployment rules", lambda: can_i(cluster, ALICE, "create", md), 30, 0.5)
    wait_for("view to take in the ModelDeployment rules", lambda: can_i(cluster, BOB, "list", md), 30, 0.5)
    write = [(v, md) for v in ("create", "update", "patch", "delete", "deletecollection")]
    write += [(v, md, "--subresource=scale") for v in ("update", "patch")]
    read = [(v, md) for v in ("get", "list", "watch")] + [("get", md, f"--subresource={s}") for s in ("status", "scale")]
    assert [a for a in write + read if not can_i(cluster, ALICE, a[0], a[1], TEAM, *a[2:])] == []
    assert [a for a in read if not can_i(cluster, BOB, a[0], a[1], TEAM, *a[2:])] == []
    assert [a for a in write if can_i(cluster, BOB, a[0], a[1], TEAM, *a[2:])] == []
    # nobody but the operator writes status; nothing outside their namespace; no Secrets through this
    assert not can_i(cluster, ALICE, "patch", md, TEAM, "--subresource=status")
    assert not can_i(cluster, ALICE, "create", md, OTHER) and not can_i(cluster, BOB, "get", md, OTHER)
    assert not can_i(cluster, BOB, "get", "secrets")
    # and what can-i says holds: view is refused a create by RBAC (before admission)
    result = create(cluster, model_deployment("by-bob"), BOB)
    assert result.returncode != 0 and "forbidden" in result.stderr and "cannot create resource" in result.stderr


def https_get(port: int, path: str, ca: bytes, method: str = "GET", body: bytes = b"",
              headers: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """One HTTPS request to the service proxy's port, the certificate checked against `ca` for the
    Service's DNS name; (status, body, the server's certificate in DER)."""
    context = ssl.create_default_context(cadata=ca.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=SERVICE_DNS) as conn:
            head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": SERVICE_DNS, "Connection": "close",
                                                         "Content-Length": str(len(body)), **(headers or {})}.items())
            conn.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            der = conn.getpeercert(binary_form=True)
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2], der


def test_the_operator_serves_https_with_the_secrets_certificate(cluster, release, tls):
    pod = cluster.get_json("pods", "-n", NS, "-l", "app.kubernetes.io/component=operator")["items"][0]
    container = pod["spec"]["containers"][0]
    assert f"--tls-cert-file={TLS_MOUNT_ENV}/tls.crt" in container["args"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    port = service_port(cluster.state_dir, NS, FULLNAME)
    status, body, der = https_get(port, "/healthz", tls["ca"])
    assert status == 200 and body.strip() == b"ok"
    assert der == ssl.PEM_cert_to_DER_cert(tls["cert"].decode())
    # no plain HTTP on that port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            answer = raw.recv(65536)
        except OSError:
            answer = b""
        assert not answer.startswith(b"HTTP/")
    # `helm test` fetches /healthz over HTTPS, the chain checked against the Secret's ca.crt
    helm(cluster, "upgrade", RELEASE, str(CHART), "-n", NS, "--reuse-values",
         "--set", f"tests.url=https://127.0.0.1:{port}/healthz", "--timeout", "60s")
    result = helm(cluster, "test", RELEASE, "-n", NS, "--timeout", "120s")
    assert re.search(r"Phase:\s+Succeeded", result.stdout), result.stdout


def alert_post(port: int, ca: bytes, token: str, namespace: str) -> tuple[int, dict]:
    payload = {"version": "4", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "MoECanaryLatencyHigh", "namespace": namespace,
                                        "modeldeployment": "alerted"},
         "startsAt": datetime.now(UTC).isoformat(timespec="milliseconds")}]}
    status, body, _ = https_get(port, "/alerts", ca, "POST", json.dumps(payload).encode(),
                                {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return status, json.loads(body) if body.startswith(b"{") else {}


def test_a_namespaces_own_token_opens_alerts_for_that_namespace_only(cluster, release, tls):
    """alertsWebhook.namespaceTokens: the operator reads Secret moe-alerts-token of the alert's namespace
    (RBAC `get` on that one name) and takes its token for alerts naming that namespace."""
    rules = cluster.get_json("clusterrole", FULLNAME)["rules"]
    assert {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["moe-alerts-token"]} in rules
    cluster.apply(model_deployment("alerted"))
    token = uuid.uuid4().hex
    cluster.kubectl("create", "secret", "generic", "moe-alerts-token", f"--from-literal=token={token}", "-n", TEAM)
    port = service_port(cluster.state_dir, NS, FULLNAME)
    status, reply = alert_post(port, tls["ca"], token, TEAM)
    assert status == 200 and reply["ignored"][0]["why"] == "no rollout is running", reply
    assert alert_post(port, tls["ca"], token, OTHER)[0] == 401
    assert alert_post(port, tls["ca"], "not-" + token, TEAM)[0] == 401
    global_token = base64.b64decode(cluster.get_json("secret", f"{FULLNAME}-alerts", "-n", NS)["data"]["token"]).decode()
    assert alert_post(port, tls["ca"], global_token, OTHER)[0] == 200
