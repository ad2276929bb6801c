"""Canary and blue-green state machines (moe_operator.rollout.machine) against a simulated cluster.

The simulation uses the operator's own pure pieces (spec, observe, desired objects, changes, status),
plays kubelet and scheduler (pods become ready when told, deleted pods terminate for a while and
still hold their GPUs), and checks on every pod list it observes that the GPU budget holds.
"""

import copy
import json
import random

import pytest
from moe_operator.analysis.verdict import FAIL, INCONCLUSIVE, PASS, PENDING, Verdict
from moe_operator.api import names
from moe_operator.api.spec import ModelDeployment
from moe_operator.api.timestamps import epoch, iso
from moe_operator.desired.diff import changes, desired_objects, with_templates
from moe_operator.desired.pods import revision_of
from moe_operator.desired.records import desired_records
from moe_operator.rollout import machine as rollout
from moe_operator.rollout.layout import canary_groups_for, gpu_budget, gpus_in_use
from moe_operator.rollout.machine import Options
from moe_operator.rollout.requests import (
    ANNOTATION_ABORT,
    ANNOTATION_PAUSED,
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RESUME,
    ANNOTATION_RETRY,
    AbortRequest,
    requests_from,
)
from moe_operator.status import status_of
from moe_operator.world import revisions
from moe_operator.world.observe import observed_from

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0


