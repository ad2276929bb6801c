"""Every pod runs its own revision's template: recorded ControllerRevisions, pods rebuilt from them
after an abort, a lost pod, a scale-up or an operator restart, stale pods replaced, history kept and
pruned. Against the in-memory cluster; the assertion is on what each pod would run (its --model)."""

import copy
import json

import pytest
from fake_cluster import FakeCluster
from moe_operator.api import names
from moe_operator.api.spec import ModelDeployment
from moe_operator.desired import records
from moe_operator.desired.pods import PodSlot, desired_pod, revision_of, template_fingerprint
from moe_operator.rollout.progressive import rollback_word
from moe_operator.rollout.requests import ANNOTATION_ABORT, AbortRequest
from moe_operator.world import revisions

pytestmark = pytest.mark.unit

A, B, C = "builtin:tiny-deepseek-v3", "builtin:tiny-qwen3-moe", "builtin:tiny-mixtral"
SPEC = {"replicas": 2, "model": {"source": A}, "resources": {"gpus": 1},
        "rollout": {"maxSurgeGPUs": 1, "canary": {"steps": [{"setWeight": 50}, {"pause": {}}]}}}


def model_of(pod):
    args = pod["spec"]["containers"][0]["args"]
    return args[args.index("--model") + 1]


def runs(c):
    """{pod name: (revision label, the model it runs)} for every live pod."""
    return {n: (p["metadata"]["labels"][names.LABEL_REVISION], model_of(p)) for n, p in c.pods().items()
            if not p["metadata"].get("deletionTimestamp")}


def wrong(c):
    """Pods whose spec is not what their revision's recorded template builds (the target: none)."""
    md = ModelDeployment.from_body(c.md)
    records = {b["metadata"]["labels"][names.LABEL_REVISION]: b for (k, _), b in c.objects.items()
               if k == revisions.KIND}
    out = []
    for name, pod in c.pods().items():
        rev = pod["metadata"]["labels"][names.LABEL_REVISION]
        view = md.with_template(records[rev]["data"]["spec"])
        assert revision_of(view) == rev, "a record's template hashes to its revision"
        labels = pod["metadata"]["labels"]
        slot = PodSlot(rev, int(labels[names.LABEL_REPLICA]), int(labels[names.LABEL_RANK]),
                       labels[names.LABEL_TRACK], False, name)
        if template_fingerprint(pod) != template_fingerprint(desired_pod(view, slot)):
            out.append(name)
    return out


def abort(c, revision):
    c.md["metadata"].setdefault("annotations", {})[ANNOTATION_ABORT] = AbortRequest(
        revision, "AbortedByUser", "kubectl moe abort", None, "user").to_json()


def at_the_pause():
    c = FakeCluster(copy.deepcopy(SPEC))
    c.converge()
    rev_a = c.md["status"]["currentRevision"]
    c.set_spec(model={"source": B})
    c.converge()
    rev_b = c.md["status"]["currentRevision"]
    assert sorted(runs(c).values()) == [(rev_a, A), (rev_b, B)], "one canary group, one stable group"
    return c, rev_a, rev_b


def test_each_revision_is_recorded_once_before_its_pods_with_its_template():
    c, rev_a, rev_b = at_the_pause()
    records = {b["metadata"]["name"]: b for (k, _), b in c.objects.items() if k == revisions.KIND}
    assert set(records) == {f"chat-{rev_a}", f"chat-{rev_b}"}
    a, b = records[f"chat-{rev_a}"], records[f"chat-{rev_b}"]
    assert (a["revision"], b["revision"]) == (1, 2)
    assert a["data"]["spec"]["model"] == {"source": A} and b["data"]["spec"]["model"] == {"source": B}
    assert b["metadata"]["annotations"][revisions.ANNOTATION_CHANGE] == f"model.source: {A} -> {B}"
    assert b["metadata"]["ownerReferences"][0]["uid"] == "md-uid"
    assert json.loads(a["metadata"]["annotations"][revisions.ANNOTATION_RESULT])["result"] == "promoted"


