"""The permission table (one source: docs/helm.md's RBAC table is rendered from it), the checks each
scope needs, the messages a user reads, kopf's scanning per scope, and what /healthz answers."""

import asyncio
import itertools
import logging
import re
from pathlib import Path

import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from moe_operator.api import names
from moe_operator.app import cli
from moe_operator.app.handlers import configure
from moe_operator.app.metrics import OperatorMetrics
from moe_operator.app.permissions import (
    RULES,
    Check,
    KopfRetries,
    Readiness,
    markdown_table,
    missing_message,
    one_line,
    required,
    scans_namespaces,
    subject,
)
from moe_operator.app.server import build_app

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_docs_rbac_table_is_the_operators_table():
    text = (ROOT / "docs" / "helm.md").read_text()
    assert markdown_table() in text, "docs/helm.md's RBAC table differs from permissions.RULES:\n" + markdown_table()


def test_the_chart_grants_every_namespaced_rule():
    """The chart's namespaced rules, as written in its template, are the table's (no more, no less)."""
    template = (ROOT / "charts" / "moe-operator" / "templates" / "rbac.yaml").read_text()
    block = template.split('define "moe-operator.namespacedRules"')[1].split("{{- end -}}")[0]
    granted = set()
    for group, resources, verbs in re.findall(r"apiGroups: \[(.*?)\]\s+resources: \[(.*?)\]\s+verbs: \[(.*?)\]", block):
        group = group.strip('"')
        granted |= {(group, r.strip(), v.strip()) for r in resources.split(",") for v in verbs.split(",")}
    table = {(rule.group, r, v) for rule in RULES if not rule.cluster_scoped for r in rule.resources for v in rule.verbs}
    assert granted == table


def triples(checks):
    return {(c.verb, c.resource + (f"/{c.subresource}" if c.subresource else ""), c.namespace) for c in checks}


def test_namespaced_scope_checks_each_namespace_and_nothing_cluster_wide():
    checks = required(["a", "b", "a"])
    assert {c.namespace for c in checks} == {"a", "b"}
    assert not any(c.cluster_scoped for c in checks)
    assert ("list", "pods", "a") in triples(checks) and ("patch", "modeldeployments/status", "b") in triples(checks)
    assert ("create", "events", "b") in triples(checks)
    assert ("update", "modeldeployments/finalizers", "a") in triples(checks)   # blockOwnerDeletion
    assert len(checks) == 2 * 23   # every namespaced verb of the table, in each namespace


def test_cluster_scope_checks_all_namespaces_and_the_crds():
    checks = required([])
    assert {c.namespace for c in checks} == {None}
    assert ("watch", "customresourcedefinitions", None) in triples(checks)
    assert not any(c.resource == "namespaces" for c in checks)


def test_namespace_globs_need_namespace_discovery():
    checks = required(["team-*"])
    assert ("list", "namespaces", None) in triples(checks)
    assert {c.namespace for c in checks} == {None}


def test_kopf_scans_nothing_with_exact_namespaces():
    assert configure(kopf.OperatorSettings(), ["a", "b"]).scanning.disabled
    assert not configure(kopf.OperatorSettings(), ["team-*"]).scanning.disabled
    assert not configure(kopf.OperatorSettings(), []).scanning.disabled     # cluster-wide: CRDs watched
    assert scans_namespaces(["!kube-system"]) and not scans_namespaces(["team-a"])


def test_messages_name_the_permission_the_subject_and_where_to_grant_it():
    sa = "system:serviceaccount:moe-system:moe-operator"
    assert missing_message(Check("list", "", "pods", namespace="team-a"), sa) == (
        "missing permission: list pods in namespace team-a (ServiceAccount moe-system/moe-operator): "
        "grant it in the Role bound to it in namespace team-a (or its ClusterRole); docs/helm.md lists every rule")
    line = missing_message(Check("patch", names.GROUP, "modeldeployments", "status"), sa)
    assert line.startswith("missing permission: patch modeldeployments.serving.moe.dev/status in all namespaces ")
    assert "grant it in the ClusterRole bound to it" in line
    crd = Check("watch", "apiextensions.k8s.io", "customresourcedefinitions", cluster_scoped=True)
    assert "watch customresourcedefinitions.apiextensions.k8s.io (cluster-scoped)" in missing_message(crd, "alice")
    assert subject("alice") == "user alice" and subject(None) == "the operator's user"