class Sim:
    """A ModelDeployment, its pods, a clock; `reconcile()` runs observe -> next_step -> apply -> status."""

    def __init__(self, spec, options=None):
        self.body = {"apiVersion": names.API_VERSION, "kind": names.KIND,
                     "metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 1,
                                  "annotations": {}},
                     "spec": copy.deepcopy(spec), "status": {}}
        self.pods = {}               # name -> body
        self.records = {}            # ControllerRevision name -> body
        self.terminating = {}        # name -> reconciles left before it is gone
        self.now = T0
        self.options = options
        self.verdict = None
        self.max_gpus_seen = 0
        self.plans = []
        self.scaled_down = False     # a smaller spec.replicas lowers the budget below what runs

    @property
    def md(self):
        return ModelDeployment.from_body(self.body)

    def observe(self):
        md = self.md
        observed = observed_from(copy.deepcopy(list(self.pods.values())), [], md.pods_per_replica,
                                 revisions=copy.deepcopy(list(self.records.values())))
        observed = with_templates(observed, revisions.templates(md, observed.revisions))
        used = gpus_in_use(md, observed)
        self.max_gpus_seen = max(self.max_gpus_seen, used)
        if not self.scaled_down:
            assert used <= gpu_budget(md), f"{used} GPUs in use, budget {gpu_budget(md)}"
        return observed

    def reconcile(self, write_status=True, terminate_for=1):
        md = self.md
        observed = self.observe()
        used_before = gpus_in_use(md, observed)
        reqs = requests_from(self.body["metadata"]["annotations"])
        revision = revision_of(md)
        plan = rollout.next_step(md, observed, revision, self.now, self.verdict, reqs, self.options)
        self.plans.append(plan)
        in_use = {p.revision for p in observed.pods if p.live} | {g.revision for g in plan.groups}
        records = desired_records(md, self.body["spec"], {}, revision, plan.stable_revision,
                                            plan.rollout_state, observed.revisions, in_use, iso(self.now))
        # Whatever is in rotation is whole and ready.
        groups = observed.groups
        for g in plan.groups:
            if g.in_rotation:
                assert groups[(g.revision, g.replica)].ready
        templates = revisions.templates(md, observed.revisions)
        todo = changes(desired_objects(md, plan, observed, templates, records, self.now), observed)
        for body in todo.apply:
            name = body["metadata"]["name"]
            if body["kind"] == revisions.KIND:
                self.records[name] = copy.deepcopy(body)
            old = self.pods.get(name) if body["kind"] == "Pod" else None
            if body["kind"] != "Pod":
                continue
            new = copy.deepcopy(body)
            new["metadata"]["uid"] = name
            new["status"] = old["status"] if old else {"phase": "Pending"}
            if old:
                assert old["spec"] == new["spec"], f"pod {name} re-applied with another spec"
            if old and old["metadata"].get("deletionTimestamp"):
                new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
            self.pods[name] = new
        for name, labels in getattr(todo, "relabel", ()):     # label patches of existing pods
            self.pods[name]["metadata"]["labels"] = {**self.pods[name]["metadata"]["labels"], **labels}
        for kind, name, _uid in todo.delete:
            self.records.pop(name, None) if kind == revisions.KIND else None
            if kind == "Pod" and name in self.pods:
                self.pods[name]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
                self.terminating[name] = terminate_for
        after = gpus_in_use(md, self.observe())   # the pod list right after the writes
        assert after <= max(gpu_budget(md), used_before), "a write took GPUs beyond the budget"
        if write_status:
            status = status_of(md, observed, plan, iso(self.now))
            self.body["status"] = {k: v for k, v in status.items() if v is not None}
        return plan

    # kubelet / scheduler
    def kubelet(self, ready=lambda name: True):
        for name in list(self.terminating):
            self.terminating[name] -= 1
            if self.terminating[name] <= 0:
                del self.terminating[name]
                self.pods.pop(name, None)
        for name, pod in self.pods.items():
            if not pod["metadata"].get("deletionTimestamp") and ready(name):
                pod["status"] = {"phase": "Running", "conditions": [
                    {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}

    def converge(self, rounds=30, ready=lambda name: True):
        for _ in range(rounds):
            self.kubelet(ready)
            before = copy.deepcopy((self.pods, self.body["status"]))
            plan = self.reconcile()
            if copy.deepcopy((self.pods, self.body["status"])) == before and not self.terminating:
                drains = [g.drain_until for g in plan.groups if g.drain_until is not None and g.drain_until > self.now]
                if drains:                    # a group waits out its drain period: the requeue
                    self.now = min(drains)
                    continue
                return
        raise AssertionError("did not converge")

    # users
    def new_revision(self, dtype="float16"):
        self.body["spec"]["model"]["dtype"] = dtype
        self.body["metadata"]["generation"] += 1
        return revision_of(self.md)

    def annotate(self, key, value):
        self.body["metadata"]["annotations"][key] = value

    def tick(self, seconds):
        self.now += seconds

    # views
    @property
    def state(self):
        return self.body["status"].get("rollout") or {}

    def rotating(self):
        out = {}
        for pod in self.pods.values():
            labels = pod["metadata"]["labels"]
            if labels[names.LABEL_IN_ROTATION] == "true" and labels[names.LABEL_RANK] == "0":
                out.setdefault(labels[names.LABEL_REVISION], 0)
                out[labels[names.LABEL_REVISION]] += 1
        return out

    def tracks(self, revision):
        return {p["metadata"]["labels"][names.LABEL_TRACK] for p in self.pods.values()
                if p["metadata"]["labels"][names.LABEL_REVISION] == revision}

    def names_of(self, revision):
        return {n for n, p in self.pods.items() if p["metadata"]["labels"][names.LABEL_REVISION] == revision
                and not p["metadata"].get("deletionTimestamp")}


def spec(replicas=4, steps=None, surge=1, gpus=1, strategy="Canary", **rollout_extra):
    ro = {"strategy": strategy, "maxSurgeGPUs": surge, **rollout_extra}
    if strategy == "Canary":
        ro["canary"] = {"steps": steps if steps is not None else
                        [{"setWeight": 25}, {"pause": {"duration": "30s"}}, {"setWeight": 50}, {"pause": {}}]}
    return {"replicas": replicas, "model": {"source": "builtin:tiny-deepseek-v3"},
            "resources": {"gpus": gpus}, "rollout": ro}


def started(spec_, **kw):
    sim = Sim(spec_, **kw)
    sim.converge()
    stable = revision_of(sim.md)
    assert sim.body["status"]["stableRevision"] == stable and sim.rotating() == {stable: sim.md.replicas}
    return sim, stable


def abort_annotation(revision, at, reason="AlertFiring", source="alert"):
    return AbortRequest(revision, reason, "latency p99 over 500ms", at, source,
                        {"alertname": "MoELatencyHigh"}).to_json()


# --- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight,replicas,expected", [
    (0, 4, (0, 4)), (10, 4, (1, 3)), (25, 4, (1, 3)), (50, 4, (2, 2)), (90, 4, (3, 1)), (100, 4, (4, 0)),
    (10, 1, (1, 1)), (50, 2, (1, 1)), (99, 2, (1, 1)), (100, 1, (1, 0)), (50, 0, (0, 0)), (60, 5, (3, 2)),
])
def test_weight_as_groups(weight, replicas, expected):
    assert canary_groups_for(weight, replicas) == expected


