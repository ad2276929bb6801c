"""The autoscaler inside the whole reconcile, against an in-memory cluster: it samples when due, writes
the count through the scale door (writer.scale), plans with it in the same pass, reports
status.autoscaling and ScalingLimited, schedules its next sample, and writes nothing between samples
when nothing changed."""

import copy
import itertools

import pytest
from moe_operator import autoscaling, names
from moe_operator.autoscaling import Signal
from moe_operator.observe import observed_from
from moe_operator.reconcile import reconcile

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0


def merge(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class Cluster:
    def __init__(self, spec):
        self.md = {"apiVersion": names.API_VERSION, "kind": names.KIND,
                   "metadata": {"name": "chat", "namespace": "ns", "uid": "md-uid", "generation": 1},
                   "spec": spec, "status": {}}
        self.pods, self.services, self.events, self.scales, self.writes = {}, {}, [], [], []
        self.time = T0
        self.clock = itertools.count()
        self.signal = Signal("requestsWaiting", value=0.0, groups=1, running=0.0, waiting=0.0)
        self.unschedulable = set()

    def observe(self, namespace, name, pods_per_replica):
        return observed_from([copy.deepcopy(p) for p in self.pods.values()],
                             [copy.deepcopy(s) for s in self.services.values()], pods_per_replica)

    def write(self, namespace, changes):
        self.writes.append("objects")
        for body in changes.applies:
            if body["kind"] == "Pod":
                new = copy.deepcopy(body)
                new["metadata"].update(uid=body["metadata"]["name"], creationTimestamp="2027-01-15T08:00:00Z")
                new["status"] = {"phase": "Pending"}
                self.pods.setdefault(body["metadata"]["name"], new)
            else:
                self.services[body["metadata"]["name"]] = copy.deepcopy(body)
        for name, labels in changes.relabels:
            self.pods[name]["metadata"]["labels"].update(labels)
        for kind, name, _ in changes.delete:
            if kind == "Pod":
                self.pods.pop(name, None)

    def patch_status(self, namespace, name, patch):
        self.writes.append("status")
        self.md["status"] = merge(self.md["status"], patch)
        return self.md

    def scale(self, namespace, name, replicas):
        self.scales.append(replicas)
        self.md["spec"]["replicas"] = replicas
        self.md["metadata"]["generation"] += 1

    def kubelet(self):
        for name, pod in self.pods.items():
            if name in self.unschedulable:
                pod["status"] = {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}
            else:
                pod["status"] = {"phase": "Running", "podIP": "127.100.0.9", "conditions": [
                    {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}

    def collect(self, settings, namespace, name, observed, memory):
        return self.signal, {}

    def reconcile(self):
        self.writes.clear()
        return reconcile(copy.deepcopy(self.md), self, self, lambda *e: self.events.append(e),
                         now=lambda: f"t{next(self.clock)}", clock=lambda: self.time, collect_signal=self.collect)

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
    c.signal = Signal("requestsWaiting", value=5.0, groups=1, running=1.0, waiting=5.0, saturated_slots=1.0)
    c.time += 5
    out = c.reconcile()
    assert c.scales == [3] and c.md["spec"]["replicas"] == 3
    assert len(c.pods) == 3                                     # the new groups' pods in the same pass
    assert out.scaling.reason == autoscaling.SCALE_UP and out.requeue_after == pytest.approx(5.0)
    state = c.md["status"]["autoscaling"]
    assert state["desiredReplicas"] == 3 and state["lastDecision"]["from"] == 1 and state["currentValue"] == 5
    assert any(e[1] == "SuccessfulRescale" for e in c.events)
    assert conditions(c)["ScalingLimited"]["status"] == "False"
    # More than maxReplicas' worth: at the bound, and ScalingLimited says so.
    c.signal = Signal("requestsWaiting", value=20.0, groups=1, running=1.0, waiting=20.0, saturated_slots=1.0)
    c.time += 5
    c.reconcile()
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
    c.signal = Signal("requestsWaiting", value=3.0, groups=1, running=1.0, waiting=3.0, saturated_slots=1.0)
    c.time += 5
    c.reconcile()
    assert c.md["spec"]["replicas"] == 2
    c.unschedulable = {name for name in c.pods if "-1-" in name}
    c.kubelet()
    c.signal = Signal("requestsWaiting", value=9.0, groups=1, running=1.0, waiting=9.0, saturated_slots=1.0)
    c.time += 5
    c.reconcile()
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
    from moe_operator.kubectl_plugin import render_status

    c = Cluster(copy.deepcopy(SPEC))
    c.settle()
    c.signal = Signal("requestsWaiting", value=5.0, groups=1, running=1.0, waiting=5.0, saturated_slots=1.0)
    c.time += 5
    c.reconcile()
    text = render_status(c.md, list(c.pods.values()), c.time + 30)
    assert "autoscaling requestsWaiting 5.0 (target 1.0), wants 3 in [1, 4]: ScaleUp" in text
    assert "last scaled 1 -> 3 30s ago (ScaleUp)" in text
