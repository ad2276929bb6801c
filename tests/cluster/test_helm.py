"""The Helm chart against a real API server: `helm lint --strict`, `helm template` through a server-side
dry run, least-privilege RBAC (rendered and as `kubectl auth can-i` sees it), valid alert rules; a
namespace-scoped install that serves only its namespaces; then one cluster-wide release's life: install
(the operator runs on the local node as the chart's ServiceAccount, with only the chart's permissions,
and brings an example ModelDeployment to Available), upgrade with changed values, `helm test`, the
/alerts webhook with the chart's token, a narrowed ClusterRole reported in a ModelDeployment's status,
and `helm uninstall` leaving only the CRD.

These tests bring up a devcluster of their own (three simulated GPU nodes; about 15 s): the chart installs a
cluster-wide operator, and on the shared devcluster other operators (`make demo` leaves one running)
would reconcile the same ModelDeployments and hide what this one does.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from lupa import LuaRuntime
from moe_operator.api import names

from devcluster.testing import running_cluster
from devtools.harness import wait_for
from devtools.loadgen import service_port

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "moe-operator"
CRD_SOURCE = ROOT / "crds" / "modeldeployments.yaml"
CRD_COPY = CHART / "files" / "crds" / "modeldeployments.yaml"
HEALTH_LUA = ROOT / "docs" / "argocd-health.lua"
RELEASE = "moe"                     # in rendering-only tests; an installed release gets its own name
FULLNAME = "moe-moe-operator"       # <release>-<chart>
LOCAL_NODE = {"devcluster.serving.moe.dev/local": "true"}
SIMULATED = {"devcluster.serving.moe.dev/simulated": "true"}
TOKEN_MOUNT = "/var/run/secrets/moe-operator/alerts"


DEVCLUSTER_VALUES = {
    # What a devcluster needs beyond the chart's real-cluster defaults (docs/helm.md): the local node,
    # the pod's own IP to bind (local pods share one network stack), the Secret's directory there.
    "nodeSelector": LOCAL_NODE,
    "operator": {"listenAddress": "$(POD_IP)", "resyncSeconds": 5},
    "alertsWebhook": {"tokenFile": "$(DEVCLUSTER_MOUNT_VAR_RUN_SECRETS_MOE_OPERATOR_ALERTS)/token"},
}


def helm(cluster, *args: str, timeout: float = 180, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["helm", *args], env={**os.environ, **cluster.env}, capture_output=True, text=True,
                            timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def render(cluster, *args: str) -> list[dict]:
    out = helm(cluster, "template", RELEASE, str(CHART), *args, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def values_file(tmp_path: Path, values: dict) -> str:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A devcluster of this module's own (see the module docstring), without monitoring."""
    with running_cluster(monitoring=False, gpu_nodes=3, state_dir=tmp_path_factory.mktemp("devcluster")) as running:
        yield running


# --- the chart as files ---------------------------------------------------------------------------

def test_chart_lints_strictly_with_defaults_and_every_option(cluster, tmp_path):
    helm(cluster, "lint", "--strict", str(CHART))
    everything = {
        "scope": {"mode": "Namespaced", "watchNamespaces": ["a", "b"]},
        "alertsWebhook": {"existingSecret": "my-token", "namespaceTokens": {"enabled": True}},
        "webhook": {"tls": {"enabled": True, "certManager": True}},
        "tenancy": {"allowHostPath": True, "allowedPriorityClasses": ["serving"], "allowedSecrets": ["*"]},
        "monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                       "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
        "image": {"digest": "sha256:" + "0" * 64},
        "networkPolicy": {"enabled": True, "from": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]},
        "highAvailability": {"enabled": True, "replicas": 3, "leaseSeconds": 15},
    }
    helm(cluster, "lint", "--strict", str(CHART), "-f", values_file(tmp_path, everything))