# --- canary --------------------------------------------------------------------------------------

def test_canary_goes_through_every_step_to_promoted_without_restarting_pods():
    sim, stable = started(spec())
    new = sim.new_revision()
    sim.reconcile()
    # Budget of one extra GPU: one canary group loading, all four stable groups still serving.
    assert len(sim.names_of(new)) == 1 and sim.rotating() == {stable: 4}
    assert sim.state["stepIndex"] == 0 and sim.body["status"]["canaryWeight"] == 0
    assert sim.tracks(new) == {"canary"}
    sim.reconcile()
    assert sim.rotating() == {stable: 4}          # not ready: not in rotation
    sim.kubelet()
    sim.reconcile()
    # Ready: in rotation, one stable group out; step 0 (setWeight 25) done -> step 1 (pause 30s).
    assert sim.rotating() == {stable: 3, new: 1}
    assert sim.body["status"]["canaryWeight"] == 25 and sim.state["stepIndex"] == 1
    canary_pods = set(sim.names_of(new))
    sim.converge()
    assert sim.state["stepIndex"] == 1 and sim.rotating() == {stable: 3, new: 1}
    sim.tick(31)
    sim.converge()
    # setWeight 50 reached, then waiting at the pause without duration.
    assert sim.rotating() == {stable: 2, new: 2} and sim.state["stepIndex"] == 3
    sim.tick(3600)
    sim.converge()
    assert sim.state["stepIndex"] == 3, "a pause without duration waits for promote"
    sim.annotate(ANNOTATION_PROMOTE, "2026-11-22T06:00:00Z")
    sim.converge()
    status = sim.body["status"]
    assert status["stableRevision"] == new and sim.rotating() == {new: 4}
    assert sim.tracks(new) == {"stable"}
    assert canary_pods <= set(sim.names_of(new)), "promotion relabels the canary pods, no restart"
    assert sim.state["completedAt"] and "aborted" not in sim.state
    # The old revision stays warm (out of rotation) for the scale-down delay, then goes.
    assert sim.names_of(stable) == set() or sim.rotating().get(stable) is None
    sim.tick(rollout.CANARY_SCALE_DOWN_DELAY_SECONDS + 1)
    sim.converge()
    assert sim.names_of(stable) == set() and len(sim.names_of(new)) == 4
    assert sim.max_gpus_seen <= 5


def test_promote_again_with_the_same_value_does_nothing():
    sim, stable = started(spec(steps=[{"setWeight": 25}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}]))
    sim.annotate(ANNOTATION_PROMOTE, "old-value")       # from before the rollout: not for this one
    new = sim.new_revision()
    sim.converge()
    assert sim.state["stepIndex"] == 1 and sim.rotating() == {stable: 3, new: 1}
    sim.annotate(ANNOTATION_PROMOTE, "v1")
    sim.converge()
    assert sim.state["stepIndex"] == 3 and sim.rotating() == {stable: 2, new: 2}
    sim.converge()
    assert sim.state["stepIndex"] == 3
    sim.annotate(ANNOTATION_PROMOTE_FULL, "v2")
    sim.converge()
    assert sim.body["status"]["stableRevision"] == new


