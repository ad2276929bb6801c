"""`kubectl moe`: the patches each action writes and the status view (pure parts)."""

import json

import pytest
from moe_operator.api import names
from moe_operator.api.timestamps import iso
from moe_operator.app import kubectl_plugin
from moe_operator.app.kubectl_plugin import (
    annotation_patch,
    gitops_manager,
    parser,
    render_history,
    render_status,
    undo_patch,
)
from moe_operator.rollout.requests import (
    ANNOTATION_ABORT,
    ANNOTATION_PAUSED,
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RESUME,
    ANNOTATION_RETRY,
    AbortRequest,
)
from moe_operator.world import revisions

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0


def body(**state):
    return {"metadata": {"name": "chat", "namespace": "ns", "annotations": {}},
            "spec": {"replicas": 4, "model": {"source": "builtin:tiny-deepseek-v3", "dtype": "float16"},
                     "rollout": {"strategy": "Canary", "canary": {"steps": [
                         {"setWeight": 25}, {"pause": {"duration": "30s"}}, {"setWeight": 50}, {"pause": {}}]}}},
            "status": {"currentRevision": "rev-b", "stableRevision": "rev-a", "phase": "Progressing",
                       "readyReplicas": 4, "canaryWeight": 25,
                       "conditions": [{"type": "Available", "status": "True", "reason": "AllReplicasReady"}],
                       "rollout": {"revision": "rev-b", "stepIndex": 1, "weight": 25, "startedAt": iso(NOW - 42),
                                   **state}}}


def test_one_off_actions_are_unique_annotations():
    promote = annotation_patch("promote", body(), NOW)[ANNOTATION_PROMOTE]
    assert promote.startswith(iso(NOW)) and promote != annotation_patch("promote", body(), NOW)[ANNOTATION_PROMOTE]
    assert set(annotation_patch("promote", body(), NOW, full=True)) == {ANNOTATION_PROMOTE_FULL}
    assert set(annotation_patch("retry", body(), NOW)) == {ANNOTATION_RETRY}
    assert annotation_patch("pause", body(), NOW) == {ANNOTATION_PAUSED: "true"}
    resume = annotation_patch("resume", body(), NOW)
    assert resume[ANNOTATION_PAUSED] is None and resume[ANNOTATION_RESUME].startswith(iso(NOW))
    request = AbortRequest.from_json(annotation_patch("abort", body(), NOW)[ANNOTATION_ABORT])
    assert (request.revision, request.reason, request.source, request.at) == ("rev-b", "AbortedByUser", "user", NOW)
    again = AbortRequest.from_json(annotation_patch("abort", body(), NOW)[ANNOTATION_ABORT])
    assert request.id and again.id != request.id, "every abort is its own request, whatever the clock"


def record(number, rev, source, result=None, change="created"):
    annotations = {revisions.ANNOTATION_CHANGE: change}
    if result:
        annotations[revisions.ANNOTATION_RESULT] = json.dumps(result)
    return {"metadata": {"name": f"chat-{rev}", "labels": {names.LABEL_REVISION: rev}, "annotations": annotations,
                         "creationTimestamp": "2026-12-05T10:00:00Z"},
            "data": {"spec": {"model": {"source": source, "dtype": "bfloat16"}, "resources": {"gpus": 1}}},
            "revision": number}


RECORDS = [record(1, "rev-0", "builtin:tiny-mixtral", {"result": "promoted"}),
           record(2, "rev-a", "builtin:tiny-deepseek-v3", {"result": "promoted"},
                  "model.source: builtin:tiny-mixtral -> builtin:tiny-deepseek-v3"),
           record(3, "rev-b", "builtin:tiny-qwen3-moe", {"result": "aborted", "reason": "AlertFiring",
                                                         "message": "p99 over 500ms"},
                  "model.source: builtin:tiny-deepseek-v3 -> builtin:tiny-qwen3-moe")]


def test_undo_goes_back_to_stable_during_a_rollout_to_the_previous_one_after_or_to_a_number():
    patch = undo_patch(body(), RECORDS)             # rev-b rolling out, rev-a stable
    assert patch["spec"]["model"] == {"source": "builtin:tiny-deepseek-v3", "dtype": "bfloat16"}
    assert patch["spec"]["runtime"] is None         # a field the old template did not set is removed
    promoted = body()
    promoted["status"]["stableRevision"] = "rev-b"
    assert undo_patch(promoted, RECORDS)["spec"]["model"]["source"] == "builtin:tiny-deepseek-v3"
    assert undo_patch(body(), RECORDS, to_revision=1)["spec"]["model"]["source"] == "builtin:tiny-mixtral"
    with pytest.raises(SystemExit, match="revision 7 is not kept"):
        undo_patch(body(), RECORDS, to_revision=7)
    with pytest.raises(SystemExit, match="already the current one"):
        undo_patch(body(), RECORDS, to_revision=3)
    with pytest.raises(SystemExit, match="nothing to undo"):
        undo_patch(body(), [])