def test_readiness_reasons_in_order():
    readiness = Readiness()
    assert readiness.reason() == "starting: checking permissions"
    readiness.missing = ["missing permission: a", "missing permission: b"]
    assert readiness.reason() == "missing permission: a (and 1 more missing; see the log)"
    readiness.missing = []
    assert readiness.reason() == "starting: establishing watches"
    readiness.list_error = "cannot list pods in namespace a: Forbidden"
    assert readiness.reason() == "starting: cannot list pods in namespace a: Forbidden"
    readiness.listed = True
    assert readiness.ok()
    readiness.check_error = "connection refused"
    assert readiness.reason() == "cannot check permissions: connection refused"


async def test_healthz_says_why_it_is_not_ready():
    readiness = Readiness()
    app = build_app(OperatorMetrics(), readiness.ok, [web.get("/livez", cli.livez)])
    app.middlewares.append(cli.healthz_with_reason(readiness))
    async with TestClient(TestServer(app)) as http:
        response = await http.get("/healthz")
        assert (response.status, await response.text()) == (503, "starting: checking permissions\n")
        readiness.missing = ["missing permission: list pods in namespace a (user u): grant it"]
        response = await http.get("/healthz")
        assert (response.status, await response.text()) == (503, readiness.missing[0] + "\n")
        assert (await http.get("/livez")).status == 200
        readiness.missing, readiness.listed = [], True
        response = await http.get("/healthz")
        assert (response.status, await response.text()) == (200, "ok\n")
        assert (await http.get("/metrics")).status == 200


class FakeAccess:
    def __init__(self, answers):
        self.answers = list(answers)
        self.checks = [object()] * 3
        self.namespaces = ["a"]
        self.listed = 0

    def missing(self):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def list_watched(self):
        self.listed += 1
        return None


async def test_readiness_loop_waits_for_kopf_then_lists_once(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "moe_operator")
    monkeypatch.setattr(cli, "RETRY_SECONDS", 0.01)
    monkeypatch.setattr(cli, "RECHECK_SECONDS", 0.01)
    readiness, started = Readiness(), asyncio.Event()
    access = FakeAccess([OSError("connection refused"), ["missing permission: x"], ["missing permission: x"], []])
    task = asyncio.create_task(cli.keep_readiness(readiness, access, started))
    try:
        async def until(predicate):
            async with asyncio.timeout(5):
                while not predicate():
                    await asyncio.sleep(0.005)
        await until(lambda: readiness.missing == [])
        assert readiness.reason() == "starting: establishing watches" and access.listed == 0   # kopf not started
        started.set()
        await until(readiness.ok)
        await asyncio.sleep(0.05)
        assert access.listed == 1
    finally:
        task.cancel()
    logged = [r.getMessage() for r in caplog.records]
    assert logged.count("missing permission: x") == 1          # logged when it changes, not every check
    assert any("cannot check the operator's permissions" in m for m in logged)
    assert "permissions: all 3 granted" in logged


def test_kopf_retries_api_errors_forever():
    """kopf's default gives up on a 403 after about a minute, and a watch that gives up stops the
    operator: the delays never end, so a Role fixed later is picked up without a restart."""
    backoffs = configure(kopf.OperatorSettings()).networking.error_backoffs
    first = list(itertools.islice(iter(backoffs), 100))
    assert first[:6] == [1, 1, 2, 3, 5, 8] and set(first[6:]) == {10} and len(first) == 100
    assert list(itertools.islice(iter(backoffs), 3)) == [1, 1, 2]     # every request starts afresh


def test_a_retrying_kopf_watch_holds_readiness_for_one_retry_interval():
    now = [100.0]
    retries = KopfRetries(window=11, clock=lambda: now[0])
    readiness = Readiness(retries)
    readiness.missing, readiness.listed = [], True
    assert readiness.ok()
    logger = logging.getLogger("kopf._cogs.clients.watching")
    logger.addHandler(retries)
    try:
        logger.error("Request attempt #3 failed; will retry: GET https://api/api/v1/namespaces/a/pods -> "
                     "APIForbiddenError('pods is forbidden')\nmore")
        logger.error("Request attempt #1 failed; will retry: PATCH https://api/x -> APIServerError()")  # not a read
    finally:
        logger.removeHandler(retries)
    assert readiness.reason() == ("starting: a watch is retrying: GET https://api/api/v1/namespaces/a/pods -> "
                                  "APIForbiddenError('pods is forbidden')")
    now[0] += 11.5       # kopf retried since (every 10 s at most) and logged no failure: the watch is up
    assert readiness.ok()


def test_api_errors_read_as_one_line():
    from kubernetes.client import ApiException
    error = ApiException(status=403, reason="Forbidden")
    assert one_line(error) == "403 Forbidden"
    error.body = '{"kind": "Status", "message": "selfsubjectaccessreviews is forbidden:\\n user x"}'
    assert one_line(error) == "selfsubjectaccessreviews is forbidden: user x"
    assert one_line(OSError("connection\nrefused")) == "connection refused"