def test_no_steps_promotes_when_the_canary_is_whole_and_ready():
    sim, stable = started(spec(steps=[], replicas=2, surge=2))
    new = sim.new_revision()
    sim.converge()
    assert sim.body["status"]["stableRevision"] == new and sim.rotating() == {new: 2}


def test_promotion_waits_for_passing_analysis():
    sim, stable = started(spec(steps=[{"setWeight": 50}], replicas=2, surge=2))
    new = sim.new_revision()
    sim.verdict = Verdict(PENDING, "waiting for the first interval")
    sim.converge()
    assert sim.rotating() == {new: 2} and sim.body["status"]["stableRevision"] == stable
    sim.verdict = Verdict(PASS)
    sim.converge()
    assert sim.body["status"]["stableRevision"] == new


def test_without_surge_stable_groups_go_first_but_not_below_the_weight():
    sim, stable = started(spec(surge=0))
    new = sim.new_revision()
    sim.reconcile()
    # No GPU to spare: one stable group (not more: weight 25 needs 3) leaves rotation...
    assert sim.rotating() == {stable: 3} and sim.names_of(new) == set()
    sim.kubelet()
    sim.reconcile()
    assert len(sim.names_of(stable)) == 4, "out of rotation, it drains before it is deleted"
    sim.tick(5)
    sim.kubelet()
    sim.reconcile()
    sim.kubelet()
    sim.reconcile()
    # ...is deleted, then the canary group is created in its place.
    assert len(sim.names_of(new)) == 1 and len(sim.names_of(stable)) == 3
    sim.converge()
    assert sim.rotating() == {stable: 3, new: 1}
    assert sim.max_gpus_seen <= 4


def test_single_replica_canary_needs_surge_for_both_tracks():
    sim, stable = started(spec(replicas=1, surge=1, steps=[{"setWeight": 50}, {"pause": {}}]))
    new = sim.new_revision()
    sim.converge()
    assert sim.rotating() == {stable: 1, new: 1} and sim.body["status"]["canaryWeight"] == 50


def test_alert_abort_takes_the_canary_out_of_rotation_at_once_and_is_remembered():
    sim, stable = started(spec())
    new = sim.new_revision()
    sim.converge()
    assert sim.rotating() == {stable: 3, new: 1}
    sim.tick(1)
    sim.annotate(ANNOTATION_ABORT, abort_annotation(new, sim.now))
    plan = sim.reconcile()
    assert not rollout.new_revision_in_rotation(plan)
    assert sim.rotating() == {stable: 3}, "out of rotation in the very first reconcile"
    assert sim.names_of(new), "its pods stay a little while"
    aborted = sim.state["aborted"]
    assert aborted["reason"] == "AlertFiring" and aborted["labels"] == {"alertname": "MoELatencyHigh"}
    assert sim.body["status"]["stableRevision"] == stable
    sim.converge()
    assert sim.rotating() == {stable: 4}
    sim.tick(rollout.ABORT_SCALE_DOWN_DELAY_SECONDS + 1)
    sim.converge()
    assert sim.names_of(new) == set() and sim.state["aborted"]
    # Repeats of the alert, and resolved alerts, change nothing.
    sim.annotate(ANNOTATION_ABORT, abort_annotation(new, sim.now))
    sim.tick(100)
    sim.converge()
    assert sim.names_of(new) == set() and sim.rotating() == {stable: 4}
    # Retry rolls it out again (the old abort request is older than the retry).
    sim.tick(1)
    sim.annotate(ANNOTATION_RETRY, iso(sim.now))
    sim.converge()
    assert "aborted" not in sim.state and sim.rotating() == {stable: 3, new: 1}
    assert sim.state["retriedAt"]


def test_abort_for_another_revision_is_ignored():
    sim, stable = started(spec())
    new = sim.new_revision()
    sim.annotate(ANNOTATION_ABORT, abort_annotation(stable, sim.now + 1))
    sim.tick(2)
    sim.converge()
    assert "aborted" not in sim.state and sim.rotating() == {stable: 3, new: 1}


