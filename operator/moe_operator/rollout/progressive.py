"""Progressive delivery at the I/O edge of the reconcile.

`next_plan()` runs the analysis when an interval is due (the one I/O: scraping pods or querying
Prometheus), then the pure rollout state machine (revision templates are ControllerRevisions:
see revisions.py). `after_write()` notes, once the pod writes of an abort are done, when the new revision left
rotation (status, and the rollback latency the operator reports), returning the plan with that noted. `due_in()` says when the next
timed decision is, so the reconcile is scheduled then instead of waiting for the resync.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..analysis import Baselines, Context, Provider, analyse
from ..api.reasons import (
    ROLLING_BACK,
    ROLLING_OUT,
    ROLLOUT_ABORTED,
    ROLLOUT_PAUSED,
)
from ..api.spec import AnalysisSpec, ModelDeployment
from ..api.timestamps import epoch, iso
from ..world.observe import Observed
from ..world.plan import Plan
from ..world.state import RolloutState
from . import machine as rollout
from .requests import requests_from
from .restarts import backoff_note, restarts_now


@dataclass(frozen=True)
class Report:
    """What the operator's metrics want to know about this reconcile."""

    rollback: tuple[str, float | None] | None = None    # (reason, seconds from the request) on the abort
    completed: tuple[str, float | None] | None = None   # (strategy, rollout duration) on promotion


def next_plan(md: ModelDeployment, body: Mapping[str, Any], observed: Observed, revision: str, now: float,
              provider: Callable[[AnalysisSpec], Provider], baselines: Baselines) -> Plan:
    meta = body.get("metadata") or {}
    requests = requests_from(meta.get("annotations"), spec_paused=md.rollout.paused)
    state = RolloutState.from_json(md.status.get("rollout"))
    stable = md.status.get("stableRevision")
    running = bool(stable) and stable != revision and not (state.revision == revision and state.aborted)
    abort_pending = bool(requests.abort and requests.abort.revision == revision)
    verdict, analysis_state = None, None
    if running and not abort_pending:           # an abort is acted on first: no scrape delays it
        config = md.rollout.analysis
        prior = state.analysis if state.revision == revision else None
        key = (md.namespace, md.name, revision)     # per-pod baselines stay in memory, not in status
        verdict, analysis_state, memo = analyse(Context(md, observed, revision, stable, now, config), prior,
                                                provider(config), baselines.get(key))
        baselines.put(key, memo, now)
    plan = rollout.next_step(md, observed, revision, now, verdict, requests)
    if analysis_state and plan.rollout_state.revision == revision:
        plan = replace(plan, rollout_state=replace(plan.rollout_state, analysis=analysis_state))
    restarts = tuple(r for _, r in sorted(restarts_now(md.status, observed, now).items()))
    return replace(plan, restarts=restarts, backoff=backoff_note(restarts, now))


def after_write(md: ModelDeployment, plan: Plan, now: float) -> tuple[Report, Plan]:
    """Call once the plan's writes are done (`now`: after them): the report for the metrics, and the
    plan with the moment the aborted revision left rotation noted in its state."""
    state = plan.rollout_state
    old = RolloutState.from_json(md.status.get("rollout"))
    report = Report()
    aborted = state.aborted
    if aborted and not state.out_of_rotation_at and not rollout.new_revision_in_rotation(plan):
        if old.out_of_rotation_at and old.revision == state.revision:
            left = old.out_of_rotation_at      # noted before a restart
        else:
            left = iso(now)
            requested = epoch(aborted.get("at"))
            report = replace(report, rollback=(aborted.get("reason", "Unknown"),
                                               now - requested if requested else None))
        plan = replace(plan, rollout_state=replace(state, out_of_rotation_at=left))
    if state.completed_at and state.completed_at != old.completed_at \
            and md.status.get("stableRevision") != plan.stable_revision:
        started = epoch(state.started_at)
        report = replace(report, completed=(md.rollout.strategy, now - started if started else None))
    return report, plan


