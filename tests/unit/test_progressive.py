"""The I/O edge of rollouts: analysis only when a rollout runs (and never before acting on an abort),
its baselines in memory and not in status, templates kept for undo, the moment the canary left
rotation noted once, the next timed decision."""

import copy
import urllib.parse

import pytest
from moe_operator.analysis import Baselines, Measurement
from moe_operator.analysis.prometheus import PrometheusProvider
from moe_operator.api.spec import ModelDeployment
from moe_operator.api.timestamps import iso
from moe_operator.desired.diff import changes, desired_objects
from moe_operator.desired.pods import revision_of
from moe_operator.rollout import machine as rollout
from moe_operator.rollout import progressive
from moe_operator.rollout.requests import ANNOTATION_ABORT, ANNOTATION_PROMOTE, AbortRequest
from moe_operator.status import status_of
from moe_operator.world.observe import observed_from

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0


class CountingProvider:
    name = "fake"

    def __init__(self, result="pass"):
        self.calls = 0
        self.result = result

    def measure(self, ctx, memory):
        self.calls += 1
        return Measurement(self.result, "fake", {"samples": 50}), {"n": self.calls}


class World:
    def __init__(self, provider):
        self.body = {"metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 1, "annotations": {}},
                     "spec": {"replicas": 2, "model": {"source": "builtin:tiny-deepseek-v3"},
                              "resources": {"gpus": 1},
                              "rollout": {"maxSurgeGPUs": 1, "canary": {"steps": [{"setWeight": 50}, {"pause": {}}]},
                                          "analysis": {"interval": "10s", "slo": {"p99LatencyMs": 500}}}},
                     "status": {}}
        self.pods = {}
        self.provider = provider
        self.baselines = Baselines()
        self.now = T0
        self.reports = []

    def step(self):
        md = ModelDeployment.from_body(self.body)
        observed = observed_from(copy.deepcopy(list(self.pods.values())), [], 1)
        plan = progressive.next_plan(md, self.body, observed, revision_of(md), self.now, lambda cfg: self.provider,
                                     self.baselines)
        todo = changes(desired_objects(md, plan, observed), observed)
        for b in todo.apply:
            if b["kind"] == "Pod":
                old = self.pods.get(b["metadata"]["name"])
                self.pods[b["metadata"]["name"]] = {**copy.deepcopy(b), "status": old["status"] if old else {
                    "phase": "Running", "podIP": "127.100.0.9",
                    "conditions": [{"type": "Ready", "status": "True"}]}}
        for name, labels in getattr(todo, "relabel", ()):
            self.pods[name]["metadata"]["labels"] = {**self.pods[name]["metadata"]["labels"], **labels}
        for _kind, name, _ in todo.delete:
            self.pods.pop(name, None)
        report, plan = progressive.after_write(md, plan, self.now + 0.25)
        self.reports.append(report)
        self.body["status"] = {k: v for k, v in status_of(md, observed, plan, iso(self.now)).items()
                               if v is not None}
        return plan


def test_analysis_runs_only_during_a_rollout_and_not_before_an_abort():
    provider = CountingProvider()
    w = World(provider)
    for _ in range(3):
        w.step()
    assert provider.calls == 0, "no rollout, no analysis"
    stable = w.body["status"]["stableRevision"]
    w.body["spec"]["model"]["dtype"] = "float16"
    for _ in range(3):
        w.step()
    new = w.body["status"]["currentRevision"]
    assert provider.calls == 1 and w.body["status"]["rollout"]["analysis"]["measurements"][-1]["result"] == "pass"
    w.now += 10
    w.body["metadata"]["annotations"][ANNOTATION_ABORT] = AbortRequest(
        new, "AlertFiring", "slow", w.now - 0.5, "alert").to_json()
    plan = w.step()
    assert provider.calls == 1, "the abort is acted on without scraping first"
    state = w.body["status"]["rollout"]
    assert state["aborted"]["reason"] == "AlertFiring" and state["outOfRotationAt"] == iso(w.now + 0.25)
    assert w.reports[-1].rollback == ("AlertFiring", pytest.approx(0.75))
    assert not rollout.new_revision_in_rotation(plan)
    w.step()
    assert w.reports[-1].rollback is None, "reported once"
    assert stable != new


def test_promotion_is_reported_with_its_duration_and_due_in_follows_the_interval():
    w = World(CountingProvider())
    w.step()
    w.step()
    w.body["spec"]["model"]["dtype"] = "float16"
    plan = w.step()
    plan = w.step()
    # The stable group that left rotation for the canary is due for deletion after its drain (5 s),
    # before the next analysis interval (10 s).
    md = ModelDeployment.from_body(w.body)
    assert [g.drain_until - w.now for g in plan.groups if g.drain_until] == [pytest.approx(5)]
    assert progressive.due_in(md, plan, w.now, w.baselines) == pytest.approx(5)
    w.now += 5
    plan = w.step()
    assert progressive.due_in(ModelDeployment.from_body(w.body), plan, w.now, w.baselines) == pytest.approx(5)
    w.now += 30
    w.body["metadata"]["annotations"][ANNOTATION_PROMOTE] = "go"
    for _ in range(4):
        w.now += 10
        w.step()
    completed = [r.completed for r in w.reports if r.completed]
    assert len(completed) == 1 and completed[0][0] == "Canary" and 40 < completed[0][1] < 80


