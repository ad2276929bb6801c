"""`kubectl moe`: the patches each action writes and the status view (pure parts)."""

import pytest
from moe_operator import names
from moe_operator.kubectl_plugin import annotation_patch, parser, render_status, undo_patch
from moe_operator.rollout import (
    ANNOTATION_ABORT,
    ANNOTATION_PAUSED,
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RESUME,
    ANNOTATION_RETRY,
    AbortRequest,
    iso,
)

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


def test_one_off_actions_are_timestamped_annotations():
    assert annotation_patch("promote", body(), NOW) == {ANNOTATION_PROMOTE: iso(NOW)}
    assert annotation_patch("promote", body(), NOW, full=True) == {ANNOTATION_PROMOTE_FULL: iso(NOW)}
    assert annotation_patch("retry", body(), NOW) == {ANNOTATION_RETRY: iso(NOW)}
    assert annotation_patch("pause", body(), NOW) == {ANNOTATION_PAUSED: "true"}
    assert annotation_patch("resume", body(), NOW) == {ANNOTATION_PAUSED: None, ANNOTATION_RESUME: iso(NOW)}
    request = AbortRequest.from_json(annotation_patch("abort", body(), NOW)[ANNOTATION_ABORT])
    assert (request.revision, request.reason, request.source, request.at) == ("rev-b", "AbortedByUser", "user", NOW)


def test_undo_goes_back_to_stable_during_a_rollout_and_to_the_previous_one_after():
    templates = {"rev-a": {"model": {"source": "builtin:tiny-deepseek-v3", "dtype": "bfloat16"}, "resources": {"gpus": 1}}}
    patch = undo_patch(body(templates=templates))
    assert patch["spec"]["model"]["dtype"] == "bfloat16" and patch["spec"]["runtime"] is None
    promoted = body(templates=templates, previousRevision="rev-a")
    promoted["status"]["stableRevision"] = "rev-b"
    assert undo_patch(promoted)["spec"]["resources"] == {"gpus": 1}
    with pytest.raises(SystemExit, match="not kept"):
        undo_patch(body())


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
    assert "p99 212ms, ttft p99 40ms, errors 0.0%, 128 requests" in text and "[3 pass / 0 fail]" in text
    assert "started     42s ago" in text
    assert text.count("chat-rev-") == 3 and "canary" in text
    aborted = render_status(body(aborted={"reason": "AlertFiring", "message": "MoELatencyHigh", "source": "alert",
                                          "at": iso(NOW - 3)}), [], NOW)
    assert "ABORTED     AlertFiring: MoELatencyHigh (alert, 3s ago)" in aborted


def test_command_line():
    args = parser().parse_args(["status", "chat", "-n", "ns", "--watch"])
    assert (args.command, args.name, args.namespace, args.watch) == ("status", "chat", "ns", True)
    assert parser().parse_args(["promote", "chat", "--full"]).full