def due_in(md: ModelDeployment, plan: Plan, now: float, baselines: Baselines) -> float | None:
    """Seconds until the next timed decision: a pause, a delay, a deadline or an analysis interval."""
    times = [rollout.requeue_after(md, plan, now)]
    memo = baselines.get((md.namespace, md.name, plan.revision)) or {}
    if plan.rolling and not plan.rollout_state.aborted and memo.get("lastAt") is not None:
        times.append(max(0.05, float(memo["lastAt"]) + md.rollout.analysis.interval_seconds - now))
    times = [t for t in times if t is not None]
    return min(times) if times else None


# --- what status says about a rollout ------------------------------------------------------------

def rollback_word(plan: Plan) -> str:
    """How an abort went, in the words of the /alerts reply: instant, or not (and what happens)."""
    state = plan.rollout_state
    if not state.aborted:
        return "recorded; the operator is acting on it"
    restoring = state.restoring
    if restoring:
        return (f"not instant: {restoring.get('readyGroups', 0)}/{restoring.get('replicas', 0)} groups of "
                f"{plan.stable_revision} are ready; the rest are restored as fast as maxSurgeGPUs allows")
    return f"instant: {plan.revision} left rotation, {plan.stable_revision} serves"




def rollout_conditions(md: ModelDeployment, plan: Plan) -> dict[str, tuple[bool, str, str]]:
    """Overrides of the Progressing / Degraded conditions while a rollout runs, is paused or was
    aborted: {type: (status, reason, message)}."""
    state = plan.rollout_state
    if state.revision != plan.revision or plan.stable_revision == plan.revision:
        return {}
    aborted = state.aborted
    if aborted:
        labels = aborted.get("labels") or {}
        detail = f" (alert labels {', '.join(f'{k}={v}' for k, v in sorted(labels.items()))})" if labels else ""
        figures = aborted.get("figures") or {}
        if figures:
            detail += " (" + ", ".join(f"{k} {v}" for k, v in sorted(figures.items())) + ")"
        restoring = state.restoring
        if restoring:
            # The abort came after the promotion, when the old revision was no longer whole: it is
            # brought back as fast as the GPU budget allows, and status says so until it is.
            who = (f"{plan.revision} keeps serving until a group of {plan.stable_revision} is ready"
                   if restoring.get("abortedServing") else f"{plan.stable_revision} serves")
            message = (f"revision {plan.revision} aborted after its promotion: {aborted.get('reason')}: "
                       f"{aborted.get('message', '')}{detail}; the rollback is not instant: "
                       f"{restoring.get('readyGroups', 0)}/{restoring.get('replicas', 0)} groups of "
                       f"{plan.stable_revision} ready, the rest restored within maxSurgeGPUs; {who}")
            return {"Degraded": (True, ROLLING_BACK, message), "Progressing": (True, ROLLING_BACK, message)}
        message = (f"revision {plan.revision} aborted, {plan.stable_revision} serves: {aborted.get('reason')}: "
                   f"{aborted.get('message', '')}{detail}; it is not tried again until the spec changes "
                   f"or `kubectl moe retry {md.name}`")
        return {"Degraded": (True, ROLLOUT_ABORTED, message), "Progressing": (False, ROLLOUT_ABORTED, message)}
    if not plan.rolling:
        return {}
    paused = state.paused
    if paused:
        return {"Progressing": (True, ROLLOUT_PAUSED, f"{paused.get('reason')}: {paused.get('message', '')}")}
    if md.rollout.strategy == "Canary":
        steps = len(md.rollout.steps)
        idx = (state.step_index or 0)
        where = f"step {min(idx + 1, steps)}/{steps}" if idx < steps else "promoting"
        message = (f"canary {plan.revision}: {where}, weight {state.weight or 0}% "
                   f"(achieved {state.achieved_weight or 0}%)")
    else:
        message = f"blue-green {plan.revision}: " + ("scaling to full size for the switch" if state.promoting
                                                      else "preview")
    if state.blocked_on_gpus:
        message += "; waiting for GPUs within maxSurgeGPUs"
    return {"Progressing": (True, ROLLING_OUT, message)}