def test_old_abort_request_does_not_abort_a_later_rollout_of_the_same_revision():
    sim, stable = started(spec())
    new = sim.new_revision()
    sim.converge()
    sim.annotate(ANNOTATION_ABORT, abort_annotation(new, sim.now))
    sim.converge()
    assert sim.state["aborted"]
    sim.tick(30)
    sim.new_revision("bfloat16")          # back to the stable spec: the rollout is over
    sim.converge()
    assert sim.rotating() == {stable: 4} and not sim.state.get("aborted")
    sim.tick(30)
    assert sim.new_revision() == new      # the same revision again: a new rollout, not aborted
    sim.converge()
    assert sim.rotating() == {stable: 3, new: 1} and not sim.state.get("aborted")


def test_failed_analysis_aborts_with_the_figures():
    sim, stable = started(spec())
    sim.new_revision()
    sim.converge()
    sim.verdict = Verdict(FAIL, "p99 latency 812ms > 500ms", {"p99LatencyMs": 812})
    sim.reconcile()
    assert sim.rotating() == {stable: 3}
    assert sim.state["aborted"]["reason"] == "AnalysisFailed"
    assert sim.state["aborted"]["figures"] == {"p99LatencyMs": 812}
    sim.verdict = Verdict(PASS)
    sim.converge()
    assert sim.state["aborted"] and sim.rotating() == {stable: 4}


def test_inconclusive_analysis_pauses_or_aborts_as_configured():
    sim, stable = started(spec(steps=[{"setWeight": 25}, {"setWeight": 50}]))
    new = sim.new_revision()
    sim.verdict = Verdict(INCONCLUSIVE, "3 samples < 20")
    sim.converge()
    assert sim.state["paused"]["reason"] == "AnalysisInconclusive"
    assert sim.state["stepIndex"] == 0
    sim.verdict = Verdict(PENDING)
    sim.converge()
    assert sim.state["stepIndex"] == 0, "stays paused until resumed"
    sim.annotate(ANNOTATION_RESUME, "r1")
    sim.verdict = Verdict(PASS)
    sim.converge()
    assert sim.body["status"]["stableRevision"] == new

    sim, stable = started(spec(), options=Options(on_inconclusive="Abort"))
    new = sim.new_revision()
    sim.verdict = Verdict(INCONCLUSIVE, "no data")
    sim.converge()
    assert sim.state["aborted"]["reason"] == "AnalysisInconclusive" and sim.rotating() == {stable: 4}


def test_manual_pause_holds_the_step_and_resume_continues():
    sim, stable = started(spec(steps=[{"setWeight": 25}, {"setWeight": 50}]))
    sim.annotate(ANNOTATION_PAUSED, "true")
    new = sim.new_revision()
    sim.converge()
    assert sim.state["stepIndex"] == 0 and sim.rotating() == {stable: 3, new: 1}
    del sim.body["metadata"]["annotations"][ANNOTATION_PAUSED]
    sim.converge()
    assert sim.body["status"]["stableRevision"] == new


def test_progress_deadline_pauses_or_aborts():
    sim, stable = started(spec(progressDeadlineSeconds=60))
    new = sim.new_revision()
    never_ready = lambda name: new not in name  # noqa: E731
    sim.converge(ready=never_ready)
    sim.tick(61)
    sim.converge(ready=never_ready)
    assert sim.state["paused"]["reason"] == "ProgressDeadlineExceeded"
    assert sim.rotating() == {stable: 4}

    sim, stable = started(spec(progressDeadlineSeconds=60), options=Options(progress_deadline_abort=True))
    new = sim.new_revision()
    sim.converge(ready=never_ready)
    sim.tick(61)
    sim.converge(ready=never_ready)
    assert sim.state["aborted"]["reason"] == "ProgressDeadlineExceeded"
    sim.tick(rollout.ABORT_SCALE_DOWN_DELAY_SECONDS + 1)
    sim.converge(ready=never_ready)
    assert sim.names_of(new) == set()


