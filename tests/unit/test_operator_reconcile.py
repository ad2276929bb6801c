"""The whole reconcile against an in-memory cluster: create, ready, scale, replace, recover, and quiet
when converged (reconciling again writes nothing)."""

import copy

import pytest
from fake_cluster import FakeCluster
from moe_operator.api import names

pytestmark = pytest.mark.unit


SPEC = {"replicas": 2, "model": {"source": "builtin:tiny-deepseek-v3"}, "resources": {"gpus": 1}}


def test_create_ready_available_then_quiet():
    c = FakeCluster(copy.deepcopy(SPEC))
    out = c.reconcile()
    assert sorted(out.changes.apply[i]["kind"] for i in range(len(out.changes.apply))) == \
        ["ControllerRevision", "Pod", "Pod", "Service", "Service"]
    assert out.changes.apply[0]["kind"] == "ControllerRevision"      # recorded before its first pod
    assert out.changes.created_pods == 2
    assert c.conditions()["Available"] == ("False", "ModelLoading")
    # Not ready yet: pods stay out of rotation.
    c.reconcile()
    assert all(c.labels(n)[names.LABEL_IN_ROTATION] == "false" for n in c.pods())
    c.converge()
    assert all(c.labels(n)[names.LABEL_IN_ROTATION] == "true" for n in c.pods())
    status = c.md["status"]
    assert status["readyReplicas"] == 2 and status["replicas"] == 2 and status["updatedReplicas"] == 2
    assert status["stableRevision"] == status["currentRevision"]
    assert status["observedGeneration"] == 1
    assert c.conditions() == {"Available": ("True", "AllReplicasReady"), "Progressing": ("False", "Converged"),
                              "Degraded": ("False", "Healthy")}
    assert status["phase"] == "Available"
    assert ("Normal", "Available", "2/2 replica groups ready") in c.events
    # Converged means quiet: reconciling again writes nothing at all.
    before = copy.deepcopy(c.objects), copy.deepcopy(c.md)
    for _ in range(3):
        out = c.reconcile()
        assert not out.wrote and c.writes == []
    assert (c.objects, c.md) == before


def test_scale_up_and_down_removes_unready_groups_first():
    c = FakeCluster(copy.deepcopy(SPEC))
    c.converge()
    c.set_spec(replicas=4)
    c.reconcile()
    assert len(c.pods()) == 4
    newest = sorted(c.pods())[-1]
    c.set_ready(only=lambda n: n != newest)
    c.set_ready(only=lambda n: n == newest, ready=False)
    c.reconcile()
    c.set_spec(replicas=2)
    c.reconcile()
    assert newest not in c.pods()                       # the unready group went first
    assert c.md["status"]["observedGeneration"] == 3
    c.converge()
    assert len(c.pods()) == 2 and c.md["status"]["readyReplicas"] == 2


def test_scale_down_drains_before_deleting():
    c = FakeCluster(copy.deepcopy(SPEC))
    c.converge()
    c.set_spec(replicas=1)
    c.reconcile()
    # First the group leaves rotation, still running...
    assert len(c.pods()) == 2
    out_of_rotation = [n for n in c.pods() if c.labels(n)[names.LABEL_IN_ROTATION] == "false"]
    assert len(out_of_rotation) == 1
    assert c.conditions()["Progressing"] == ("True", "ScalingDown")
    # ...stays for the drain period (spec.runtime.drainSeconds, 5 s by default)...
    c.time += 4.5
    c.reconcile()
    assert len(c.pods()) == 2
    # ...then it is deleted.
    c.time += 0.5
    out = c.reconcile()
    assert list(c.pods()) == [n for n in c.pods() if n not in out_of_rotation]
    assert out.requeue_after is None or out.requeue_after > 0
    c.converge()
    assert c.conditions()["Available"] == ("True", "AllReplicasReady")