def test_gitops_managers_are_recognised_by_their_marks():
    flux = body()
    flux["metadata"]["labels"] = {"kustomize.toolkit.fluxcd.io/name": "apps",
                                  "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}
    assert gitops_manager(flux) == "Flux Kustomization flux-system/apps"
    argo = body()
    argo["metadata"]["annotations"] = {"argocd.argoproj.io/tracking-id": "team-a:serving.moe.dev/ModelDeployment:ns/chat"}
    assert gitops_manager(argo) == "Argo CD Application team-a"
    by_fields = body()
    by_fields["metadata"]["managedFields"] = [
        {"manager": "moe-operator-autoscaler", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
        {"manager": "argocd-controller", "operation": "Apply", "fieldsV1": {"f:spec": {"f:model": {}}}}]
    assert gitops_manager(by_fields) == "Argo CD (field manager argocd-controller)"
    assert gitops_manager(body()) is None


class FakeCluster:
    default_namespace = "ns"

    def __init__(self, obj):
        self.obj, self.patches = obj, []

    def get(self, ns, name):
        return self.obj

    def records(self, ns, name):
        return RECORDS

    def patch(self, ns, name, patch):
        self.patches.append(patch)


@pytest.mark.parametrize("managed", [True, False])
def test_undo_of_a_flux_managed_object_says_revert_the_commit_and_writes_only_with_force(monkeypatch, capsys,
                                                                                          managed):
    obj = body()
    if managed:
        obj["metadata"]["labels"] = {"kustomize.toolkit.fluxcd.io/name": "apps",
                                     "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}
    fake = FakeCluster(obj)
    monkeypatch.setattr(kubectl_plugin, "Cluster", lambda *_: fake)
    code = kubectl_plugin.main(["undo", "chat"])
    err = capsys.readouterr().err
    if managed:
        assert code == 1 and not fake.patches
        assert "managed by Flux Kustomization flux-system/apps" in err and "Revert the commit in Git" in err
        assert kubectl_plugin.main(["undo", "chat", "--force"]) == 0
        assert "warning" in capsys.readouterr().err
    else:
        assert code == 0 and not err
    assert fake.patches[0]["spec"]["model"]["source"] == "builtin:tiny-deepseek-v3"


def test_history_lists_number_hash_change_and_result():
    text = render_history(body(), RECORDS).splitlines()
    assert text[0].split() == ["REVISION", "HASH", "CREATED", "RESULT", "CHANGE"]
    assert text[1].split()[:2] == ["1", "rev-0"]
    assert "promoted [stable]" in text[2] and "builtin:tiny-mixtral -> builtin:tiny-deepseek-v3" in text[2]
    assert "aborted (AlertFiring: p99 over 500ms) [current]" in text[3]


def test_status_view_shows_step_weights_analysis_and_pods():
    analysis = {"provider": "scrape", "passes": 3, "failures": 0, "measurements": [
        {"result": "pass", "message": "within the SLO",
         "figures": {"p99LatencyMs": 212.0, "ttftP99Ms": 40.0, "errorRate": 0.0, "samples": 128}}]}
    pods = [{"metadata": {"name": f"chat-rev-{r}-{i}-0", "labels": {
        names.LABEL_TRACK: "canary" if r == "b" else "stable", names.LABEL_REVISION: f"rev-{r}",
        names.LABEL_REPLICA: str(i), names.LABEL_RANK: "0", names.LABEL_IN_ROTATION: "true"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}} for r, i in (("a", 0), ("a", 1), ("b", 0))]
    text = render_status(body(analysis=analysis), pods, NOW)
    assert "step        2/4 pause 30s   weight 25% (achieved 25%)" in text
    assert "p99 212ms, ttft p99 40ms, errors 0.0%, 128 requests" in text and "[0 failed / 0 inconclusive]" in text
    assert "started     42s ago" in text
    assert text.count("chat-rev-") == 3 and "canary" in text
    aborted = render_status(body(aborted={"reason": "AlertFiring", "message": "MoELatencyHigh", "source": "alert",
                                          "at": iso(NOW - 3)}), [], NOW)
    assert "ABORTED     AlertFiring: MoELatencyHigh (alert, 3s ago)" in aborted


def test_command_line():
    args = parser().parse_args(["status", "chat", "-n", "ns", "--watch"])
    assert (args.command, args.name, args.namespace, args.watch) == ("status", "chat", "ns", True)
    assert parser().parse_args(["promote", "chat", "--full"]).full