def test_spec_change_mid_rollout_replaces_the_canary():
    sim, stable = started(spec())
    first = sim.new_revision("float16")
    sim.converge()
    second = sim.new_revision("float32")
    sim.reconcile()
    assert sim.rotating() == {stable: 3}          # the first canary leaves rotation at once
    assert sim.state["revision"] == second and sim.state["stepIndex"] == 0
    sim.converge()
    assert sim.names_of(first) == set() and sim.rotating() == {stable: 3, second: 1}


def test_killed_before_the_status_write_resumes_without_a_duplicate_step():
    """SIGKILL between the pod writes and the status write: the next reconcile reads the old status
    and the new pods, and lands on the same step (each decision is a function of both)."""
    sim, stable = started(spec(steps=[{"setWeight": 25}, {"pause": {"duration": "10s"}}, {"setWeight": 50},
                                      {"pause": {}}]))
    new = sim.new_revision()
    for _ in range(6):
        sim.kubelet()
        sim.reconcile(write_status=False)      # every status write lost
        sim.reconcile()
    assert sim.state["stepIndex"] == 1 and sim.rotating() == {stable: 3, new: 1}
    sim.tick(11)
    sim.kubelet()
    sim.reconcile(write_status=False)
    sim.converge()
    assert sim.state["stepIndex"] == 3 and sim.rotating() == {stable: 2, new: 2}


def test_idempotent_reconcile_writes_nothing_more_as_the_clock_runs():
    """Converged at a step, a pause without a duration, a user's pause and a finished rollout: later
    reconciles (resyncs, seconds and minutes later) write nothing, neither pods nor status."""
    sim, stable = started(spec(steps=[{"setWeight": 25}, {"pause": {}}]))
    sim.new_revision()
    sim.converge()
    assert sim.state["stepIndex"] == 1, "waiting at the pause for promote"

    def quiet(after):
        for seconds in (0.5, 10, 60, 600):
            pods, status = copy.deepcopy(sim.pods), copy.deepcopy(sim.body["status"])
            sim.tick(seconds)
            sim.reconcile()
            assert (sim.pods, sim.body["status"]) == (pods, status), f"{after}: wrote {seconds}s later"

    quiet("at a pause")
    sim.annotate(ANNOTATION_PAUSED, "true")
    sim.converge()
    quiet("paused by hand")
    sim.body["metadata"]["annotations"].pop(ANNOTATION_PAUSED)
    sim.annotate(ANNOTATION_PROMOTE_FULL, "go")
    sim.converge()
    sim.tick(rollout.CANARY_SCALE_DOWN_DELAY_SECONDS + 1)
    sim.converge()
    assert sim.body["status"]["stableRevision"] != stable
    quiet("promoted")


def test_requeue_after_names_the_next_timed_decision():
    sim, stable = started(spec())
    sim.new_revision()
    sim.converge()
    plan = sim.plans[-1]
    pause_ends = epoch(sim.state["stepStartedAt"]) + 30
    assert rollout.requeue_after(sim.md, plan, sim.now) == pytest.approx(pause_ends - sim.now, abs=0.01)


# --- blue-green ----------------------------------------------------------------------------------

def bg(replicas=3, surge=3, preview=1, auto=20, delay=30):
    blue_green = {"previewReplicas": preview, "scaleDownDelaySeconds": delay}
    if auto is not None:
        blue_green["autoPromotionSeconds"] = auto
    return spec(replicas=replicas, surge=surge, strategy="BlueGreen", blueGreen=blue_green)


