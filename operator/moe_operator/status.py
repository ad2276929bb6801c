"""Status from observation (pure): counts, revisions, and the conditions Available / Progressing /
Degraded with reasons a user can act on. `status_patch` is empty when nothing changed, so a converged
ModelDeployment is never written; `events_for` names the transitions worth an Event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .api.reasons import (
    ALL_REPLICAS_READY,
    CONVERGED,
    GROUP_RESTARTING,
    HEALTHY,
    INSUFFICIENT_GPU,
    MODEL_LOADING,
    PODS_FAILING,
    ROLLING_OUT,
    SCALED_TO_ZERO,
    SCALING_DOWN,
    SCALING_LIMITED,
    SCALING_UP,
    UNSCHEDULABLE,
)
from .api.spec import ModelDeployment
from .autoscaling.decision import limited_condition
from .desired.services import pods_selector
from .rollout.progressive import rollout_conditions
from .rollout.restarts import to_status
from .world.observe import Observed
from .world.plan import Plan

AVAILABLE, PROGRESSING, DEGRADED = "Available", "Progressing", "Degraded"
CONDITION_TYPES = (AVAILABLE, PROGRESSING, DEGRADED)

# Reasons (CamelCase, as Kubernetes conditions use them).

# The status keys this module owns; others (e.g. `autoscaling`) belong to other parts of the operator.
OWNED_KEYS = ("observedGeneration", "replicas", "readyReplicas", "updatedReplicas", "selector",
              "currentRevision", "stableRevision", "phase", "currentStepIndex", "canaryWeight",
              "message", "rollout", "autoscaling", "conditions", "groupRestarts")
BACKOFF = "; back-off: "        # what a GroupRestarting message adds while the next group waits


def condition(old: Sequence[Mapping[str, Any]], ctype: str, status: bool, reason: str, message: str,
              generation: int, now: str) -> dict[str, Any]:
    """A condition; lastTransitionTime moves only when the status flips (as meta.SetStatusCondition)."""
    value = "True" if status else "False"
    prev = next((c for c in old if c.get("type") == ctype), None)
    since = prev["lastTransitionTime"] if prev and prev.get("status") == value and prev.get(
        "lastTransitionTime") else now
    return {"type": ctype, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _degraded(md: ModelDeployment, observed: Observed, backoff: str | None = None) -> tuple[str, str] | None:
    """(reason, message) when something needs the user: no capacity, or pods that keep failing."""
    current = [p for p in observed.pods if not p.terminating]
    unschedulable = [p for p in current if p.unschedulable]
    gpu = f"Insufficient {md.resources.gpu_resource}"
    short = [p for p in unschedulable if gpu in p.unschedulable]
    if short:
        return INSUFFICIENT_GPU, (f"{_plural(len(short), 'pod')} cannot be scheduled for lack of "
                                  f"{md.resources.gpu_resource} (needs {md.resources.gpus} per pod): "
                                  f"{short[0].unschedulable}")
    if unschedulable:
        return UNSCHEDULABLE, f"{_plural(len(unschedulable), 'pod')} cannot be scheduled: {unschedulable[0].unschedulable}"
    broken = [(g, *g.broken) for g in observed.groups.values() if g.broken]
    # The first diagnosis of a group stands while it is re-created: its other ranks fail in turn once
    # they lose the first (rank 0 exits when rank 1 is killed), and would be named instead.
    said = next((c.get("message") or "" for c in md.status.get("conditions") or ()
                 if c.get("type") == DEGRADED and c.get("status") == "True"
                 and c.get("reason") == GROUP_RESTARTING), "").split(BACKOFF)[0]
    suffix = f"{BACKOFF}{backoff}" if backoff else ""
    if broken:
        for g, _, _ in broken:
            if said.startswith(f"replica group {g.replica} of revision {g.revision} lost rank "):
                return GROUP_RESTARTING, said + suffix
        g, rank, why = broken[0]
        return GROUP_RESTARTING, (f"replica group {g.replica} of revision {g.revision} lost rank {rank} ({why}): "
                                  f"re-creating the whole group{suffix}")
    if backoff:   # the broken group is gone; the next one waits out the back-off
        return GROUP_RESTARTING, (said or "replica groups keep losing ranks") + suffix
    failing = [p for p in current if p.failure]
    if failing:
        reason, message = failing[0].failure
        detail = f": {message}" if message else ""
        return PODS_FAILING, f"{_plural(len(failing), 'pod')} failing; {failing[0].name}: {reason}{detail}"
    return None


def status_of(md: ModelDeployment, observed: Observed, plan: Plan, now: str) -> dict[str, Any]:
    """The status this observation and plan imply (pure; `now` stamps condition transitions)."""
    old_conditions = md.status.get("conditions") or []
    groups = list(observed.groups.values())
    n, ready = md.replicas, sum(g.ready for g in groups)
    updated = len(observed.groups_of(plan.revision))
    degraded = _degraded(md, observed, plan.backoff)
    loading = sum(p.loading for p in observed.pods)

    if ready >= n:
        extra = f" (+{ready - n} being replaced or removed)" if ready > n else ""
        available = (True, SCALED_TO_ZERO if n == 0 else ALL_REPLICAS_READY,
                     f"{n}/{n} replica groups ready{extra}")
    else:
        reason = degraded[0] if degraded else MODEL_LOADING
        detail = f"; {_plural(loading, 'pod')} starting or loading the model" if loading else ""
        available = (False, reason, f"{ready}/{n} replica groups ready{detail}")

    if plan.rolling:
        old_revisions = sorted({g.revision for g in groups if g.revision != plan.revision})
        progressing = (True, ROLLING_OUT, f"revision {plan.revision} replacing {', '.join(old_revisions)}: "
                                          f"{sum(g.ready for g in observed.groups_of(plan.revision))}/{n} "
                                          "groups updated and ready")
    elif len(groups) > n or any(g.draining for g in plan.groups):
        progressing = (True, SCALING_DOWN, f"{len(groups)} replica groups, scaling down to {n}")
    elif len(groups) < n:
        progressing = (True, SCALING_UP, f"{len(groups)} replica groups, scaling up to {n}")
    elif ready < n:
        progressing = (True, MODEL_LOADING, f"{ready}/{n} replica groups ready")
    else:
        progressing = (False, CONVERGED, f"{n} replica groups ready at revision {plan.revision}")

    degraded_cond = (True, *degraded) if degraded else (False, HEALTHY, "no failing or unschedulable pods")
    overrides = rollout_conditions(md, plan)             # a rollout running, paused or aborted says so
    progressing = overrides.get(PROGRESSING, progressing)
    if DEGRADED in overrides:
        degraded_cond = overrides[DEGRADED]
        degraded = degraded_cond[1:]
    conditions = [
        condition(old_conditions, ctype, *value, md.generation, now)
        for ctype, value in ((AVAILABLE, available), (PROGRESSING, progressing), (DEGRADED, degraded_cond))
    ]
    phase = DEGRADED if degraded else PROGRESSING if progressing[0] else AVAILABLE if available[0] else MODEL_LOADING
    status: dict[str, Any] = {
        "observedGeneration": md.generation,
        "replicas": len(groups),
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": pods_selector(md),
        "currentRevision": plan.revision,
        "phase": phase,
        "message": (degraded[1] if degraded else progressing[2] if progressing[0] else available[2]),
        "conditions": conditions,
    }
    optional = {"stableRevision": plan.stable_revision, "canaryWeight": plan.canary_weight,
                "currentStepIndex": plan.step_index, "rollout": plan.rollout_state.to_json() or None,
                "groupRestarts": to_status(plan.restarts)}
    status.update({k: v for k, v in optional.items() if v is not None})
    return status


def with_autoscaling(status: Mapping[str, Any], md: ModelDeployment, autoscaling: Mapping[str, Any] | None,
                     now: str) -> dict[str, Any]:
    """The status plus the built-in autoscaler's state and its ScalingLimited condition (pure). With
    spec.autoscaling unset, neither is there (a status patch then removes them)."""
    if md.autoscaling is None or autoscaling is None:
        return dict(status)
    old_conditions = md.status.get("conditions") or []
    limited = condition(old_conditions, SCALING_LIMITED, *limited_condition(autoscaling), md.generation, now)
    return {**status, "autoscaling": dict(autoscaling), "conditions": [*status.get("conditions", []), limited]}


def invalid_status(old_status: Mapping[str, Any], generation: int, reason: str, message: str,
                   now: str) -> dict[str, Any]:
    """Status for a spec the operator cannot act on (`InvalidSpec`, or the API server refused what it
    built): Degraded says what to fix. Available is left as it was: the pods already there serve on."""
    old_conditions = old_status.get("conditions") or []
    status = {k: v for k, v in old_status.items() if k in OWNED_KEYS}
    kept = [c for c in old_conditions if c.get("type") == AVAILABLE]
    status.update({
        "observedGeneration": generation,
        "phase": DEGRADED,
        "message": message,
        "conditions": kept + [
            condition(old_conditions, PROGRESSING, False, reason, message, generation, now),
            condition(old_conditions, DEGRADED, True, reason, message, generation, now),
        ],
    })
    return status


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) from old to new: nested keys that went away become null
    (a plain new value would leave them in place, e.g. an `aborted` in status.rollout)."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return new
    patch: dict[str, Any] = {}
    for key in sorted(set(old) | set(new)):
        if key not in new:
            patch[key] = None
        elif key not in old or old[key] != new[key]:
            patch[key] = merge_patch(old.get(key), new[key])
    return patch


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch of `.status` from old to new over the owned keys ({} when unchanged)."""
    return {k: merge_patch(old.get(k), new.get(k)) for k in OWNED_KEYS if new.get(k) != old.get(k)}


def events_for(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) for the transitions a user wants to see in `kubectl describe`."""
    def by_type(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        return {c["type"]: c for c in status.get("conditions") or ()}

    before, after = by_type(old), by_type(new)
    events = []
    for ctype in CONDITION_TYPES:
        a, b = before.get(ctype, {}), after.get(ctype)
        if not b or (a.get("status"), a.get("reason")) == (b["status"], b["reason"]):
            continue
        if ctype == DEGRADED and b["status"] == "True":
            events.append(("Warning", b["reason"], b["message"]))
        elif ctype == DEGRADED and a.get("status") == "True":
            events.append(("Normal", "Recovered", b["message"]))
        elif ctype == AVAILABLE and b["status"] == "True":
            events.append(("Normal", "Available", b["message"]))
        elif ctype == PROGRESSING and b["reason"] == ROLLING_OUT:
            events.append(("Normal", "RolloutStarted", b["message"]))
    if new.get("stableRevision") and new.get("stableRevision") != old.get("stableRevision") and old.get(
            "stableRevision"):
        events.append(("Normal", "RolloutComplete", f"revision {new['stableRevision']} is stable"))
    return events