def test_schema_refuses_unknown_keys_and_wrong_values(cluster):
    for bad, what in ((("--set", "replicas=2"), "replicas"), (("--set", "scope.mode=Everywhere"), "scope/mode"),
                      (("--set", "operator.port=0"), "operator/port"),
                      (("--set", "networkPolicy.from=null"), "networkPolicy.from must name"),
                      (("--set", "webhook.tls.certManager=true"), "set both"),
                      (("--set", "tenancy.admissionPolicy.validationActions={Block}"), "validationActions")):
        result = helm(cluster, "template", RELEASE, str(CHART), *bad, check=False)
        assert result.returncode != 0 and what in result.stderr, result.stderr


def test_rendered_chart_passes_a_server_side_dry_run_in_both_scopes(cluster, namespace):
    for scope in ("Cluster", "Namespaced"):
        out = helm(cluster, "template", RELEASE, str(CHART), "-n", namespace, "--set", f"scope.mode={scope}",
                   "--set", "networkPolicy.enabled=true", "--set", "highAvailability.enabled=true",
                   "--set-string", "networkPolicy.from[0].podSelector.matchLabels.app=alertmanager").stdout
        result = cluster.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-",
                                 input=out, check=False)
        assert result.returncode == 0, f"{scope}: {result.stderr}"
        assert "customresourcedefinition.apiextensions.k8s.io/modeldeployments.serving.moe.dev" in result.stdout


def aggregated(role: dict) -> bool:
    """A ClusterRole for namespace users (aggregated into admin/edit/view): tests/cluster/test_tenancy.py."""
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"].get("labels", {}))


def rules_of(objects: list[dict]) -> dict[str, set[tuple[str, str, str]]]:
    """The operator's (Cluster)Role name -> {(apiGroup, resource, verb)} (with resourceNames it would be
    refused below)."""
    out = {}
    for role in [r for r in by_kind(objects, "ClusterRole") if not aggregated(r)] + by_kind(objects, "Role"):
        key = f"{role['kind']}/{role['metadata'].get('namespace', '')}/{role['metadata']['name']}"
        triples = out.setdefault(key, set())
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        triples.add((group, resource, verb))
    return out


NAMESPACED_RULES = {
    (names.GROUP, "modeldeployments", verb) for verb in ("get", "list", "watch", "patch")
} | {(names.GROUP, "modeldeployments/status", "patch"), (names.GROUP, "modeldeployments/scale", "patch"),
     (names.GROUP, "modeldeployments/finalizers", "update")} | {
    ("", resource, verb) for resource in ("pods", "services") for verb in ("list", "watch", "create", "patch", "delete")
} | {("", "events", "create")} | {
    ("apps", "controllerrevisions", verb) for verb in ("list", "watch", "create", "patch", "delete")} | {
    ("scheduling.k8s.io", "podgroups", verb) for verb in ("list", "watch", "create", "patch", "delete")}
PROMETHEUS_RULES = {("monitoring.coreos.com", "prometheusrules", v)
                    for v in ("list", "watch", "create", "patch", "delete")}
CRD_DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
NAMESPACE_DISCOVERY = {("", "namespaces", v) for v in ("list", "watch")}
NODES = {("", "nodes", v) for v in ("list", "watch")}     # gang admission by scheduling gates
LEADER_ELECTION = {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}