def test_blue_green_preview_then_full_then_one_switch_then_old_warm():
    sim, stable = started(bg())
    new = sim.new_revision()
    sim.verdict = Verdict(PASS)
    sim.converge()
    assert len(sim.names_of(new)) == 1 and sim.tracks(new) == {"preview"}
    assert sim.rotating() == {stable: 3}, "the preview is never in rotation"
    assert sim.plans[-1].service_tracks == ("stable", "preview")
    sim.tick(21)
    sim.reconcile()
    assert len(sim.names_of(new)) == 3 and sim.rotating() == {stable: 3}
    sim.kubelet()
    plan = sim.reconcile()
    # The switch: one plan moves every in-rotation label.
    assert sim.rotating() == {new: 3} and sim.body["status"]["stableRevision"] == new
    rotating_first = [g.in_rotation for g in plan.groups]
    assert rotating_first == sorted(rotating_first, reverse=True), "new labels are written before old ones go"
    assert len(sim.names_of(stable)) == 3, "old revision warm"
    sim.tick(31)
    sim.converge()
    assert sim.names_of(stable) == set()


def test_blue_green_waits_for_passing_analysis_and_promotes_by_hand():
    sim, stable = started(bg(auto=5))
    new = sim.new_revision()
    sim.verdict = Verdict(PENDING)
    sim.converge()
    sim.tick(60)
    sim.converge()
    assert len(sim.names_of(new)) == 1, "no auto-promotion without passing analysis"
    sim.annotate(ANNOTATION_PROMOTE, "p1")
    sim.converge()
    assert sim.rotating() == {new: 3}

    sim, stable = started(bg(auto=None))
    new = sim.new_revision()
    sim.verdict = Verdict(PASS)
    sim.tick(1000)
    sim.converge()
    assert sim.rotating() == {stable: 3}, "no autoPromotionSeconds: by hand only"


def test_blue_green_abort_after_switch_is_instant_while_old_is_warm():
    sim, stable = started(bg())
    new = sim.new_revision()
    sim.reconcile()
    sim.annotate(ANNOTATION_PROMOTE, "p1")      # a promote from before the rollout would be ignored
    sim.converge()
    assert sim.rotating() == {new: 3}
    sim.tick(2)
    sim.annotate(ANNOTATION_ABORT, abort_annotation(new, sim.now))
    sim.reconcile()
    assert sim.rotating() == {stable: 3}, "switched back in one reconcile"
    assert sim.body["status"]["stableRevision"] == stable and sim.state["aborted"]["reason"] == "AlertFiring"
    sim.tick(rollout.ABORT_SCALE_DOWN_DELAY_SECONDS + 1)
    sim.converge()
    assert sim.names_of(new) == set()


def test_blue_green_abort_before_switch_removes_the_preview():
    sim, stable = started(bg())
    new = sim.new_revision()
    sim.converge()
    sim.annotate(ANNOTATION_ABORT, abort_annotation(new, sim.now))
    sim.converge()
    assert sim.names_of(new) and sim.state["aborted"]
    sim.tick(rollout.ABORT_SCALE_DOWN_DELAY_SECONDS + 1)
    sim.converge()
    assert sim.names_of(new) == set() and sim.rotating() == {stable: 3} and sim.state["aborted"]


def test_blue_green_within_a_small_budget_keeps_one_stable_group_serving():
    sim, stable = started(bg(replicas=3, surge=1, preview=1))
    new = sim.new_revision()
    sim.reconcile()
    sim.annotate(ANNOTATION_PROMOTE, "p1")
    for _ in range(40):
        sim.kubelet()
        sim.reconcile()
        sim.tick(1)
        assert sim.rotating(), "something always serves"
    assert sim.body["status"]["stableRevision"] == new and sim.rotating() == {new: 3}
    assert sim.max_gpus_seen <= 4


# --- the GPU budget over random histories --------------------------------------------------------

