"""Canary and blue-green rollouts as one pure function: `next_step(...) -> Plan`.

Inputs: the ModelDeployment (spec, and in its status the rollout state `status.rollout` and
`stableRevision`), the observation (pods grouped into replica groups), the revision the spec asks
for, the time, the analysis verdict, and the requests of users and alerts (annotations). Output: the
operator's `Plan` (which groups exist, of which revision and track, which are in rotation) carrying
the next `status.rollout`. Nothing here does I/O, so every decision is unit-tested, and because all
state is in status an operator killed at any moment resumes where it was.

The GPU budget and rotation rules every plan keeps are layout.py's. Promotion relabels the new
groups `stable` (same pods: no restart, no model reload).

Canary: steps of setWeight (realised as canary vs stable groups in rotation; the achieved weight is
reported) and pause (with a duration, or until `promote`); after the last step the canary grows to
all replicas, then is promoted. Blue-green: the preview revision at previewReplicas (reachable at
<name>-preview, never in rotation), then (auto-promotion after autoPromotionSeconds with passing
analysis, or `promote`) scaled to full size within the budget, then one switch of every in-rotation
label; the old revision stays warm for scaleDownDelaySeconds so an abort then is instant.
Abort (alert, analysis, user, progress deadline): the new revision leaves rotation at once, its pods
go after a short delay, and the revision is remembered as aborted until the spec changes or `retry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..analysis.verdict import FAIL, INCONCLUSIVE, PASS, Verdict
from ..api import names
from ..api.reasons import ABORT_ANALYSIS, ABORT_DEADLINE, ABORT_INCONCLUSIVE
from ..api.spec import ModelDeployment
from ..api.timestamps import epoch, iso
from ..world.observe import Observed
from ..world.plan import GroupPlan, Plan
from ..world.state import RolloutState
from .layout import _layout, achieved_weight, canary_groups_for, gpu_budget
from .requests import Requests

# How long an aborted canary's pods stay (out of rotation) before they are deleted, and how long the
# old revision stays warm after a canary promotion (blue-green uses scaleDownDelaySeconds).
ABORT_SCALE_DOWN_DELAY_SECONDS = 10.0
CANARY_SCALE_DOWN_DELAY_SECONDS = 10.0

@dataclass(frozen=True)
class Options:
    """Rollout settings beyond the typed spec's (read with defaults, so older specs keep working)."""

    on_inconclusive: str = "Pause"          # Pause | Abort
    progress_deadline_abort: bool = False   # False: pause with a condition (as Argo Rollouts)
    abort_scale_down_delay: float = ABORT_SCALE_DOWN_DELAY_SECONDS
    canary_scale_down_delay: float = CANARY_SCALE_DOWN_DELAY_SECONDS

    @classmethod
    def of(cls, md: ModelDeployment) -> Options:
        return cls(on_inconclusive=md.rollout.analysis.on_inconclusive,
                   progress_deadline_abort=md.rollout.progress_deadline_abort)


# --- the state machine ---------------------------------------------------------------------------

def _infer_stable(observed: Observed, revision: str) -> str | None:
    """With no stableRevision in status (lost, or first deployment): the other revision with the
    most ready groups, if any has one."""
    counts: dict[str, int] = {}
    for g in observed.groups.values():
        if g.revision != revision and g.ready:
            counts[g.revision] = counts.get(g.revision, 0) + 1
    if not counts:
        return None
    return max(sorted(counts), key=lambda r: counts[r])


def _fresh(revision: str, stable: str, strategy: str, now: float, handled: Mapping[str, Any]) -> RolloutState:
    t = iso(now)
    return RolloutState(revision=revision, from_revision=stable, strategy=strategy, step_index=0,
                        started_at=t, step_started_at=t, last_progress_at=t, ready_groups=0,
                        handled=dict(handled))


def _is_new(value: str | None, state: RolloutState, key: str) -> bool:
    return bool(value) and (state.handled or {}).get(key) != value


def _mark(state: RolloutState, key: str, value: str | None) -> None:
    if value:
        state.handled = {**(state.handled or {}), key: value}