def test_rbac_grants_exactly_what_the_operator_uses(cluster):
    lease = {f"Role/moe-system/{FULLNAME}-leader-election": LEADER_ELECTION}
    cluster_wide = rules_of(render(cluster, "-n", "moe-system"))
    assert cluster_wide == {f"ClusterRole//{FULLNAME}": NAMESPACED_RULES | PROMETHEUS_RULES | CRD_DISCOVERY | NODES,
                            **lease}
    without_rules = rules_of(render(cluster, "-n", "moe-system", "--set", "prometheusRules.render=false"))
    assert without_rules == {f"ClusterRole//{FULLNAME}": NAMESPACED_RULES | CRD_DISCOVERY | NODES, **lease}
    namespaced = render(cluster, "-n", "moe-system", "--set", "scope.mode=Namespaced",
                        "--set", "scope.watchNamespaces={team-a,team-b}")
    assert rules_of(namespaced) == {
        f"Role/team-a/{FULLNAME}": NAMESPACED_RULES | PROMETHEUS_RULES,
        f"Role/team-b/{FULLNAME}": NAMESPACED_RULES | PROMETHEUS_RULES,
        f"ClusterRole//{FULLNAME}-discovery": CRD_DISCOVERY | NAMESPACE_DISCOVERY, **lease,
    }
    assert {(b["metadata"]["namespace"], b["subjects"][0]["namespace"]) for b in by_kind(namespaced, "RoleBinding")} \
        == {("team-a", "moe-system"), ("team-b", "moe-system"), ("moe-system", "moe-system")}
    (deployment,) = by_kind(namespaced, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    strict = render(cluster, "--set", "scope.mode=Namespaced", "--set", "scope.discoveryClusterRole=false")
    assert not [r for r in by_kind(strict, "ClusterRole") if not aggregated(r)] and not by_kind(strict, "ClusterRoleBinding")
    nothing_cluster_wide = render(cluster, "--set", "scope.mode=Namespaced", "--set", "scope.discoveryClusterRole=false",
                                  "--set", "crds.enabled=false", "--set", "rbac.aggregatedRoles=false",
                                  "--set", "tenancy.admissionPolicy.enabled=false")
    assert {o["kind"] for o in nothing_cluster_wide} <= {"Deployment", "Service", "ServiceAccount", "Secret", "Role",
                                                         "RoleBinding", "NetworkPolicy", "Pod",
                                                         "PodDisruptionBudget"}
    for objects in (cluster_wide, rules_of(strict)):
        assert not any("*" in triple for triples in objects.values() for triple in triples)
        assert not any(triple[1] == "secrets" for triples in objects.values() for triple in triples)


def test_operator_runs_two_replicas_electing_a_leader_by_default(cluster):
    objects = render(cluster)
    (deployment,) = by_kind(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert "--leader-elect" in args and "--leader-election-namespace=default" in args
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    (lease_role,) = [r for r in by_kind(objects, "Role") if any("leases" in rule["resources"] for rule in r["rules"])]
    assert {v for rule in lease_role["rules"] for v in rule["verbs"]} == {"get", "create", "update"}
    single = render(cluster, "--set", "highAvailability.enabled=false")
    (deployment,) = by_kind(single, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(a.startswith("--leader-elect") for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert not by_kind(single, "PodDisruptionBudget")


def test_operator_pod_is_restricted(cluster):
    objects = render(cluster)
    (deployment,) = by_kind(objects, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/moe-operator/operator:0.1.0"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # Alive while the process runs; ready only with every permission and the watches up (a missing
    # permission must not get the pod killed: it recovers once the Role is fixed).
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTP"}
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    (secret,) = by_kind(objects, "Secret")
    assert len(base64.b64decode(secret["data"]["token"])) == 40
    # The token is a mounted file: the operator needs no permission on Secrets.
    assert any(v.get("secret", {}).get("secretName") == secret["metadata"]["name"] for v in pod["volumes"])
    assert f"--alerts-token-file={TOKEN_MOUNT}/token" in container["args"]
    assert not by_kind(render(cluster, "--set", "alertsWebhook.existingSecret=mine"), "Secret")
    (test_pod,) = [o for o in objects if o["kind"] == "Pod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["automountServiceAccountToken"] is False


def test_crd_is_the_source_kept_on_uninstall(cluster):
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), "run `make chart-crds`"
    (crd,) = by_kind(render(cluster), "CustomResourceDefinition")
    assert crd["spec"] == yaml.safe_load(CRD_SOURCE.read_text())["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep",
                                              "argocd.argoproj.io/sync-options": "Prune=false"}
    assert not by_kind(render(cluster, "--set", "crds.enabled=false"), "CustomResourceDefinition")
    (unkept,) = by_kind(render(cluster, "--set", "crds.keep=false"), "CustomResourceDefinition")
    assert not unkept["metadata"].get("annotations")


def test_monitoring_objects_are_valid_and_alerts_carry_the_webhooks_labels(cluster, tmp_path):
    objects = render(cluster, "--set", "monitoring.serviceMonitor.enabled=true",
                     "--set", "monitoring.podMonitor.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
                     "--set", "monitoring.grafanaDashboard.enabled=true")
    assert {o["kind"] for o in objects} >= {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
    (rule,) = by_kind(objects, "PrometheusRule")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make tools)"
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rollout_alerts = rule["spec"]["groups"][0]["rules"]
    for alert in rollout_alerts:
        assert "namespace" in alert["expr"]        # kept by the sum, so the alert carries it
        assert alert["labels"]["modeldeployment"] == "{{ $labels.serving_moe_dev_deployment }}"
        assert alert["labels"]["revision"] == "{{ $labels.serving_moe_dev_revision }}"
        assert alert["labels"]["track"] == "{{ $labels.serving_moe_dev_track }}"
    (dashboard,) = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    panels = json.loads(dashboard["data"]["moe-serving.json"])["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("moe_time_to_first_token_seconds", "moe_e2e_request_latency_seconds", "moe_generation_tokens_total",
                   "moe_kv_cache_usage_perc", "moe_expert_tokens_total", "moe_num_requests_waiting"):
        assert metric in exprs


# --- installs -------------------------------------------------------------------------------------

def operator_pods(cluster, name: str, ns: str, count: int = 2) -> list[dict]:
    """The release's live operator pods (two by default: a leader and a standby)."""
    deadline = time.monotonic() + 60
    while True:
        pods = cluster.get_json("pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name},"
                                                          "app.kubernetes.io/component=operator")["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if len(live) == count or time.monotonic() > deadline:
            assert len(live) == count, [p["metadata"]["name"] for p in pods]
            return live
        time.sleep(1)


def leader_pod(cluster, ns: str, pods: list[dict]) -> str:
    """The name of the operator pod holding the release's Lease, once one of `pods` holds it (after an
    upgrade the old leader releases it on its way out and a new pod takes it)."""
    names_ = {p["metadata"]["name"] for p in pods}
    deadline = time.monotonic() + 30
    while True:
        holder = cluster.get_json("lease", "moe-operator-leader", "-n", ns)["spec"].get("holderIdentity") or ""
        if holder.rpartition("_")[0] in names_ or time.monotonic() > deadline:
            return holder.rpartition("_")[0]
        time.sleep(0.5)


def operator_log(cluster, pod: dict) -> str:
    """The operator container's log on the devcluster's local node (no `kubectl logs` there)."""
    meta = pod["metadata"]
    path = Path(cluster.state_dir) / "node" / "pods" / f"{meta['namespace']}_{meta['name']}" / "operator.log"
    return path.read_text(errors="replace")


def argocd_health(obj: dict) -> dict:
    lua = LuaRuntime(unpack_returned_tuples=True)
    health = lua.execute(f"return function(obj)\n{HEALTH_LUA.read_text()}\nend")
    result = health(lua.table_from(json.loads(json.dumps(obj)), recursive=True))
    return {"status": result["status"], "message": result["message"]}


def example(ns: str, name: str | None = None) -> dict:
    """examples/gpu-deepseek.yaml with one replica (two simulated 8-GPU pods) in namespace `ns`."""
    body = yaml.safe_load((ROOT / "examples" / "gpu-deepseek.yaml").read_text())
    body["metadata"].update(namespace=ns, **({"name": name} if name else {}))
    body["spec"]["replicas"] = 1
    return body


def conditions(cluster, ns: str, name: str) -> dict:
    status = cluster.get_json("md", name, "-n", ns).get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or ()}


def wait_available(cluster, ns: str, name: str, timeout: int = 90) -> dict:
    cluster.kubectl("wait", "--for=condition=Available", f"md/{name}", "-n", ns, f"--timeout={timeout}s",
                    timeout=timeout + 10)
    return cluster.get_json("md", name, "-n", ns)


def test_a_namespaced_install_serves_only_its_namespaces(cluster, tmp_path):
    """The first install into this cluster: the chart creates the CRD; Roles only, in `team-a`."""
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), "the chart's CRD is stale: run `make chart-crds`"
    for ns in ("team-a", "team-b"):
        cluster.kubectl("create", "namespace", ns, check=False)
    values = values_file(tmp_path, {**DEVCLUSTER_VALUES, "scope": {"mode": "Namespaced", "watchNamespaces": ["team-a"]}})
    helm(cluster, "install", "tenant", str(CHART), "-n", "team-a", "-f", values, "--wait", "--timeout", "120s")
    try:
        live = cluster.get_json("crd", "modeldeployments.serving.moe.dev")["spec"]
        live.pop("conversion", None)        # the API server's default
        assert live == yaml.safe_load(CRD_SOURCE.read_text())["spec"]
        cluster.apply(example("team-b", "elsewhere"))     # first, so a cluster-wide operator would get it first
        cluster.apply(example("team-a"))
        md = wait_available(cluster, "team-a", "deepseek-v3")
        assert argocd_health(md) == {"status": "Healthy", "message": md["status"]["message"]}
        assert "status" not in cluster.get_json("md", "elsewhere", "-n", "team-b")
        # the discovery ClusterRole spares kopf its 403 retries (a minute without reconciling)
        for pod in operator_pods(cluster, "tenant", "team-a"):
            assert "forbidden" not in operator_log(cluster, pod).lower()
        assert not by_kind(cluster.get_json("roles", "-n", "team-b")["items"], "Role")
    finally:
        for ns in ("team-a", "team-b"):
            cluster.kubectl("delete", "md", "--all", "-n", ns, "--wait=true", "--timeout=60s", timeout=70, check=False)
        helm(cluster, "uninstall", "tenant", "-n", "team-a", "--wait", "--timeout", "60s")


def can_i(cluster, user: str, *args: str) -> bool:
    result = cluster.kubectl("auth", "can-i", f"--as={user}", *args, check=False)
    return result.stdout.strip() == "yes"


def test_a_cluster_scoped_install_grants_exactly_the_operators_rules(cluster, namespace):
    """Installed for real (RBAC objects, bindings; the CRD is there since the install above), with the
    operator pod held Pending: only the permissions are looked at."""
    name = f"moe-{uuid.uuid4().hex[:6]}"
    user = f"system:serviceaccount:{namespace}:{name}-moe-operator"
    helm(cluster, "install", name, str(CHART), "-n", namespace, "--set", "crds.enabled=false",
         "--set-string", "nodeSelector.no-such-node=true", "--timeout", "60s")
    try:
        allowed = [("list", "pods", "--all-namespaces"), ("watch", "services", "-n", "default"),
                   ("create", "pods", "-n", "kube-public"), ("delete", "services", "-n", "default"),
                   ("patch", "modeldeployments.serving.moe.dev", "-n", "default"),
                   ("patch", "modeldeployments.serving.moe.dev", "--subresource=status", "-n", "default"),
                   ("update", "modeldeployments.serving.moe.dev", "--subresource=finalizers", "-n", "default"),
                   ("create", "events", "-n", "default"),
                   ("watch", "customresourcedefinitions.apiextensions.k8s.io")]
        refused = [("get", "secrets", "-n", namespace), ("list", "secrets", "--all-namespaces"),
                   ("get", "configmaps", "-n", namespace), ("delete", "modeldeployments.serving.moe.dev", "-n", "default"),
                   ("update", "pods", "-n", "default"), ("create", "deployments.apps", "-n", "default"),
                   ("list", "namespaces"), ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
                   ("create", "pods", "--subresource=exec", "-n", "default"), ("get", "nodes")]
        assert [a for a in allowed if not can_i(cluster, user, *a)] == []
        assert [a for a in refused if can_i(cluster, user, *a)] == []
    finally:
        helm(cluster, "uninstall", name, "-n", namespace, "--timeout", "60s")
    assert not cluster.get_json("clusterroles,clusterrolebindings", "-l", f"app.kubernetes.io/instance={name}")["items"]


@pytest.fixture(scope="module")
def release(cluster, tmp_path_factory):
    """A cluster-wide release (the chart's default scope) in moe-system; ModelDeployments in `models`."""
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), "the chart's CRD is stale: run `make chart-crds`"
    name, ns = "moe", "moe-system"
    cluster.kubectl("create", "namespace", "models", check=False)
    values = values_file(tmp_path_factory.mktemp("helm"), DEVCLUSTER_VALUES)
    try:
        # A kept CRD of an earlier release (or one applied from crds/) is taken over.
        helm(cluster, "install", name, str(CHART), "-n", ns, "--create-namespace", "--take-ownership",
             "--force-conflicts", "-f", values, "--wait", "--timeout", "120s")
        yield {"name": name, "namespace": ns, "fullname": FULLNAME, "values": values}
    finally:
        cluster.kubectl("delete", "md", "--all", "--all-namespaces", "--wait=false", check=False)
        helm(cluster, "uninstall", name, "-n", ns, "--timeout", "60s", check=False)


def test_operator_runs_on_the_local_node_as_the_charts_service_account(cluster, release):
    ns = release["namespace"]
    pods = operator_pods(cluster, release["name"], ns)
    for pod in pods:
        assert pod["spec"]["nodeName"] == "devcluster-local"
        assert pod["spec"]["serviceAccountName"] == FULLNAME
        assert pod["status"]["phase"] == "Running"
        args = pod["spec"]["containers"][0]["args"]
        assert "--all-namespaces" in args and "--leader-elect" in args
    # one of them leads (the other stands by, ready)
    assert leader_pod(cluster, ns, pods) in {p["metadata"]["name"] for p in pods}
    assert len(base64.b64decode(cluster.get_json("secret", f"{FULLNAME}-alerts", "-n", ns)["data"]["token"])) == 40
    port = service_port(cluster.state_dir, ns, FULLNAME)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.status == 200


def test_installed_operator_brings_an_example_to_available(cluster, release):
    cluster.apply(example("models"))
    md = wait_available(cluster, "models", "deepseek-v3")
    pods = cluster.get_json("pods", "-n", "models", "-l", f"{names.LABEL_DEPLOYMENT}=deepseek-v3")["items"]
    assert pods and all(p["metadata"]["ownerReferences"][0]["kind"] == names.KIND for p in pods)
    # The devcluster enforces OwnerReferencesPermissionEnforcement: blockOwnerDeletion was allowed by the
    # chart's `update` on modeldeployments/finalizers.
    assert all(p["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True for p in pods)
    # Runtime pods never get an API token: the chart's RBAC is for the operator alone.
    assert all(p["spec"]["automountServiceAccountToken"] is False for p in pods)
    assert argocd_health(md) == {"status": "Healthy", "message": md["status"]["message"]}
    # the chart's rules cover everything the operator did: not one request was refused
    for pod in operator_pods(cluster, release["name"], release["namespace"]):
        assert "forbidden" not in operator_log(cluster, pod).lower()


def post_alerts(port: int, token: str | None, modeldeployment: str = "deepseek-v3") -> int:
    payload = {"version": "4", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "MoECanaryLatencyHigh", "namespace": "models",
                                        "modeldeployment": modeldeployment},
         # Started now, after the rollout began: an alert naming only the object counts only then.
         "startsAt": datetime.now(UTC).isoformat(timespec="milliseconds"),
         "annotations": {"summary": "canary p99 latency 3s above 2s"}}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", json.dumps(payload).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_alerts_webhook_takes_the_charts_token_only(cluster, release):
    ns = release["namespace"]
    token = base64.b64decode(cluster.get_json("secret", f"{FULLNAME}-alerts", "-n", ns)["data"]["token"]).decode()
    port = service_port(cluster.state_dir, ns, FULLNAME)
    assert post_alerts(port, None) == 401
    assert post_alerts(port, "not-" + token) == 401
    assert post_alerts(port, token) == 200      # no rollout runs: recorded as ignored, nothing changes


def test_upgrade_with_changed_values_rolls_the_operator_and_keeps_the_token(cluster, release):
    ns = release["namespace"]
    before = {p["metadata"]["uid"] for p in operator_pods(cluster, release["name"], ns)}
    token = cluster.get_json("secret", f"{FULLNAME}-alerts", "-n", ns)["data"]
    port = service_port(cluster.state_dir, ns, FULLNAME)
    helm(cluster, "upgrade", release["name"], str(CHART), "-n", ns, "--force-conflicts", "-f", release["values"],
         "--set", "operator.resyncSeconds=7", "--set", "podLabels.team=serving",
         "--set", f"tests.url=http://127.0.0.1:{port}/healthz", "--wait", "--timeout", "120s")
    after = operator_pods(cluster, release["name"], ns)
    assert not before & {p["metadata"]["uid"] for p in after}
    for pod in after:
        assert pod["metadata"]["labels"]["team"] == "serving"
        assert "--resync-seconds=7" in pod["spec"]["containers"][0]["args"]
    assert leader_pod(cluster, ns, after) in {p["metadata"]["name"] for p in after}
    assert cluster.get_json("secret", f"{FULLNAME}-alerts", "-n", ns)["data"] == token
    history = json.loads(helm(cluster, "history", release["name"], "-n", ns, "-o", "json").stdout)
    assert [h["status"] for h in history] == ["superseded", "deployed"]
    wait_available(cluster, "models", "deepseek-v3", 60)    # the new operator keeps it Available


def test_helm_test_checks_healthz_through_the_service(cluster, release):
    # (the upgrade above pointed tests.url at the service proxy: the devcluster has no cluster DNS;
    # no --logs: its local node serves no container logs through the API)
    result = helm(cluster, "test", release["name"], "-n", release["namespace"], "--timeout", "120s")
    assert re.search(r"TEST SUITE:\s+" + re.escape(FULLNAME) + r"-test-healthz", result.stdout), result.stdout
    assert re.search(r"Phase:\s+Succeeded", result.stdout), result.stdout


def test_helm_test_fails_when_the_operator_does_not_answer(cluster, release):
    ns = release["namespace"]
    helm(cluster, "upgrade", release["name"], str(CHART), "-n", ns, "--reuse-values", "--force-conflicts",
         "--set", "tests.url=http://127.0.0.1:9/healthz", "--set", "tests.timeoutSeconds=2", "--timeout", "60s")
    result = helm(cluster, "test", release["name"], "-n", ns, "--timeout", "60s", check=False)
    assert result.returncode != 0 and re.search(r"Phase:\s+Failed", result.stdout + result.stderr), \
        result.stdout + result.stderr
    # Back to a test that passes; it replaces the failed pod (kept for inspection: Helm never deletes a
    # hook's objects on uninstall, so a failed test pod outlives the release until the next `helm test`).
    port = service_port(cluster.state_dir, ns, FULLNAME)
    helm(cluster, "upgrade", release["name"], str(CHART), "-n", ns, "--reuse-values", "--force-conflicts",
         "--set", f"tests.url=http://127.0.0.1:{port}/healthz", "--set", "tests.timeoutSeconds=60", "--timeout", "60s")
    helm(cluster, "test", release["name"], "-n", ns, "--timeout", "60s")


def canary_manifest(args: list[str]) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "canary", "namespace": "models"},
            "spec": {"replicas": 2, "model": {"source": "builtin:tiny-mixtral"}, "runtime": {"args": args},
                     "resources": {"gpus": 1}, "scheduling": {"nodeSelector": SIMULATED},
                     "rollout": {"strategy": "Canary", "canary": {"steps": [{"setWeight": 50}, {"pause": {}}]}}}}


def gitops_sync(cluster, manifest: dict) -> None:
    """What Argo CD (ServerSideApply=true) or Flux does with the manifest in Git."""
    cluster.kubectl("apply", "--server-side", "--field-manager=gitops", "-f", "-", input=yaml.safe_dump(manifest))


def wait_health(cluster, status: str, timeout: float = 60) -> dict:
    def check():
        health = argocd_health(cluster.get_json("md", "canary", "-n", "models"))
        return health if health["status"] == status else None
    return wait_for(f"Argo CD health {status}", check, timeout, 0.3)


def test_argo_health_and_no_drift_through_a_canary_aborted_by_an_alert(cluster, release):
    """Healthy -> Suspended at a `pause: {}` step (and when a user pauses) -> Degraded once an alert
    through the chart's Service and token aborts the rollout; Git's manifest still matches (no drift)."""
    gitops_sync(cluster, canary_manifest([]))
    wait_available(cluster, "models", "canary")
    wait_health(cluster, "Healthy")
    revised = canary_manifest(["--max-num-seqs", "16"])
    gitops_sync(cluster, revised)
    assert "pause step 2" in wait_health(cluster, "Suspended")["message"]
    cluster.kubectl("annotate", "md", "canary", "-n", "models", "serving.moe.dev/paused=true")
    assert "paused by a user" in wait_health(cluster, "Suspended")["message"]
    cluster.kubectl("annotate", "md", "canary", "-n", "models", "serving.moe.dev/paused-")

    ns = release["namespace"]
    token = base64.b64decode(cluster.get_json("secret", f"{FULLNAME}-alerts", "-n", ns)["data"]["token"]).decode()
    assert post_alerts(service_port(cluster.state_dir, ns, FULLNAME), token, "canary") == 200
    degraded = wait_health(cluster, "Degraded")
    assert "aborted" in degraded["message"] and "MoECanaryLatencyHigh" in degraded["message"]
    # The operator wrote status and its annotations only: a sync of the same manifest changes nothing.
    diff = cluster.kubectl("diff", "--server-side", "--field-manager=gitops", "-f", "-", input=yaml.safe_dump(revised),
                           check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    cluster.kubectl("delete", "md", "canary", "-n", "models", "--wait=false")


def test_a_narrowed_role_is_reported_in_the_status(cluster, release):
    """Without `create` on pods, a new ModelDeployment says which permission the operator lacks."""
    role = cluster.get_json("clusterrole", FULLNAME)
    for rule in role["rules"]:
        if "pods" in rule["resources"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
    cluster.kubectl("replace", "-f", "-", input=json.dumps(role))
    cluster.apply(example("models", "narrowed"))

    def degraded():
        found = conditions(cluster, "models", "narrowed").get("Degraded")
        return found if found and found["status"] == "True" else None

    condition = wait_for("Degraded on the new ModelDeployment", degraded, 60, 0.5)
    assert condition["reason"] == "Forbidden"
    assert f"system:serviceaccount:{release['namespace']}:{FULLNAME}" in condition["message"]
    assert 'cannot create resource "pods"' in condition["message"]
    assert argocd_health(cluster.get_json("md", "narrowed", "-n", "models"))["status"] == "Degraded"


def test_uninstall_leaves_only_the_crd(cluster, release):
    cluster.kubectl("delete", "md", "--all", "-n", "models", "--wait=true", "--timeout=60s", timeout=70)
    result = helm(cluster, "uninstall", release["name"], "-n", release["namespace"], "--wait", "--timeout", "60s")
    assert "modeldeployments.serving.moe.dev" in result.stdout + result.stderr   # "kept due to the resource policy"
    selector = f"app.kubernetes.io/instance={release['name']}"
    left = cluster.get_json("deployments,services,secrets,serviceaccounts,roles,rolebindings,configmaps",
                            "-n", release["namespace"], "-l", selector)["items"]
    assert not left, [f"{o['kind']}/{o['metadata']['name']}" for o in left]
    assert not cluster.get_json("clusterroles,clusterrolebindings", "-l", selector)["items"]
    wait_for("the operator pod to go", lambda: not cluster.get_json(
        "pods", "-n", release["namespace"], "-l", selector)["items"], 60, 0.5)
    crd = cluster.get_json("crd", "modeldeployments.serving.moe.dev")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