def test_at_a_pause_an_interval_with_the_same_verdict_writes_nothing_to_status():
    provider = CountingProvider()
    w = World(provider)
    w.step()
    w.step()
    w.body["spec"]["model"]["dtype"] = "float16"
    for _ in range(3):
        w.now += 1
        w.step()
    assert w.body["status"]["rollout"]["stepIndex"] == 1, "waiting at the pause for promote"
    before, calls = copy.deepcopy(w.body["status"]["rollout"]["analysis"]), provider.calls
    for _ in range(3):
        w.now += 10
        plan = w.step()
        assert w.body["status"]["rollout"]["analysis"] == before
        assert progressive.due_in(ModelDeployment.from_body(w.body), plan, w.now, w.baselines) == pytest.approx(10)
    assert provider.calls == calls + 3, "measured every interval all the same"
    assert "memory" not in before and "lastAt" not in before       # the memo is in memory, not in status
    assert w.baselines.get(("ns", "chat", w.body["status"]["currentRevision"]))["memory"] == {"n": provider.calls}


def prometheus_world(selector):
    def fetch(url):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["query"][0]
        seen.append(query)
        value = 0.1 if query.startswith("histogram_quantile") else 0.0 if " / " in query else 120
        return {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [T0, str(value)]}]}}

    seen = []
    w = World(PrometheusProvider(fetch=fetch))
    w.body["spec"]["rollout"]["analysis"]["prometheus"] = {"url": "http://127.0.0.1:9090", "selector": selector}
    w.step()
    w.step()
    w.body["spec"]["model"]["dtype"] = "float16"
    for _ in range(3):
        w.now += 10
        w.step()
    return w, seen


def test_a_promql_selector_with_braces_works_and_a_broken_one_pauses_the_rollout_saying_why():
    w, seen = prometheus_world('serving_moe_dev_revision="{revision}",model_name=~"chat-.{3}"')
    new = w.body["status"]["currentRevision"]
    assert seen and all(f'serving_moe_dev_revision="{new}",model_name=~"chat-.{{3}}"' in q for q in seen)
    assert w.body["status"]["rollout"]["analysis"]["measurements"][-1]["result"] == "pass"
    w, seen = prometheus_world('serving_moe_dev_revision="{revison}"')
    paused = w.body["status"]["rollout"]["paused"]
    assert seen == [] and paused["reason"] == "AnalysisInconclusive"
    assert "spec.rollout.analysis.prometheus.selector: unknown placeholder {revison}" in paused["message"]


def test_conditions_say_why_a_rollout_stopped():
    w = World(CountingProvider())
    w.step()
    w.step()
    w.body["spec"]["model"]["dtype"] = "float16"
    plan = w.step()
    md = ModelDeployment.from_body(w.body)
    assert progressive.rollout_conditions(md, plan)["Progressing"][1] == "RollingOut"
    assert "step 1/2" in progressive.rollout_conditions(md, plan)["Progressing"][2]
    new = w.body["status"]["currentRevision"]
    w.body["metadata"]["annotations"][ANNOTATION_ABORT] = AbortRequest(
        new, "AlertFiring", "p99 too high", w.now, "alert", {"alertname": "MoELatency"}).to_json()
    plan = w.step()
    conds = progressive.rollout_conditions(ModelDeployment.from_body(w.body), plan)
    assert conds["Degraded"][:2] == (True, "RolloutAborted")
    assert "alertname=MoELatency" in conds["Degraded"][2] and "kubectl moe retry chat" in conds["Degraded"][2]


def test_status_patch_removes_nested_keys_that_went_away():
    from moe_operator.status import merge_patch, status_patch
    old = {"rollout": {"revision": "b", "aborted": {"reason": "AlertFiring"}, "stepIndex": 1}, "phase": "Degraded"}
    new = {"rollout": {"revision": "c", "stepIndex": 0}, "phase": "Progressing"}
    assert status_patch(old, new) == {"rollout": {"aborted": None, "revision": "c", "stepIndex": 0},
                                      "phase": "Progressing"}
    assert merge_patch({"a": 1}, None) is None and merge_patch(None, {"a": 1}) == {"a": 1}


def test_rollout_knobs_from_the_spec():
    from moe_operator.api.spec import SpecError
    spec = {"model": {"source": "builtin:x"}, "rollout": {
        "paused": True, "progressDeadlineAbort": True,
        "analysis": {"failureLimit": 0, "inconclusiveLimit": 2, "minSamples": 50, "inconclusive": "Abort",
                     "stableRatio": 1.5, "slo": {"p99LatencyMs": 100}}}}
    md = ModelDeployment.from_body({"metadata": {"name": "chat"}, "spec": spec})
    assert md.rollout.paused and rollout.Options.of(md) == rollout.Options(
        on_inconclusive="Abort", progress_deadline_abort=True)
    cfg = md.rollout.analysis
    assert (cfg.failure_limit, cfg.inconclusive_limit, cfg.min_samples, cfg.stable_ratio) == (0, 2, 50, 1.5)
    spec["rollout"]["analysis"]["inconclusive"] = "Ignore"
    with pytest.raises(SpecError, match="inconclusive"):
        ModelDeployment.from_body({"metadata": {"name": "chat"}, "spec": spec})
