"""status_of / status_patch / events_for: what users read in `kubectl get md` and `kubectl describe`."""

import pytest
from moe_operator.api.spec import ModelDeployment, SpecError
from moe_operator.desired.pods import revision_of
from moe_operator.rollout import machine as rollout
from moe_operator.status import condition, events_for, invalid_status, status_of, status_patch
from moe_operator.world.observe import observed_from

pytestmark = pytest.mark.unit


def md_of(status=None, replicas=1, gpus=8):
    return ModelDeployment.from_body({
        "metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 5},
        "spec": {"replicas": replicas, "model": {"source": "builtin:tiny-mixtral"}, "resources": {"gpus": gpus}},
        "status": status or {}})


def pod(md, name="p", ready=False, **status):
    return {"metadata": {"name": name, "uid": name, "labels": {
        "serving.moe.dev/revision": revision_of(md), "serving.moe.dev/replica": "0",
        "serving.moe.dev/rank": "0", "serving.moe.dev/track": "stable", "serving.moe.dev/in-rotation": "false"}},
        "status": {"phase": "Running" if ready else "Pending",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}], **status}}


def status_for(md, *pods):
    observed = observed_from(pods, [], md.pods_per_replica)
    return status_of(md, observed, rollout.next_step(md, observed, revision_of(md), 0.0), "NOW")


def conds(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_condition_keeps_transition_time_while_status_holds():
    old = [{"type": "Available", "status": "True", "reason": "A", "lastTransitionTime": "T0"}]
    assert condition(old, "Available", True, "B", "m", 1, "T1")["lastTransitionTime"] == "T0"
    assert condition(old, "Available", False, "B", "m", 1, "T1")["lastTransitionTime"] == "T1"
    assert condition([], "Available", True, "B", "m", 1, "T1")["observedGeneration"] == 1


def test_crash_loop_is_pods_failing():
    md = md_of()
    s = status_for(md, pod(md, containerStatuses=[{"name": "runtime", "restartCount": 4, "state": {
        "waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}}}]))
    assert conds(s)["Degraded"] == ("True", "PodsFailing")
    assert conds(s)["Available"] == ("False", "PodsFailing")
    assert "CrashLoopBackOff" in s["message"] and s["phase"] == "Degraded"


def test_run_container_error_without_message_reports_the_exit():
    md = md_of()
    s = status_for(md, pod(md, containerStatuses=[{"name": "runtime", "state": {
        "waiting": {"reason": "RunContainerError"}}, "lastState": {"terminated": {"exitCode": 127}}}]))
    assert conds(s)["Degraded"] == ("True", "PodsFailing")
    assert "exit code 127" in s["message"]


def test_unschedulable_other_than_gpus():
    md = md_of()
    s = status_for(md, pod(md, conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                            "message": "0/2 nodes match the node selector"}]))
    assert conds(s)["Degraded"] == ("True", "Unschedulable")


def test_loading_is_model_loading():
    md = md_of()
    s = status_for(md, pod(md))
    assert conds(s)["Available"] == ("False", "ModelLoading")
    assert conds(s)["Progressing"] == ("True", "ModelLoading")
    assert conds(s)["Degraded"] == ("False", "Healthy")
    assert "1 pod starting or loading the model" in s["conditions"][0]["message"]


def test_scaled_to_zero_is_available():
    s = status_for(md_of(replicas=0))
    assert conds(s)["Available"] == ("True", "ScaledToZero")
    assert s["replicas"] == 0


def test_patch_is_empty_when_nothing_changed_and_removes_dropped_keys():
    md = md_of()
    s = status_for(md, pod(md, ready=True))
    assert status_patch(s, s) == {}
    assert status_patch({**s, "canaryWeight": 20}, s) == {"canaryWeight": None}
    # Without spec.autoscaling the autoscaler's status goes.
    assert status_patch({**s, "autoscaling": {"x": 1}}, s) == {"autoscaling": None}
    # Same observation later: the same status (transition times kept) and so no patch.
    again = status_for(md_of(status=s), pod(md, ready=True))
    assert status_patch(s, {**again}) == {}


def test_invalid_status_keeps_available_and_counts():
    old = status_for(md_of(), pod(md_of(), ready=True))
    s = invalid_status(old, 6, "InvalidSpec", str(SpecError("spec.model.source", "bad scheme")), "LATER")
    assert conds(s)["Available"] == conds(old)["Available"]
    assert conds(s)["Degraded"] == ("True", "InvalidSpec")
    assert s["observedGeneration"] == 6 and s["readyReplicas"] == old["readyReplicas"]
    assert s["message"] == "spec.model.source: bad scheme"


def test_events_on_transitions_only():
    md = md_of()
    loading = status_for(md, pod(md))
    ready = status_for(md_of(status=loading), pod(md, ready=True))
    assert events_for(loading, ready) == [("Normal", "Available", "1/1 replica groups ready")]
    assert events_for(ready, ready) == []
    failing = status_for(md_of(status=ready), pod(md, containerStatuses=[
        {"name": "runtime", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]))
    assert [e[:2] for e in events_for(ready, failing)] == [("Warning", "PodsFailing")]
    assert [e[:2] for e in events_for(failing, ready)] == [("Normal", "Available"), ("Normal", "Recovered")]


def test_a_crash_is_reported_before_the_back_off():
    md = md_of()
    s = status_for(md, pod(md, containerStatuses=[{"name": "runtime", "ready": False, "restartCount": 1,
                                                   "state": {"running": {}},
                                                   "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}}}]))
    assert conds(s)["Degraded"] == ("True", "PodsFailing")
    assert "exited with code 2 (Error), restarted 1x" in s["message"]
    healthy_after_restart = pod(md, ready=True, containerStatuses=[
        {"name": "runtime", "ready": True, "restartCount": 1, "lastState": {"terminated": {"exitCode": 137}}}])
    assert conds(status_for(md, healthy_after_restart))["Degraded"] == ("False", "Healthy")
