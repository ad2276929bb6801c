"""The per-ModelDeployment PrometheusRule against the real API server and garbage collector: without
prometheus-operator's CRD nothing is rendered and nothing breaks; with it (a minimal structural
stand-in for the real, huge CRD) `<name>-latency` appears with the slo's thresholds and the labels
the /alerts webhook matches, follows slo changes, is deleted when the slo goes, stays quiet when
converged and is collected with its ModelDeployment."""

import json
import uuid

import pytest
from moe_operator.api import names
from moe_operator.app import alerts

from devtools.harness import install_crd, running_operator, wait_for

pytestmark = pytest.mark.cluster

CRD_NAME = "prometheusrules.monitoring.coreos.com"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {"kind": "PrometheusRule", "listKind": "PrometheusRuleList", "plural": "prometheusrules",
                  "singular": "prometheusrule", "shortNames": ["promrule"]},
        "scope": "Namespaced",
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
            "type": "object",
            "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }}}],
    },
}
SIMULATED = {"devcluster.serving.moe.dev/simulated": "true"}


@pytest.fixture(scope="session")
def cluster(plain_cluster):
    """These tests need no Prometheus or Alertmanager."""
    return plain_cluster


def md(name, ns, slo):
    rollout = {"analysis": {"slo": slo}} if slo else {}
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": 1, "model": {"source": "builtin:tiny-mixtral"}, "resources": {"gpus": 1},
                     "scheduling": {"nodeSelector": SIMULATED}, "rollout": rollout}}


def crd_exists(cluster) -> bool:
    return cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0


def rules(cluster, ns) -> dict:
    result = cluster.kubectl("get", "prometheusrules.monitoring.coreos.com", "-n", ns, "-o", "json",
                            "--show-managed-fields", check=False)
    if result.returncode != 0:
        return {}
    return {r["metadata"]["name"]: r for r in json.loads(result.stdout)["items"]}


def alerts_of(rule) -> dict:
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


@pytest.fixture
def ns(cluster):
    install_crd(cluster)
    name = f"promrule-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_without_the_crd_nothing_is_rendered_and_nothing_breaks(cluster, ns):
    if crd_exists(cluster):
        pytest.skip("this cluster has prometheus-operator's PrometheusRule CRD")
    with running_operator(cluster, namespaces=[ns], resync_seconds=1.0) as op:
        cluster.apply(md("plain", ns, {"p99LatencyMs": 1000}))
        wait_for("a Service", lambda: cluster.kubectl("get", "service", "plain", "-n", ns, check=False).returncode == 0,
                 60)
        before = op.metric("moe_operator_reconcile_total", result="ok")
        wait_for("3 resyncs", lambda: op.metric("moe_operator_reconcile_total", result="ok") >= before + 3, 30)
        assert op.metric("moe_operator_reconcile_total", result="error") == 0
        assert op.get("/healthz")[0] == 200
        assert op.metric("moe_operator_writes_total", kind="PrometheusRule") == 0


def test_the_rule_follows_the_slo_and_goes_with_the_modeldeployment(cluster, ns):
    ours = not crd_exists(cluster)
    if ours:
        cluster.apply(CRD)
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
    try:
        with running_operator(cluster, namespaces=[ns], resync_seconds=1.0) as op:
            cluster.apply(md("llm", ns, {"p99LatencyMs": 1500, "maxErrorRate": 0.05}))
            rule = wait_for("llm-latency", lambda: rules(cluster, ns).get("llm-latency"), 60, interval=0.2)
            uid = cluster.get_json("md", "llm", "-n", ns)["metadata"]["uid"]
            (owner,) = rule["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (names.KIND, "llm", uid, True)
            assert any(m["manager"] == names.FIELD_MANAGER and m["operation"] == "Apply"
                       for m in rule["metadata"]["managedFields"])
            found = alerts_of(rule)
            assert set(found) == {"MoECanaryLatencyHigh", "MoECanaryErrorRateHigh"}
            assert found["MoECanaryLatencyHigh"]["expr"].endswith("> 1.5")
            assert found["MoECanaryErrorRateHigh"]["expr"].endswith("> 0.05")
            for alert in found.values():
                labels = alert["labels"]
                assert labels[alerts.LABEL_NAMESPACE] == ns and labels[alerts.LABEL_MODELDEPLOYMENT] == "llm"
                assert {alerts.LABEL_REVISION, alerts.LABEL_TRACK} <= set(labels)
                assert 'serving_moe_dev_track=~"canary|preview"' in alert["expr"]

            # Converged means quiet: resyncs write nothing to the rule.
            version = rule["metadata"]["resourceVersion"]
            before = op.metric("moe_operator_reconcile_total")
            wait_for("3 resyncs", lambda: op.metric("moe_operator_reconcile_total") >= before + 3, 30)
            assert rules(cluster, ns)["llm-latency"]["metadata"]["resourceVersion"] == version

            # The slo changes: the rule follows (a threshold changed, one added, one dropped).
            cluster.kubectl("patch", "md", "llm", "-n", ns, "--type=json", "-p", json.dumps([
                {"op": "replace", "path": "/spec/rollout/analysis/slo",
                 "value": {"p99LatencyMs": 2500, "ttftP99Ms": 300}}]))

            def updated():
                rule = rules(cluster, ns).get("llm-latency")
                found = rule and alerts_of(rule)
                return found if found and set(found) == {"MoECanaryLatencyHigh", "MoECanaryTimeToFirstTokenHigh"} \
                    else None

            found = wait_for("the rule to follow the slo", updated, 60, interval=0.2)
            assert found["MoECanaryLatencyHigh"]["expr"].endswith("> 2.5")
            assert found["MoECanaryTimeToFirstTokenHigh"]["expr"].endswith("> 0.3")

            # No slo: no rule.
            cluster.kubectl("patch", "md", "llm", "-n", ns, "--type=json", "-p", json.dumps([
                {"op": "remove", "path": "/spec/rollout/analysis/slo"}]))
            wait_for("the rule to go with the slo", lambda: "llm-latency" not in rules(cluster, ns), 60, interval=0.2)

            # Garbage collection: the rule goes with its ModelDeployment.
            cluster.apply(md("short", ns, {"ttftP99Ms": 200}))
            wait_for("short-latency", lambda: rules(cluster, ns).get("short-latency"), 60, interval=0.2)
            cluster.kubectl("delete", "md", "short", "-n", ns, "--wait=true", "--timeout=30s")
            wait_for("garbage collection", lambda: "short-latency" not in rules(cluster, ns), 60, interval=0.2)
            assert op.metric("moe_operator_reconcile_total", result="error") == 0
            assert op.get("/healthz")[0] == 200
    finally:
        cluster.kubectl("delete", "md", "--all", "-n", ns, "--wait=true", "--timeout=30s", check=False)
        if ours:
            cluster.kubectl("delete", "crd", CRD_NAME, "--wait=true", "--timeout=60s", check=False)