def test_multi_pod_group_is_ready_only_when_every_pod_is():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 1, "topology": {"podsPerReplica": 3}})
    c.reconcile()
    assert sorted(c.labels(n)[names.LABEL_RANK] for n in c.pods()) == ["0", "1", "2"]
    c.set_ready(only=lambda n: not n.endswith("-2"))
    c.set_ready(only=lambda n: n.endswith("-2"), ready=False)
    c.reconcile()
    assert all(c.labels(n)[names.LABEL_IN_ROTATION] == "false" for n in c.pods())
    assert c.md["status"]["readyReplicas"] == 0
    c.converge()
    assert all(c.labels(n)[names.LABEL_IN_ROTATION] == "true" for n in c.pods())
    assert c.md["status"]["readyReplicas"] == 1


def test_lost_pod_takes_its_group_out_of_rotation_and_the_group_is_re_created_whole():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 1, "topology": {"podsPerReplica": 2}})
    c.converge()
    survivor, lost = sorted(c.pods())
    del c.objects[("Pod", lost)]
    c.reconcile()
    assert c.labels(survivor)[names.LABEL_IN_ROTATION] == "false"
    assert lost not in c.pods()                           # never patched back into the broken group
    c.converge()
    assert survivor not in c.pods() and lost not in c.pods()
    assert len(c.pods()) == 2 and {c.labels(n)[names.LABEL_REPLICA] for n in c.pods()} == {"1"}
    assert all(c.labels(n)[names.LABEL_IN_ROTATION] == "true" for n in c.pods())


def test_terminating_pod_gets_a_replacement_with_a_new_name():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 1})
    c.converge()
    (name,) = c.pods()
    c.objects[("Pod", name)]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    c.reconcile()
    assert f"{name}-1" in c.pods()
    assert ("delete", ("Pod", name)) not in c.writes        # already being deleted


def test_failed_pod_is_replaced():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 1})
    c.converge()
    (name,) = c.pods()
    c.objects[("Pod", name)]["status"] = {"phase": "Failed", "reason": "Evicted", "message": "node pressure"}
    c.reconcile()
    assert ("delete", ("Pod", name)) in c.writes
    assert len(c.pods()) == 1 and name not in c.pods()


def test_new_revision_replaces_groups_one_at_a_time():
    """No canary steps: the new revision grows within the surge budget (one group's GPUs by default),
    stable groups leave as new ones become ready, and the last old group stays warm a moment."""
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 3})
    c.converge()
    old_rev = c.md["status"]["currentRevision"]
    c.set_spec(model={"source": "builtin:tiny-mixtral"})
    seen_max = 0
    for _ in range(30):
        out = c.advance()
        revs = [c.labels(n)[names.LABEL_REVISION] for n in c.pods()]
        seen_max = max(seen_max, len(revs))
        # Never more than one new group loading at a time, never above replicas + 1 group.
        assert len(revs) <= 4
        if not out.wrote:
            break
        c.set_ready()
    c.time += 11                              # past the old revision's scale-down delay
    c.converge()
    new_rev = c.md["status"]["currentRevision"]
    assert new_rev != old_rev
    assert {c.labels(n)[names.LABEL_REVISION] for n in c.pods()} == {new_rev}
    assert {c.labels(n)[names.LABEL_TRACK] for n in c.pods()} == {"stable"}
    assert c.md["status"]["stableRevision"] == new_rev
    assert ("Service", "chat-canary") not in c.objects
    assert any(e[1] == "RolloutStarted" for e in c.events)
    assert any(e[1] == "RolloutComplete" for e in c.events)
    assert seen_max == 4


def test_rollout_without_surge_budget_removes_first():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 2, "rollout": {"maxSurgeGPUs": 0}})
    c.converge()
    c.set_spec(model={"source": "builtin:tiny-mixtral"})
    for _ in range(30):
        out = c.advance()
        assert len(c.pods()) <= 2                 # one GPU per pod: never above the steady state
        if not out.wrote:
            break
        c.set_ready()
    assert c.md["status"]["stableRevision"] == c.md["status"]["currentRevision"]