def _plan(md: ModelDeployment, revision: str, stable: str | None, groups: list[GroupPlan], state: RolloutState,
          *, rolling: bool, track: str | None, step_index: int | None = None) -> Plan:
    achieved = achieved_weight(groups, revision) if rolling else None
    if rolling:
        state.achieved_weight = achieved
    tracks = (names.TRACK_STABLE, track) if rolling and track else (names.TRACK_STABLE,)
    return Plan(revision=revision, stable_revision=stable, groups=tuple(groups), service_tracks=tracks,
                rolling=rolling, canary_weight=achieved if track == names.TRACK_CANARY else None,
                step_index=step_index, rollout_state=state)


def next_step(md: ModelDeployment, observed: Observed, revision: str, now: float,
              verdict: Verdict | None = None, requests: Requests | None = None,
              options: Options | None = None) -> Plan:
    """The plan for this moment of the rollout of `revision` (pure)."""
    requests = requests or Requests()
    options = options or Options.of(md)
    state = RolloutState.from_json(md.status.get("rollout"))
    stable = md.status.get("stableRevision") or _infer_stable(observed, revision)

    if stable is None or stable == revision:
        return _steady(md, observed, revision, state, requests, now, options)
    if state.revision != revision:
        # A new rollout (the spec changed, perhaps in the middle of another one: that canary goes).
        state = _fresh(revision, stable, md.rollout.strategy, now, state.handled or {})
        for key, value in (("retry", requests.retry), ("promote", requests.promote),
                           ("promoteFull", requests.promote_full), ("resume", requests.resume)):
            _mark(state, key, value)
    if state.aborted:
        if requests.abort and requests.abort.revision == revision:
            _mark(state, "abort", requests.abort.key)   # moot now: a retry must not meet it again
        if _is_new(requests.retry, state, "retry"):
            state = _fresh(revision, stable, md.rollout.strategy, now, state.handled or {})
            state.retried_at = iso(now)
            _mark(state, "retry", requests.retry)
        else:
            return _aborted(md, observed, revision, stable, state, now, options)

    abort = _abort_reason(md, state, verdict, requests, now, options)
    if abort:
        state.aborted = abort
        state.aborted_at = iso(now)
        state.paused = None
        return _aborted(md, observed, revision, stable, state, now, options)
    if md.rollout.strategy == "BlueGreen":
        return _blue_green(md, observed, revision, stable, state, verdict, requests, now, options)
    return _canary(md, observed, revision, stable, state, verdict, requests, now, options)


def _abort_reason(md: ModelDeployment, state: RolloutState, verdict: Verdict | None, requests: Requests,
                  now: float, options: Options) -> dict | None:
    req = requests.abort
    if req and req.revision == state.revision and _is_new(req.key, state, "abort"):
        _mark(state, "abort", req.key)
        return req.record(now)
    if verdict and verdict.result == FAIL:
        return {"reason": ABORT_ANALYSIS, "message": verdict.message, "source": "analysis", "at": iso(now),
                "figures": dict(verdict.figures)}
    if verdict and verdict.result == INCONCLUSIVE and options.on_inconclusive == "Abort":
        return {"reason": ABORT_INCONCLUSIVE, "message": verdict.message, "source": "analysis", "at": iso(now)}
    last = epoch(state.last_progress_at) or now
    if (options.progress_deadline_abort and not state.paused and not state.holding_since
            and now - last > md.rollout.progress_deadline_seconds):
        return {"reason": ABORT_DEADLINE, "source": "deadline", "at": iso(now),
                "message": f"no progress for {md.rollout.progress_deadline_seconds}s"}
    return None


def _pause_bookkeeping(md: ModelDeployment, state: RolloutState, verdict: Verdict | None, requests: Requests,
                       now: float, options: Options, waiting_by_design: bool) -> bool:
    """Update pauses the operator makes (inconclusive analysis, progress deadline) and the deadline
    clock; True when the rollout must not advance now."""
    if _is_new(requests.resume, state, "resume"):
        state.paused = None
        state.last_progress_at = iso(now)
        _mark(state, "resume", requests.resume)
    if verdict and verdict.result == INCONCLUSIVE and not state.paused:
        state.paused = {"reason": ABORT_INCONCLUSIVE, "message": verdict.message, "at": iso(now)}
    holding = bool(requests.paused or state.paused or waiting_by_design)
    if holding:
        # The deadline does not run while paused: the hold's start is written once, and the clock
        # restarts when it ends (no status write on every resync while a rollout waits).
        state.holding_since = state.holding_since or iso(now)
        return bool(requests.paused or state.paused)
    if state.holding_since is not None:
        state.holding_since = None
        state.last_progress_at = iso(now)
    last = epoch(state.last_progress_at) or now
    deadline = md.rollout.progress_deadline_seconds
    if now - last > deadline:
        state.paused = {"reason": ABORT_DEADLINE, "at": iso(now),
                           "message": f"no progress for {deadline}s (e.g. no GPUs for the new groups); "
                                      "kubectl moe resume to keep waiting, abort to give up"}
        state.holding_since = iso(now)
    return bool(state.paused)