def test_after_an_abort_the_recreated_stable_group_runs_the_stable_template():
    """The issue's scenario: abort at the pause, then lose the other stable pod by hand."""
    c, rev_a, rev_b = at_the_pause()
    abort(c, rev_b)
    c.converge()
    c.time += 11                                       # the aborted canary's pods go
    c.converge()
    assert sorted(runs(c).values()) == [(rev_a, A), (rev_a, A)]
    assert c.md["status"]["stableRevision"] == rev_a and wrong(c) == []
    # A stable pod deleted by hand comes back running A, not the aborted spec (which is still the spec).
    lost = next(iter(c.pods()))
    del c.objects[("Pod", lost)]
    c.converge()
    assert sorted(runs(c).values()) == [(rev_a, A), (rev_a, A)] and wrong(c) == []
    record = next(b for (k, _), b in c.objects.items() if k == revisions.KIND and b["revision"] == 2)
    result = json.loads(record["metadata"]["annotations"][revisions.ANNOTATION_RESULT])
    assert (result["result"], result["reason"]) == ("aborted", "AbortedByUser")


def test_a_stable_pod_lost_during_the_canary_and_a_scale_up_get_the_stable_template():
    c, rev_a, rev_b = at_the_pause()
    stable_pod = next(n for n, (rev, _) in runs(c).items() if rev == rev_a)
    del c.objects[("Pod", stable_pod)]
    c.converge()
    assert sorted(runs(c).values()) == [(rev_a, A), (rev_b, B)] and wrong(c) == []
    c.set_spec(replicas=4)                             # 50%: two canary groups, two stable ones
    for _ in range(10):
        c.converge()
        c.time += 5
    assert sorted(runs(c).values()) == [(rev_a, A)] * 2 + [(rev_b, B)] * 2 and wrong(c) == []


def test_an_operator_restarted_after_recording_builds_pods_from_the_record():
    c = FakeCluster(copy.deepcopy(SPEC))
    c.converge()
    rev_a = c.md["status"]["currentRevision"]
    c.set_spec(model={"source": B})
    c.reconcile()                                      # records B, creates its first pod
    rev_b = revision_of(ModelDeployment.from_body(c.md))
    record = c.objects[(revisions.KIND, f"chat-{rev_b}")]
    # The pods of B are lost before they ran (an operator restart mid-way), and the record's
    # template is what counts from now on.
    for name in [n for n, (rev, _) in runs(c).items() if rev == rev_b]:
        del c.objects[("Pod", name)]
    c.converge()
    assert {model_of(c.objects[("Pod", n)]) for n, (rev, _) in runs(c).items() if rev == rev_b} == {B}
    assert c.objects[(revisions.KIND, f"chat-{rev_b}")] == record, "recorded once, never rewritten"
    assert rev_a != rev_b and wrong(c) == []


def test_a_pod_built_from_the_wrong_template_is_replaced_without_losing_the_last_ready_group():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 2})
    c.converge()
    rev_a = c.md["status"]["currentRevision"]
    # What an older operator did: a pod labelled A that runs another model.
    victim = sorted(c.pods())[0]
    args = c.objects[("Pod", victim)]["spec"]["containers"][0]["args"]
    args[args.index("--model") + 1] = B
    assert wrong(c) == [victim]
    for _ in range(12):
        c.reconcile()
        c.set_ready()
        serving = [n for n, p in c.pods().items() if p["metadata"]["labels"][names.LABEL_IN_ROTATION] == "true"]
        assert serving, "never without a ready group in rotation"
        c.time += 3
    assert sorted(runs(c).values()) == [(rev_a, A), (rev_a, A)] and wrong(c) == []
    assert victim not in c.pods()


def test_a_topology_change_is_a_rollout_and_the_serving_groups_stay_whole():
    c = FakeCluster({**copy.deepcopy(SPEC), "rollout": {"maxSurgeGPUs": 2}})
    c.converge()
    rev_a = c.md["status"]["currentRevision"]
    c.set_spec(topology={"podsPerReplica": 2})
    c.reconcile()
    # Nothing of A went: its two one-pod groups stay whole and in rotation.
    a_pods = [n for n, (rev, _) in runs(c).items() if rev == rev_a]
    assert len(a_pods) == 2 and all(c.labels(n)[names.LABEL_IN_ROTATION] == "true" for n in a_pods)
    c.md["metadata"].setdefault("annotations", {})["serving.moe.dev/promote-full"] = "go"
    for _ in range(20):
        c.converge()
        c.time += 5
    rev_b = c.md["status"]["currentRevision"]
    assert c.md["status"]["stableRevision"] == rev_b != rev_a
    assert sorted(c.labels(n)[names.LABEL_RANK] for n in c.pods()) == ["0", "0", "1", "1"]
    assert wrong(c) == []