@pytest.mark.parametrize("seed", range(24))
def test_gpu_budget_is_never_exceeded_in_random_histories(seed):
    rng = random.Random(seed)
    strategy = rng.choice(["Canary", "BlueGreen"])
    replicas = rng.randint(1, 5)
    gpus = rng.randint(1, 2)
    surge = rng.choice([0, gpus, 2 * gpus, rng.randint(0, 5)])
    pods_per_replica = rng.choice([1, 1, 2])
    s = spec(replicas=replicas, surge=surge, gpus=gpus, strategy=strategy,
             steps=[{"setWeight": 20}, {"pause": {"duration": "5s"}}, {"setWeight": 60}, {"pause": {}}])
    if strategy == "BlueGreen":
        s["rollout"]["blueGreen"] = {"previewReplicas": rng.randint(0, replicas), "autoPromotionSeconds": 3,
                                     "scaleDownDelaySeconds": 4}
    s["topology"] = {"podsPerReplica": pods_per_replica}
    sim = Sim(s)
    sim.converge()
    dtypes = ["float16", "float32", "bfloat16"]
    aborted_revisions = set()
    for _ in range(100):
        r = rng.random()
        if r < 0.04:
            sim.new_revision(rng.choice(dtypes))
        elif r < 0.07:
            sim.annotate(ANNOTATION_PROMOTE, str(rng.random()))
        elif r < 0.09:
            rev = revision_of(sim.md)
            sim.annotate(ANNOTATION_ABORT, abort_annotation(rev, sim.now))
            aborted_revisions.add(rev)
        elif r < 0.10:
            sim.annotate(ANNOTATION_RETRY, str(rng.random()))
        elif r < 0.12:
            new_replicas = rng.randint(1, 5)
            sim.scaled_down |= new_replicas < sim.body["spec"]["replicas"]
            sim.body["spec"]["replicas"] = new_replicas
        sim.verdict = Verdict(rng.choice([PASS, PASS, PASS, PENDING, INCONCLUSIVE]))
        sim.tick(rng.choice([0.1, 1, 2, 5]))
        sim.kubelet(ready=lambda name: rng.random() < 0.6)
        plan = sim.reconcile(write_status=rng.random() > 0.1, terminate_for=rng.randint(1, 3))
        if sim.state.get("aborted") and plan.revision == sim.state.get("revision") and \
                sim.body["status"].get("stableRevision") != plan.revision:
            assert not rollout.new_revision_in_rotation(plan)
    # Liveness: with every pod ready and the budget able to hold the tracks, it settles.
    sim.verdict = Verdict(PASS)
    sim.annotate(ANNOTATION_PROMOTE_FULL, "final")
    sim.annotate(ANNOTATION_PROMOTE, "final")
    sim.body["metadata"]["annotations"].pop(ANNOTATION_ABORT, None)
    for _ in range(20):
        sim.tick(5)
        sim.kubelet()
        sim.reconcile()
    md = sim.md
    assert gpus_in_use(md, sim.observe()) <= gpu_budget(md)
    serving = sim.rotating()
    assert sum(serving.values()) >= 1


def test_status_rollout_is_plain_json():
    sim, stable = started(spec())
    sim.new_revision()
    sim.converge()
    sim.annotate(ANNOTATION_ABORT, abort_annotation(revision_of(sim.md), sim.now + 1))
    sim.tick(2)
    sim.converge()
    assert json.loads(json.dumps(sim.body["status"])) == sim.body["status"]


def test_the_typed_rollout_state_writes_the_same_json_it_reads():
    from moe_operator.world.state import RolloutState
    data = {"revision": "b", "fromRevision": "a", "strategy": "Canary", "stepIndex": 2, "blockedOnGPUs": False,
            "aborted": {"reason": "AlertFiring", "labels": {"x": "y"}}, "handled": {"abort": "id-1"},
            "outOfRotationAt": "2026-12-05T10:00:00.000Z", "restoring": {"readyGroups": 1, "replicas": 2}}
    state = RolloutState.from_json({**data, "templates": {"old": {}}})      # a key this version dropped
    assert state.blocked_on_gpus is False and state.out_of_rotation_at == data["outOfRotationAt"]
    assert state.to_json() == data and RolloutState.from_json(state.to_json()) == state
    assert not RolloutState() and RolloutState().to_json() == {}
