"""The autoscaler inside the whole reconcile, against an in-memory cluster: it samples when due, writes
the count through the scale door (writer.scale), plans with it in the same pass, reports
status.autoscaling and ScalingLimited, schedules its next sample, and writes nothing between samples
when nothing changed."""

import copy

import pytest
from fake_cluster import FakeCluster
from moe_operator.autoscaling import decision as autoscaling
from moe_operator.autoscaling.decision import Signal

pytestmark = pytest.mark.unit


class Cluster(FakeCluster):
    """With an autoscaling signal the test sets, and pods the scheduler cannot place."""

    def __init__(self, spec):
        super().__init__(spec)
        self.signal = Signal("requestsWaiting", value=0.0, groups=1, running=0.0, waiting=0.0)
        self.unschedulable = set()

    def collect_signal(self, settings, namespace, name, observed, memory):
        return self.signal, {}

    def kubelet(self):
        self.set_ready(only=lambda name: name not in self.unschedulable)
        for name, pod in self.pods().items():
            if name in self.unschedulable:
                pod["status"] = {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}

    def sample(self, waiting):
        """The next sample (an interval later) sees `waiting` requests queued on the one busy group."""
        self.signal = Signal("requestsWaiting", value=waiting, groups=1, running=1.0, waiting=waiting,
                             saturated_slots=1.0)
        self.time += 5
        return self.reconcile()

    def settle(self, rounds=6):
        for _ in range(rounds):
            self.kubelet()
            self.reconcile()


SPEC = {"replicas": 1, "model": {"source": "builtin:tiny-mixtral"}, "resources": {"gpus": 1},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "target": 1, "interval": "5s",
                        "scaleDownStabilization": "30s"}}


def conditions(cluster):
    return {c["type"]: c for c in cluster.md["status"].get("conditions") or ()}


def test_scale_up_goes_through_the_scale_door_and_is_planned_in_the_same_pass():
    c = Cluster(copy.deepcopy(SPEC))
    c.settle()
    assert c.scales == [] and c.md["status"]["autoscaling"]["reason"] == autoscaling.WITHIN_TOLERANCE
    out = c.sample(waiting=5.0)
    assert c.scales == [3] and c.md["spec"]["replicas"] == 3
    assert len(c.pods()) == 3                                     # the new groups' pods in the same pass
    assert out.scaling.reason == autoscaling.SCALE_UP and out.requeue_after == pytest.approx(5.0)
    state = c.md["status"]["autoscaling"]
    assert state["desiredReplicas"] == 3 and state["lastDecision"]["from"] == 1 and state["currentValue"] == 5
    assert any(e[1] == "SuccessfulRescale" for e in c.events)
    assert conditions(c)["ScalingLimited"]["status"] == "False"
    # More than maxReplicas' worth: at the bound, and ScalingLimited says so.
    c.sample(waiting=20.0)
    assert c.md["spec"]["replicas"] == 4 and conditions(c)["ScalingLimited"]["reason"] == "TooManyReplicas"


def test_no_sample_and_no_write_between_samples():
    c = Cluster(copy.deepcopy(SPEC))
    c.settle()
    c.time += 1
    out = c.reconcile()
    assert out.scaling is None and c.writes == [] and out.requeue_after == pytest.approx(4.0)


def test_gpu_shortage_sets_scaling_limited():
    c = Cluster(copy.deepcopy(SPEC))
    c.settle()
    c.sample(waiting=3.0)
    assert c.md["spec"]["replicas"] == 2
    c.unschedulable = {name for name in c.pods() if "-1-" in name}
    c.kubelet()
    c.sample(waiting=9.0)
    limited = conditions(c)["ScalingLimited"]
    assert (limited["status"], limited["reason"]) == ("True", "InsufficientGPUCapacity")
    assert c.md["spec"]["replicas"] == 2 and c.scales == [2]
    assert c.md["status"]["autoscaling"]["reason"] == "InsufficientGPUCapacity"


def test_turning_autoscaling_off_removes_its_status():
    c = Cluster(copy.deepcopy(SPEC))
    c.settle()
    assert "autoscaling" in c.md["status"] and "ScalingLimited" in conditions(c)
    del c.md["spec"]["autoscaling"]
    c.reconcile()
    assert "autoscaling" not in c.md["status"] and "ScalingLimited" not in conditions(c)


def test_kubectl_moe_status_shows_the_autoscaler():
    from moe_operator.app.kubectl_plugin import render_status

    c = Cluster(copy.deepcopy(SPEC))
    c.settle()
    c.sample(waiting=5.0)
    text = render_status(c.md, list(c.pods().values()), c.time + 30)
    assert "autoscaling requestsWaiting 5.0 (target 1.0), wants 3 in [1, 4]: ScaleUp" in text
    assert "last scaled 1 -> 3 30s ago (ScaleUp)" in text