def test_history_is_pruned_to_the_limit_and_a_revision_that_comes_back_gets_the_next_number():
    c = FakeCluster({**copy.deepcopy(SPEC), "replicas": 1, "revisionHistoryLimit": 2,
                     "rollout": {"maxSurgeGPUs": 1}})
    c.converge()
    for model in ({"source": A, "dtype": "float16"}, {"source": A, "dtype": "float32"}, {"source": C}):
        c.set_spec(model=model)
        for _ in range(6):
            c.converge()
            c.time += 11
    records = sorted((b["revision"], b["data"]["spec"]["model"].get("dtype"))
                     for (k, _), b in c.objects.items() if k == revisions.KIND)
    # The spec's revision and the newest two others (the first one was pruned).
    assert records == [(2, "float16"), (3, "float32"), (4, None)]
    c.set_spec(model={"source": A, "dtype": "float16"})   # back to revision 2's template (an undo)
    for _ in range(6):
        c.converge()
        c.time += 11
    numbers = {b["data"]["spec"]["model"].get("dtype"): b["revision"]
               for (k, _), b in c.objects.items() if k == revisions.KIND}
    assert numbers == {"float16": 5, "float32": 3, None: 4}
    assert [model for _, model in runs(c).values()] == [A] and wrong(c) == []


def test_change_summary_names_each_changed_field():
    before = {"model": {"source": A}, "resources": {"gpus": 1}}
    after = {"model": {"source": B}, "resources": {"gpus": 2}, "runtime": {"args": ["--max-num-seqs", "8"]}}
    assert records.change_summary(None, after) == "created"
    assert records.change_summary(before, after) == (
        f'model.source: {A} -> {B}; resources.gpus: 1 -> 2; runtime.args: (unset) -> ["--max-num-seqs","8"]')


def blue_green(**rollout):
    return {"replicas": 2, "model": {"source": A}, "resources": {"gpus": 1},
            "rollout": {"strategy": "BlueGreen", "blueGreen": {"previewReplicas": 1, "scaleDownDelaySeconds": 30},
                        **rollout}}


def promoted_blue_green(spec):
    c = FakeCluster(spec)
    c.converge()
    rev_a = c.md["status"]["currentRevision"]
    c.set_spec(model={"source": B})
    c.converge()
    c.md["metadata"].setdefault("annotations", {})["serving.moe.dev/promote"] = "go"
    for _ in range(10):
        c.converge()
        c.time += 1
        if c.md["status"]["stableRevision"] != rev_a:
            break
    rev_b = c.md["status"]["currentRevision"]
    assert c.md["status"]["stableRevision"] == rev_b
    return c, rev_a, rev_b


def in_rotation(c):
    return sorted(runs(c)[n] for n, p in c.pods().items()
                  if p["metadata"]["labels"][names.LABEL_IN_ROTATION] == "true")


def test_blue_green_keeps_the_whole_old_revision_until_the_delay_and_switches_back_at_once():
    c, rev_a, rev_b = promoted_blue_green(blue_green())
    assert in_rotation(c) == [(rev_b, B)] * 2
    assert sorted(runs(c).values()).count((rev_a, A)) == 2, "the old revision stays whole, warm"
    c.time += 20                                        # inside scaleDownDelaySeconds
    abort(c, rev_b)
    out = c.reconcile()
    assert in_rotation(c) == [(rev_a, A)] * 2, "instant: back in the same reconcile"
    assert rollback_word(out.plan).startswith("instant")
    assert c.conditions()["Degraded"] == ("True", "RolloutAborted")


def test_a_rollback_that_cannot_be_instant_says_so_and_restores_the_old_revision():
    c, rev_a, rev_b = promoted_blue_green(blue_green(maxSurgeGPUs=1))
    assert sorted(runs(c).values()).count((rev_a, A)) < 2, "the small budget let part of A go"
    abort(c, rev_b)
    out = c.reconcile()
    assert rollback_word(out.plan).startswith("not instant"), "the /alerts reply says so"
    assert c.conditions()["Degraded"] == ("True", "RollingBack")
    assert "not instant" in c.md["status"]["message"]
    assert ("Warning", "RollingBack") in {(e[0], e[1]) for e in c.events} or \
        any(e[1] == "RollingBack" for e in c.events)
    assert in_rotation(c), "something serves all along"
    for _ in range(10):
        c.converge()
        c.time += 6
        assert in_rotation(c)
    assert in_rotation(c) == [(rev_a, A)] * 2 and wrong(c) == []
    assert c.conditions()["Degraded"] == ("True", "RolloutAborted")
