"""docs/argocd-health.lua (Argo CD's health check for ModelDeployment) run with a Lua runtime from PyPI
against status objects shaped as the operator writes them (reasons imported from the operator, so a
renamed reason fails here). tests/cluster/test_helm.py runs it on real objects too."""

import copy
import json
from pathlib import Path

import pytest
from lupa import LuaRuntime
from moe_operator.api import reasons

pytestmark = pytest.mark.unit

SCRIPT = (Path(__file__).resolve().parents[2] / "docs" / "argocd-health.lua").read_text()


def health(obj: dict) -> tuple[str, str]:
    """Argo CD runs the script with the live object as the global `obj`."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    run = lua.execute(f"return function(obj)\n{SCRIPT}\nend")
    result = run(lua.table_from(json.loads(json.dumps(obj)), recursive=True))
    return result["status"], result["message"]


def cond(ctype, ok, reason, message=""):
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-22T06:00:00Z", "observedGeneration": 1}


STEPS = [{"setWeight": 34}, {"pause": {"duration": "15s"}}, {"setWeight": 67}, {"pause": {}}]


def md(conditions=None, generation=1, observed=1, rollout=None, annotations=None, spec_rollout=None, message="m"):
    body = {"apiVersion": "serving.moe.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": "ns", "generation": generation, "annotations": annotations or {}},
            "spec": {"replicas": 3, "model": {"source": "builtin:tiny-deepseek-v3"},
                     "rollout": spec_rollout or {"strategy": "Canary", "canary": {"steps": copy.deepcopy(STEPS)}}}}
    if conditions is not None:
        body["status"] = {"observedGeneration": observed, "replicas": 3, "readyReplicas": 3, "message": message,
                          "currentRevision": "bbb", "stableRevision": "aaa", "conditions": conditions}
        if rollout is not None:
            body["status"]["rollout"] = rollout
    return body


SETTLED = [cond("Available", True, reasons.ALL_REPLICAS_READY, "3/3 replica groups ready"),
           cond("Progressing", False, reasons.CONVERGED), cond("Degraded", False, reasons.HEALTHY)]


def rolling(reason=reasons.ROLLING_OUT, message="canary bbb: step 1/4, weight 34% (achieved 33%)"):
    return [cond("Available", True, reasons.ALL_REPLICAS_READY), cond("Progressing", True, reason, message),
            cond("Degraded", False, reasons.HEALTHY)]


def rollout_state(step_index, **extra):
    return {"revision": "bbb", "fromRevision": "aaa", "strategy": "Canary", "stepIndex": step_index,
            "startedAt": "2026-11-22T06:00:00.000Z", "weight": 34, "achievedWeight": 33, **extra}


def test_new_and_unobserved_objects_are_progressing():
    assert health(md()) == ("Progressing", "Waiting for the operator to report status")
    assert health(md(SETTLED, generation=2, observed=1))[0] == "Progressing"


def test_settled_and_scaled_to_zero_are_healthy():
    assert health(md(SETTLED, message="3/3 replica groups ready")) == ("Healthy", "3/3 replica groups ready")
    zero = [cond("Available", True, reasons.SCALED_TO_ZERO, "0/0 replica groups ready"),
            cond("Progressing", False, reasons.CONVERGED), cond("Degraded", False, reasons.HEALTHY)]
    assert health(md(zero))[0] == "Healthy"


def test_loading_and_scaling_are_progressing():
    loading = [cond("Available", False, reasons.MODEL_LOADING, "0/3 replica groups ready; 3 pods starting"),
               cond("Progressing", True, reasons.MODEL_LOADING, "0/3 replica groups ready"),
               cond("Degraded", False, reasons.HEALTHY)]
    assert health(md(loading)) == ("Progressing", "0/3 replica groups ready")
    scaling = [cond("Available", True, reasons.ALL_REPLICAS_READY),
               cond("Progressing", True, reasons.SCALING_UP, "2 replica groups, scaling up to 3"),
               cond("Degraded", False, reasons.HEALTHY)]
    assert health(md(scaling))[0] == "Progressing"


@pytest.mark.parametrize("reason", [reasons.INSUFFICIENT_GPU, reasons.PODS_FAILING, reasons.INVALID_SPEC, "Forbidden"])
def test_what_needs_a_person_is_degraded_with_the_operators_message(reason):
    conditions = [cond("Available", False, reason), cond("Progressing", False, reason),
                  cond("Degraded", True, reason, f"{reason}: what to do")]
    assert health(md(conditions)) == ("Degraded", f"{reason}: what to do")


def test_an_aborted_rollout_is_degraded_though_the_stable_revision_serves():
    message = "revision bbb aborted, aaa serves: AlertFiring: MoECanaryLatencyHigh"
    conditions = [cond("Available", True, reasons.ALL_REPLICAS_READY),
                  cond("Progressing", False, reasons.ROLLOUT_ABORTED, message),
                  cond("Degraded", True, reasons.ROLLOUT_ABORTED, message)]
    aborted = rollout_state(1, aborted={"reason": "AlertFiring", "message": "MoECanaryLatencyHigh", "source": "alert"})
    assert health(md(conditions, rollout=aborted)) == ("Degraded", message)


def test_a_canary_between_steps_is_progressing():
    assert health(md(rolling(), rollout=rollout_state(0)))[0] == "Progressing"
    assert health(md(rolling(), rollout=rollout_state(1)))[0] == "Progressing"    # a timed pause runs out


def test_a_canary_at_a_pause_without_duration_is_suspended():
    state, message = health(md(rolling(), rollout=rollout_state(3)))
    assert state == "Suspended" and "pause step 4" in message and "kubectl moe promote" in message


def test_pauses_of_the_operator_and_of_users_are_suspended():
    paused = rollout_state(0, paused={"reason": "AnalysisInconclusive", "message": "no samples", "at": "t"})
    assert health(md(rolling(reasons.ROLLOUT_PAUSED, "AnalysisInconclusive: no samples"), rollout=paused)) == (
        "Suspended", "AnalysisInconclusive: no samples")
    by_hand = md(rolling(), rollout=rollout_state(0), annotations={"serving.moe.dev/paused": "true"})
    assert health(by_hand)[0] == "Suspended"
    in_spec = md(rolling(), rollout=rollout_state(0),
                 spec_rollout={"strategy": "Canary", "paused": True, "canary": {"steps": STEPS}})
    assert health(in_spec)[0] == "Suspended"
    # a pause annotation without a rollout running changes nothing
    assert health(md(SETTLED, annotations={"serving.moe.dev/paused": "true"}))[0] == "Healthy"


def test_blue_green_preview_is_progressing():
    spec = {"strategy": "BlueGreen", "blueGreen": {"previewReplicas": 1, "autoPromotionSeconds": 60}}
    state = {"revision": "bbb", "fromRevision": "aaa", "strategy": "BlueGreen", "stepIndex": 0}
    assert health(md(rolling(message="blue-green bbb: preview"), rollout=state, spec_rollout=spec))[0] == "Progressing"