def _progress(state: RolloutState, ready_new: int, now: float) -> None:
    if ready_new > int(state.ready_groups or 0):
        state.last_progress_at = iso(now)
    state.ready_groups = ready_new


def _weight_at(md: ModelDeployment, index: int) -> int:
    steps = md.rollout.steps
    if index >= len(steps):
        return 100
    weights = [s.set_weight for s in steps[:index + 1] if s.set_weight is not None]
    return weights[-1] if weights else 0


def _canary(md: ModelDeployment, observed: Observed, revision: str, stable: str, state: RolloutState,
            verdict: Verdict | None, requests: Requests, now: float, options: Options) -> Plan:
    steps = md.rollout.steps
    n = md.replicas
    ready_new = sum(g.ready for g in observed.groups_of(revision))
    _progress(state, ready_new, now)

    # Skip steps the user promoted past.
    index = min(int(state.step_index or 0), len(steps))
    if _is_new(requests.promote_full, state, "promoteFull"):
        index = len(steps)
        _mark(state, "promoteFull", requests.promote_full)
    if _is_new(requests.promote, state, "promote"):
        index = min(index + 1, len(steps))
        _mark(state, "promote", requests.promote)
        state.paused = None
    if index != int(state.step_index or 0):
        state.step_index, state.step_started_at, state.last_progress_at = index, iso(now), iso(now)

    # Advance through completed steps (several in one pass when nothing needs waiting).
    step_started = epoch(state.step_started_at) or now
    while True:
        canary_target = canary_groups_for(_weight_at(md, index), n)[0]
        rotating = min(ready_new, canary_target)
        waiting_by_design = index < len(steps) and steps[index].is_pause
        paused = _pause_bookkeeping(md, state, verdict, requests, now, options, waiting_by_design)
        if index >= len(steps) or paused:
            break
        step = steps[index]
        if step.is_pause:
            done = step.pause_seconds is not None and now >= step_started + step.pause_seconds
        else:
            done = rotating >= canary_target
        if not done:
            break
        index += 1
        step_started = now
        state.step_index, state.step_started_at, state.last_progress_at = index, iso(now), iso(now)

    analysis_passes = verdict is None or verdict.result == PASS    # no data is never a pass
    if index >= len(steps) and ready_new >= n and analysis_passes and not (requests.paused or state.paused):
        # Every replica runs the new revision, is ready and judged healthy: promote (relabel, no restart).
        return _complete(md, observed, revision, stable, state, now, options.canary_scale_down_delay)

    weight = _weight_at(md, index)
    canary_target, stable_floor = canary_groups_for(weight, n)
    state.weight = weight
    groups, blocked = _layout(md, observed, now, stable=stable, stable_track=names.TRACK_STABLE,
                              stable_floor=stable_floor, new=revision, new_track=names.TRACK_CANARY,
                              new_target=canary_target, new_rotate=canary_target)
    state.blocked_on_gpus = blocked
    return _plan(md, revision, stable, groups, state, rolling=True, track=names.TRACK_CANARY,
                 step_index=index)