def test_stuck_rollout_keeps_old_groups_serving():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 2})
    c.converge()
    old_rev = c.md["status"]["currentRevision"]
    c.set_spec(runtime={"image": "broken:1"})
    c.reconcile()
    new = [n for n in c.pods() if c.labels(n)[names.LABEL_REVISION] != old_rev]
    assert len(new) == 1
    c.objects[("Pod", new[0])]["status"] = {"phase": "Pending", "containerStatuses": [
        {"name": "runtime", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}
    c.reconcile()
    assert c.conditions()["Degraded"] == ("True", "PodsFailing")
    assert c.conditions()["Available"] == ("True", "AllReplicasReady")
    assert c.conditions()["Progressing"] == ("True", "RollingOut")
    assert ("Service", "chat-canary") in c.objects
    in_rotation = [n for n in c.pods() if c.labels(n)[names.LABEL_IN_ROTATION] == "true"]
    assert len(in_rotation) == 2 and all(c.labels(n)[names.LABEL_REVISION] == old_rev for n in in_rotation)
    assert ("Warning", "PodsFailing", c.md["status"]["message"]) in c.events
    assert "ImagePullBackOff: not found" in c.md["status"]["message"]
    # Reverting the spec goes straight back: the broken group is removed.
    c.set_spec(runtime={})
    c.converge()
    assert {c.labels(n)[names.LABEL_REVISION] for n in c.pods()} == {old_rev}
    assert c.conditions()["Degraded"] == ("False", "Healthy")


def test_insufficient_gpu_capacity():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 1, "resources": {"gpus": 16}})
    c.reconcile()
    (name,) = c.pods()
    c.objects[("Pod", name)]["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}
    c.reconcile()
    assert c.conditions()["Degraded"] == ("True", "InsufficientGPUCapacity")
    assert c.conditions()["Available"] == ("False", "InsufficientGPUCapacity")
    assert "Insufficient nvidia.com/gpu" in c.md["status"]["message"]


def test_invalid_spec_changes_nothing_and_says_why():
    c = FakeCluster(copy.deepcopy(SPEC))
    c.converge()
    pods = copy.deepcopy(c.pods())
    c.set_spec(model={"source": "s3://bucket/model"})
    c.reconcile()
    assert c.pods() == pods
    assert c.conditions()["Degraded"] == ("True", "InvalidSpec")
    assert c.conditions()["Available"] == ("True", "AllReplicasReady")
    assert "spec.model.source" in c.md["status"]["message"]
    assert c.md["status"]["observedGeneration"] == 2
    assert not c.reconcile().wrote


def test_services_follow_the_plan():
    c = FakeCluster(copy.deepcopy(SPEC))
    c.converge()
    assert {n for k, n in c.objects if k == "Service"} == {"chat", "chat-stable"}
    # A user's edit of a managed Service field is put back.
    c.objects[("Service", "chat")]["spec"]["selector"] = {"foo": "bar"}
    out = c.reconcile()
    assert [b["metadata"]["name"] for b in out.changes.apply] == ["chat"]


def test_existing_pods_are_relabelled_never_reapplied():
    from moe_operator.api.spec import ModelDeployment
    from moe_operator.desired.diff import changes, desired_objects
    from moe_operator.desired.pods import revision_of
    from moe_operator.rollout.machine import next_step

    c = FakeCluster(copy.deepcopy(SPEC))
    c.converge()
    c.set_spec(model={"source": "builtin:tiny-mixtral"})     # a new revision; old pods keep their spec
    md = ModelDeployment.from_body(c.md)
    observed = c.observe("ns", "chat", 1)
    plan = next_step(md, observed, revision_of(md), c.time)
    todo = changes(desired_objects(md, plan, observed), observed)
    assert todo.created_pods == 1
    assert all(b["metadata"]["name"] not in c.pods() for b in todo.applies if b["kind"] == "Pod")
    for name, labels in todo.relabels:
        assert name in c.pods() and labels[names.LABEL_TRACK] == "stable"


def test_objects_the_api_refuses_are_reported_not_retried_blindly():
    from moe_operator.apply import WriteRefused

    c = FakeCluster(copy.deepcopy(SPEC))

    def refuse(namespace, changes):
        raise WriteRefused("InvalidSpec", 'Pod chat-x was refused: spec.containers[0].env[5].valueFrom: Invalid')

    c.write = refuse
    out = c.reconcile()
    assert not out.changes          # a refused write is not counted (nor logged) as applied
    assert c.conditions()["Degraded"] == ("True", "InvalidSpec")
    assert "env[5].valueFrom" in c.md["status"]["message"]
    assert any(e[:2] == ("Warning", "InvalidSpec") for e in c.events)
    assert out.requeue_after is None, "an invalid object waits for a spec change"


def test_a_forbidden_write_is_tried_again_soon():
    """Forbidden can clear by itself: a quota freed, RBAC fixed, or an API server whose RESTMapper has
    not seen a fresh CRD yet (OwnerReferencesPermissionEnforcement refuses ownerReferences to it)."""
    from moe_operator.apply import WriteRefused

    c = FakeCluster(copy.deepcopy(SPEC))

    def refuse(namespace, changes):
        raise WriteRefused("Forbidden", "Pod chat-x was refused: cannot set blockOwnerDeletion (cannot find "
                                        "RESTMapping for APIVersion serving.moe.dev/v1alpha1 ModelDeployment)")

    writer, c.write = c.write, refuse
    out = c.reconcile()
    assert c.conditions()["Degraded"] == ("True", "Forbidden") and out.requeue_after == 5.0
    c.write = writer
    c.converge()
    assert c.conditions()["Degraded"] == ("False", "Healthy")


def test_a_status_computed_from_an_old_version_is_not_written():
    """Two writers (a partitioned leader beside its successor, or a pass that read the object before
    an alert's abort annotation landed): the status patch carries the resourceVersion it was computed
    from, so the stale pass writes nothing, posts no Event, and runs again on the newer object."""
    from moe_operator.reconcile import CONFLICT_RETRY_SECONDS, reconcile

    c = FakeCluster(copy.deepcopy(SPEC))
    c.reconcile()
    stale = copy.deepcopy(c.md)           # read while the pods were loading
    c.set_ready()
    c.md["spec"]["replicas"] = 3          # a user's edit, written after the stale pass read the object
    c.md["metadata"]["generation"] += 1
    c._bump()
    status, events = copy.deepcopy(c.md["status"]), list(c.events)
    c.writes.clear()
    out = reconcile(stale, c, c, lambda *e: c.events.append(e), c.baselines,
                    now=lambda: "t-stale", clock=lambda: c.time)
    assert not out.status_patch and out.requeue_after == CONFLICT_RETRY_SECONDS
    assert c.md["status"] == status and c.events == events
    assert not any(w[0] == "status" for w in c.writes)
    c.converge()                          # on the current object: written, and the third group is there
    assert c.md["status"]["observedGeneration"] == 2 and c.md["status"]["readyReplicas"] == 3


def test_the_autoscalers_scale_write_moves_the_version_the_status_is_written_on():
    c = FakeCluster(copy.deepcopy(SPEC))
    version = c.md["metadata"]["resourceVersion"]
    assert c.scale("ns", "chat", 3) != version
    out = c.reconcile()                   # a pass that scaled would patch the status on the new version
    assert out.status_patch and c.md["status"]["observedGeneration"] == 2


def test_a_status_is_still_written_when_only_metadata_moved_on():
    """kopf's bookkeeping annotations (or an abort annotation) land between the read and the status
    write: same spec generation, same status, so the status computed (say, the autoscaler's decision
    just carried out) is written onto the new version rather than lost."""
    from moe_operator.reconcile import reconcile

    c = FakeCluster(copy.deepcopy(SPEC))
    c.reconcile()
    read = copy.deepcopy(c.md)
    c.set_ready()
    c.md["metadata"].setdefault("annotations", {})["kopf.example/last-handled"] = "{}"
    c._bump()                             # a metadata-only write after the pass read the object
    c.writes.clear()
    out = reconcile(read, c, c, lambda *e: c.events.append(e), c.baselines, now=lambda: "t-late", clock=lambda: c.time)
    assert out.status_patch and out.requeue_after is None
    assert any(w[0] == "status" for w in c.writes)
    assert c.md["status"]["readyReplicas"] == 2
