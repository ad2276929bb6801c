"""The per-ModelDeployment PrometheusRule: built from the slo alone, labels the /alerts webhook
matches, the analysis' PromQL, and written only when it differs (converged means quiet)."""

import copy

import pytest
from moe_operator.analysis.prometheus import queries
from moe_operator.api import names
from moe_operator.api.spec import ModelDeployment
from moe_operator.app import alerts
from moe_operator.desired.diff import changes
from moe_operator.desired.rules import ALERT_ERRORS, ALERT_P99, ALERT_TTFT, BY, desired_rule, selector
from moe_operator.world.observe import Observed

pytestmark = pytest.mark.unit


def md(slo=None, name="llm", namespace="team-a"):
    rollout = {"analysis": {"slo": slo}} if slo is not None else {}
    return ModelDeployment.from_body({
        "apiVersion": names.API_VERSION, "kind": names.KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": "u-1", "generation": 1},
        "spec": {"replicas": 1, "model": {"source": "builtin:tiny-mixtral"}, "rollout": rollout},
    })


def test_no_slo_no_rule():
    assert desired_rule(md()) is None
    assert desired_rule(md({})) is None


def test_one_alert_per_threshold_the_spec_sets():
    rule = desired_rule(md({"p99LatencyMs": 1500, "ttftP99Ms": 250, "maxErrorRate": 0.05}))
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    meta = rule["metadata"]
    assert meta["name"] == "llm-latency" and meta["namespace"] == "team-a"
    assert meta["ownerReferences"] == [{"apiVersion": names.API_VERSION, "kind": names.KIND, "name": "llm",
                                        "uid": "u-1", "controller": True, "blockOwnerDeletion": True}]
    assert meta["labels"][names.LABEL_DEPLOYMENT] == "llm"
    (group,) = rule["spec"]["groups"]
    by_name = {r["alert"]: r for r in group["rules"]}
    assert set(by_name) == {ALERT_P99, ALERT_TTFT, ALERT_ERRORS}
    q = queries(selector(md()), "1m", BY)
    assert by_name[ALERT_P99]["expr"] == f"{q['p99']} > 1.5"
    assert by_name[ALERT_TTFT]["expr"] == f"{q['ttftP99']} > 0.25"
    assert by_name[ALERT_ERRORS]["expr"] == f"{q['errorRate']} > 0.05"
    for r in group["rules"]:
        assert 'serving_moe_dev_track=~"canary|preview"' in r["expr"]
        assert 'namespace="team-a",serving_moe_dev_deployment="llm"' in r["expr"]
        labels = r["labels"]
        assert labels[alerts.LABEL_NAMESPACE] == "team-a" and labels[alerts.LABEL_MODELDEPLOYMENT] == "llm"
        assert labels[alerts.LABEL_REVISION] == "{{ $labels.serving_moe_dev_revision }}"
        assert labels[alerts.LABEL_TRACK] == "{{ $labels.serving_moe_dev_track }}"


def test_only_the_slos_set():
    (group,) = desired_rule(md({"ttftP99Ms": 300}))["spec"]["groups"]
    assert [r["alert"] for r in group["rules"]] == [ALERT_TTFT]


def test_the_alert_labels_are_what_the_webhook_matches():
    rule = desired_rule(md({"p99LatencyMs": 1000}))
    labels = {k: v for k, v in rule["spec"]["groups"][0]["rules"][0]["labels"].items()}
    labels.update(alertname=ALERT_P99, revision="abc123", track="canary")   # as Prometheus expands them
    (alert,) = alerts.parse_payload(
        __import__("json").dumps({"alerts": [{"status": "firing", "labels": labels}]}).encode())
    (target,) = alerts.targets([alert])
    assert (target.namespace, target.name, target.revision, target.track) == ("team-a", "llm", "abc123", "canary")


def test_the_analysis_queries_are_unchanged_without_grouping():
    q = queries('a="b"', "30s")
    assert q["p99"].startswith("histogram_quantile(0.99, sum by (le) (rate(")
    assert q["errorRate"].startswith("sum(increase(")


def rules_only(observed_rules, spec):
    model = md(spec)
    desired = [r] if (r := desired_rule(model)) is not None and observed_rules is not None else []
    return changes(desired, Observed(rules=observed_rules))


def test_written_when_new_or_changed_quiet_when_converged_deleted_when_stale():
    rule = desired_rule(md({"p99LatencyMs": 1000}))
    assert [b["metadata"]["name"] for b in rules_only({}, {"p99LatencyMs": 1000}).apply] == ["llm-latency"]
    there = copy.deepcopy(rule)
    there["metadata"].update(uid="r-1", resourceVersion="7", managedFields=[{}])
    assert not rules_only({"llm-latency": there}, {"p99LatencyMs": 1000})
    changed = rules_only({"llm-latency": there}, {"p99LatencyMs": 2000})
    assert changed.apply and "> 2" in changed.apply[0]["spec"]["groups"][0]["rules"][0]["expr"]
    stale = rules_only({"llm-latency": there}, None)
    assert stale.delete == (("PrometheusRule", "llm-latency", "r-1"),) and not stale.apply


def test_no_crd_no_rule():
    assert not rules_only(None, {"p99LatencyMs": 1000})


def test_the_permission_is_optional_in_the_startup_check():
    from moe_operator.app.permissions import OPTIONAL, RULES, markdown_table, required
    (rule,) = [r for r in RULES if "prometheusrules" in r.resources]
    assert rule.group == "monitoring.coreos.com" and rule.needed == OPTIONAL
    assert set(rule.verbs) == {"list", "watch", "create", "patch", "delete"}
    for scope in ([], ["a"], ["team-*"]):
        assert not any(c.resource == "prometheusrules" for c in required(scope))
    assert "`prometheusrules` (optional" in markdown_table()