def _blue_green(md: ModelDeployment, observed: Observed, revision: str, stable: str, state: RolloutState,
                verdict: Verdict | None, requests: Requests, now: float, options: Options) -> Plan:
    bg, n = md.rollout.blue_green, md.replicas
    g_gpus = md.gpus_per_group
    ready_new = sum(g.ready for g in observed.groups_of(revision))
    _progress(state, ready_new, now)
    preview = min(bg.preview_replicas, n)
    # Before the switch at least one stable group keeps serving; the preview grows to what fits.
    floor = 1 if n else 0
    fits = n if not g_gpus else max(0, (gpu_budget(md) // g_gpus) - floor)
    full = min(n, fits)

    promoting = bool(state.promoting)
    if not promoting and ready_new >= preview and not state.preview_ready_at:
        state.preview_ready_at = iso(now)
    paused = _pause_bookkeeping(md, state, verdict, requests, now, options,
                                waiting_by_design=bool(state.preview_ready_at) and not promoting)
    if not promoting:
        if _is_new(requests.promote, state, "promote") or _is_new(requests.promote_full, state, "promoteFull"):
            promoting = True
        elif (not paused and bg.auto_promotion_seconds is not None and state.preview_ready_at
              and now >= epoch(state.preview_ready_at) + bg.auto_promotion_seconds
              and (verdict is None or verdict.result == PASS)):
            promoting = True
        if promoting:
            state.promoting, state.promoted_at, state.last_progress_at = True, iso(now), iso(now)
            state.paused = None
    _mark(state, "promote", requests.promote)
    _mark(state, "promoteFull", requests.promote_full)
    paused = bool(requests.paused or state.paused)

    if promoting and not paused and ready_new >= max(full, 1 if n else 0):
        return _complete(md, observed, revision, stable, state, now, float(bg.scale_down_delay_seconds))
    target = full if promoting else preview
    groups, blocked = _layout(md, observed, now, stable=stable, stable_track=names.TRACK_STABLE,
                              stable_floor=floor, stable_rotate=n, new=revision,
                              new_track=names.TRACK_PREVIEW, new_target=target, new_rotate=0)
    state.blocked_on_gpus = blocked
    return _plan(md, revision, stable, groups, state, rolling=True, track=names.TRACK_PREVIEW)


def _complete(md: ModelDeployment, observed: Observed, revision: str, stable: str, state: RolloutState, now: float,
              delay: float) -> Plan:
    """Promotion: the new revision becomes stable; the old one stays warm for `delay` seconds."""
    state.clear("paused", "promoting", "blocked_on_gpus", "weight", "achieved_weight")
    state.completed_at, state.previous_revision, state.scale_down_at = iso(now), stable, iso(now + delay)
    state.step_index = len(md.rollout.steps) if md.rollout.strategy == "Canary" else (state.step_index or 0)
    md_status = {**md.status, "stableRevision": revision, "rollout": state.to_json()}
    return _steady(_with_status(md, md_status), observed, revision, state, Requests(), now, Options.of(md))


def _with_status(md: ModelDeployment, status: Mapping[str, Any]) -> ModelDeployment:
    return replace(md, status=dict(status))


def _steady(md: ModelDeployment, observed: Observed, revision: str, state: RolloutState, requests: Requests,
            now: float, options: Options) -> Plan:
    """No rollout running: the spec's revision serves; a just-replaced revision stays warm until its
    scale-down time (and an abort of the new revision in that window switches back at once)."""
    n = md.replicas
    if state.revision not in (None, revision) and not state.completed_at:
        state = RolloutState(handled=state.handled or {})      # the spec went back: that rollout is over
    previous = state.previous_revision
    warm_until = epoch(state.scale_down_at)
    warm = bool(previous and previous != revision and warm_until and now < warm_until)
    if warm and state.revision == revision:
        req = requests.abort
        if req and req.revision == revision and _is_new(req.key, state, "abort"):
            # Rollback of the revision just promoted: the old one is put back, at once where it is
            # still whole and warm, else as fast as the GPU budget allows (status says which).
            previous_ready = sum(g.ready for g in observed.groups_of(previous) if not g.stale)
            _mark(state, "abort", req.key)
            state = replace(state, revision=revision, from_revision=previous, aborted=req.record(now),
                            aborted_at=iso(now), rollback_instant=previous_ready >= n)
            state.clear("completed_at", "previous_revision", "scale_down_at")
            return _aborted(_with_status(md, {**md.status, "stableRevision": previous}), observed, revision,
                            previous, state, now, options)
    if previous and not warm:
        state.clear("previous_revision", "scale_down_at")
    groups, _ = _layout(md, observed, now, stable=revision, stable_track=names.TRACK_STABLE, stable_floor=n,
                        stable_rotate=n, linger={previous: True} if warm else None)
    live = observed.groups_of(revision)
    done = len(live) >= n and sum(g.ready for g in live) >= n
    stable_before = md.status.get("stableRevision")
    stable = revision if (done or stable_before == revision) else stable_before
    return _plan(md, revision, stable, groups, state, rolling=False, track=None)


def _aborted(md: ModelDeployment, observed: Observed, revision: str, stable: str, state: RolloutState, now: float,
             options: Options) -> Plan:
    """The new revision out of rotation at once, its pods kept (warm, for a look) for a short delay
    unless stable needs their GPUs; the stable revision back at full size. Only while no group of
    the stable revision is ready (a rollback after a promotion that had already let it go) do the
    aborted revision's ready groups keep serving, giving way one by one as stable groups come back."""
    n = md.replicas
    state.clear("promoting", "weight", "paused", "blocked_on_gpus", "holding_since")
    aborted_at = epoch(state.aborted_at) or now
    linger = now < aborted_at + options.abort_scale_down_delay
    stable_ready = sum(g.ready for g in observed.groups_of(stable) if not g.stale)
    ready_new = [g for g in observed.groups_of(revision) if g.ready and not g.stale]
    serving = [g for g in ready_new if g.in_rotation]
    if state.rollback_instant is False and stable_ready == 0 and serving:
        def layout_keeping(count: int) -> tuple[list[GroupPlan], bool]:
            return _layout(md, observed, now, stable=stable, stable_track=names.TRACK_STABLE, stable_floor=n,
                           stable_rotate=n, new=revision, new_track=names.TRACK_CANARY, new_target=count,
                           new_rotate=count)
        groups, blocked = layout_keeping(len(serving))
        if blocked and len(serving) > 1 and len(ready_new) == len(serving):
            # No room for the stable revision: one aborted group leaves (never the last one, and one
            # at a time: the next when this one's GPUs are free).
            groups, _ = layout_keeping(len(serving) - 1)
    else:
        groups, _ = _layout(md, observed, now, stable=stable, stable_track=names.TRACK_STABLE, stable_floor=n,
                            stable_rotate=n, linger={revision: linger})
    if state.rollback_instant is False and stable_ready < n:
        # Said in status (a condition reason, and so an Event) until the old revision is whole again.
        state.restoring = {"readyGroups": stable_ready, "replicas": n,
                              "abortedServing": bool(stable_ready == 0 and serving)}
    else:
        state.restoring = None
    state.achieved_weight = 0
    tracks = (names.TRACK_STABLE,)
    return Plan(revision=revision, stable_revision=stable, groups=tuple(groups), service_tracks=tracks,
                rolling=False, canary_weight=0 if md.rollout.strategy == "Canary" else None,
                step_index=state.step_index, rollout_state=state)


# --- what status and the reconcile need to know --------------------------------------------------

def new_revision_in_rotation(plan: Plan) -> bool:
    """False once no group of the plan's revision is in rotation (e.g. right after an abort)."""
    return any(g.in_rotation and g.revision == plan.revision for g in plan.groups)


def requeue_after(md: ModelDeployment, plan: Plan, now: float) -> float | None:
    """Seconds until a timed decision (pause end, scale-down delay, auto-promotion, deadline) is
    due, so the reconcile can be scheduled then instead of waiting for the resync."""
    state = plan.rollout_state
    due: list[float] = []

    def at(text: str | None, plus: float = 0.0) -> None:
        t = epoch(text)
        if t is not None:
            due.append(t + plus)

    at(state.scale_down_at)
    due.extend(g.drain_until for g in plan.groups if g.drain_until is not None)
    due.extend(r.until for r in plan.restarts)           # a group re-created when its back-off ends
    if state.aborted_at:
        at(state.aborted_at, ABORT_SCALE_DOWN_DELAY_SECONDS)
    steps = md.rollout.steps
    idx = state.step_index
    if plan.rolling and idx is not None and idx < len(steps) and steps[idx].is_pause \
            and steps[idx].pause_seconds is not None:
        at(state.step_started_at, steps[idx].pause_seconds)
    if plan.rolling and state.preview_ready_at and md.rollout.blue_green.auto_promotion_seconds is not None:
        at(state.preview_ready_at, md.rollout.blue_green.auto_promotion_seconds)
    if plan.rolling and state.last_progress_at:
        at(state.last_progress_at, md.rollout.progress_deadline_seconds + 0.5)
    future = [t - now for t in due if t > now]
    return max(0.05, min(future)) if future else None
