"""Canary and blue-green rollouts as one pure function: `next_step(...) -> Plan`.

Inputs: the ModelDeployment (spec, and in its status the rollout state `status.rollout` and
`stableRevision`), the observation (pods grouped into replica groups), the revision the spec asks
for, the time, the analysis verdict, and the requests of users and alerts (annotations). Output: the
operator's `Plan` (which groups exist, of which revision and track, which are in rotation) carrying
the next `status.rollout`. Nothing here does I/O, so every decision is unit-tested, and because all
state is in status an operator killed at any moment resumes where it was.

Rules every plan keeps:
- GPUs: a pod is created only if the GPUs of every pod that exists (terminating ones included, they
  still hold theirs) plus the new one stay within `replicas * gpus per group + maxSurgeGPUs`.
  When that blocks the canary, stable groups leave rotation and go first, but never below what the
  current weight needs; groups kept warm (old revision after a switch, an aborted canary) go early.
- Rotation: a new group enters rotation only when all its pods are ready; a group leaves rotation
  before it is deleted (two-phase, so Services stop sending before SIGTERM).
- Promotion relabels the new groups `stable` (same pods: no restart, no model reload).

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

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from ..api import names
from ..api.spec import ModelDeployment
from ..world.observe import Group, Observed, ObservedPod
from ..world.plan import GroupPlan, Plan

# How long an aborted canary's pods stay (out of rotation) before they are deleted, and how long the
# old revision stays warm after a canary promotion (blue-green uses scaleDownDelaySeconds).
ABORT_SCALE_DOWN_DELAY_SECONDS = 10.0
CANARY_SCALE_DOWN_DELAY_SECONDS = 10.0

# Analysis results.
PASS, FAIL, INCONCLUSIVE, PENDING = "Pass", "Fail", "Inconclusive", "Pending"

# Annotations users (kubectl moe) and the /alerts webhook write; the operator never removes them and
# acts on each value once (it remembers handled values in status.rollout.handled).
ANNOTATION_ABORT = f"{names.PREFIX}/abort"            # JSON: revision, reason, message, at, source, labels
ANNOTATION_PROMOTE = f"{names.PREFIX}/promote"        # timestamp: skip the current step / promote preview
ANNOTATION_PROMOTE_FULL = f"{names.PREFIX}/promote-full"   # timestamp: skip every remaining step
ANNOTATION_RETRY = f"{names.PREFIX}/retry"            # timestamp: roll the aborted revision out again
ANNOTATION_PAUSED = f"{names.PREFIX}/paused"          # "true" while paused by hand
ANNOTATION_RESUME = f"{names.PREFIX}/resume"          # timestamp: clears a pause the operator made

# Why a rollout was aborted or paused (status.rollout.aborted.reason / .paused.reason).
ABORT_ALERT = "AlertFiring"
ABORT_ANALYSIS = "AnalysisFailed"
ABORT_INCONCLUSIVE = "AnalysisInconclusive"
ABORT_USER = "AbortedByUser"
ABORT_DEADLINE = "ProgressDeadlineExceeded"


# --- time ----------------------------------------------------------------------------------------

def iso(t: float) -> str:
    """RFC 3339 UTC with milliseconds (what status.rollout stores)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """The analysis' verdict on the new revision now (see moe_operator.analysis)."""

    result: str = PENDING
    message: str = ""
    figures: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AbortRequest:
    """An abort of one revision, acted on once (by `id`). `at` is when it was asked on the clock of
    whoever wrote it: the operator's own for alerts (its webhook), the client's for `kubectl moe
    abort`, so it is only reported, never compared with the operator's times; the operator stamps
    the abort with its own clock when it acts."""

    revision: str
    reason: str
    message: str
    at: float | None = None       # when the alert arrived / the user asked (epoch seconds)
    source: str = "user"          # alert | user
    labels: Mapping[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)   # unique per request ("" in older ones: `at`)

    @property
    def key(self) -> str:
        return self.id or (iso(self.at) if self.at is not None else "")

    def to_json(self) -> str:
        data = {"revision": self.revision, "reason": self.reason, "message": self.message,
                "source": self.source, "labels": dict(self.labels), "id": self.id}
        if self.at is not None:
            data["at"] = iso(self.at)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> AbortRequest | None:
        try:
            data = json.loads(text or "")
            at = epoch(data.get("at"))
            request_id = str(data.get("id") or "")
            if not isinstance(data.get("revision"), str) or (at is None and not request_id):
                return None
            return cls(data["revision"], str(data.get("reason") or ABORT_USER), str(data.get("message") or ""),
                       at, str(data.get("source") or "user"),
                       {str(k): str(v) for k, v in (data.get("labels") or {}).items()}, request_id)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def record(self, now: float) -> dict[str, Any]:
        """What status.rollout.aborted keeps: stamped with the operator's clock (`at`), except an
        alert's arrival, which the operator's own webhook stamped."""
        at = self.at if self.source == "alert" and self.at is not None else now
        return {"reason": self.reason, "message": self.message, "source": self.source, "at": iso(at),
                "labels": dict(self.labels)}


@dataclass(frozen=True)
class Requests:
    """What users and alerts ask for, read from the ModelDeployment's annotations (and spec)."""

    abort: AbortRequest | None = None
    promote: str | None = None
    promote_full: str | None = None
    retry: str | None = None
    resume: str | None = None
    paused: bool = False


def requests_from(annotations: Mapping[str, str] | None, spec_paused: bool = False) -> Requests:
    a = annotations or {}
    return Requests(
        abort=AbortRequest.from_json(a.get(ANNOTATION_ABORT)),
        promote=a.get(ANNOTATION_PROMOTE) or None,
        promote_full=a.get(ANNOTATION_PROMOTE_FULL) or None,
        retry=a.get(ANNOTATION_RETRY) or None,
        resume=a.get(ANNOTATION_RESUME) or None,
        paused=spec_paused or str(a.get(ANNOTATION_PAUSED, "")).lower() == "true",
    )


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


# --- arithmetic of weights and GPUs --------------------------------------------------------------

def canary_groups_for(weight: int, replicas: int) -> tuple[int, int]:
    """(canary groups, stable groups) in rotation for a weight. Coarse with few replicas: a weight
    above 0 gets at least one canary group, a weight below 100 keeps at least one stable group."""
    n = replicas
    if weight <= 0 or n == 0:
        return 0, n
    if weight >= 100:
        return n, 0
    canary = max(1, round(weight * n / 100))
    if n > 1:
        canary = min(canary, n - 1)
    return canary, max(n - canary, 1)


def achieved_weight(groups: Iterable[GroupPlan], new_revision: str) -> int | None:
    rotating = [g for g in groups if g.in_rotation]
    if not rotating:
        return 0
    return round(100 * sum(g.revision == new_revision for g in rotating) / len(rotating))


def pod_gpus(pod: ObservedPod, md: ModelDeployment) -> int:
    """GPUs a pod holds (its containers' limits; its revision's value when the body has none)."""
    spec = (pod.body or {}).get("spec")
    if not spec:
        return md.resources.gpus
    total = 0
    for c in spec.get("containers") or ():
        limits = (c.get("resources") or {}).get("limits") or {}
        total += int(limits.get(md.resources.gpu_resource, 0) or 0)
    return total


def group_gpus(md: ModelDeployment, observed: Observed, revision: str | None) -> int:
    """GPUs one group of `revision` takes, by its own template (the spec's for an unknown one)."""
    if revision is None:
        return md.gpus_per_group
    return observed.size_of(revision) * observed.gpus.get(revision, md.resources.gpus)


def gpu_budget(md: ModelDeployment) -> int:
    return md.replicas * md.gpus_per_group + md.surge_gpus


def gpus_in_use(md: ModelDeployment, observed: Observed) -> int:
    """Every pod that holds GPUs: live and terminating (a terminating pod has not released its GPUs)."""
    return sum(pod_gpus(p, md) for p in observed.pods if p.phase not in ("Failed", "Succeeded"))


# --- layout: from counts to groups ---------------------------------------------------------------

def _rank(groups: Iterable[Group]) -> list[Group]:
    """Ready groups first, then complete ones, then those in rotation, then low replica indices."""
    return sorted(groups, key=lambda g: (not g.ready, not g.complete, not g.in_rotation, g.replica))


def _free_indices(used: Iterable[int], count: int) -> list[int]:
    taken, out, i = set(used), [], 0
    while len(out) < count:
        if i not in taken:
            out.append(i)
        i += 1
    return out


@dataclass
class _Layout:
    md: ModelDeployment
    observed: Observed
    free: int                                  # GPUs that may still be taken now
    now: float = 0.0
    groups: list[GroupPlan] = field(default_factory=list)
    blocked: bool = False                      # something wanted could not be created for lack of GPUs

    def keep(self, g: Group, track: str, in_rotation: bool) -> None:
        cost = (g.size - len(g.pods)) * self.observed.gpus.get(g.revision, self.md.resources.gpus)
        if cost > self.free:
            # An incomplete group whose missing pods do not fit: it cannot serve, so it goes (and is
            # made again, whole, when GPUs are free) rather than waiting half-made.
            self.blocked = True
            self.remove(g)
            return
        self.free -= cost
        self.groups.append(GroupPlan(g.revision, g.replica, track, in_rotation and g.ready))

    def create(self, revision: str, replica: int, track: str) -> bool:
        cost = group_gpus(self.md, self.observed, revision)
        if cost > self.free:
            self.blocked = True
            return False
        self.free -= cost
        self.groups.append(GroupPlan(revision, replica, track, in_rotation=False))
        return True

    def remove(self, g: Group) -> None:
        """Out of rotation first; deleted (left out of the plan) once it has been out of rotation for
        the drain period, so that every proxy has dropped it before its pods get SIGTERM."""
        since = self.now if g.in_rotation else g.out_of_rotation_since
        until = None if since is None else since + self.md.runtime.drain_seconds
        if g.in_rotation or (until is not None and self.now < until):
            self.groups.append(GroupPlan(g.revision, g.replica, g.track, in_rotation=False, draining=True,
                                         drain_until=until))

    def linger(self, g: Group) -> None:
        """Kept, warm, out of rotation (an old revision after a switch, an aborted canary)."""
        self.groups.append(GroupPlan(g.revision, g.replica, g.track, in_rotation=False,
                                     draining=g.in_rotation))


def _layout(md: ModelDeployment, observed: Observed, now: float, *, stable: str, stable_track: str,
            stable_floor: int, stable_rotate: int | None = None,
            new: str | None = None, new_track: str = names.TRACK_CANARY, new_target: int = 0,
            new_rotate: int = 0, linger: Mapping[str, bool] | None = None) -> tuple[list[GroupPlan], bool]:
    """Groups for: `stable` serving with at least `stable_floor` groups in rotation (up to
    `replicas - new groups in rotation`), `new` at `new_target` groups of which up to `new_rotate`
    ready ones are in rotation, revisions in `linger` kept warm (True) while GPUs allow, every other
    revision removed. Returns the groups and whether something was blocked for lack of GPUs."""
    n = md.replicas
    budget = gpu_budget(md)
    layout = _Layout(md, observed, free=budget - gpus_in_use(md, observed), now=now)
    by_revision: dict[str, list[Group]] = {}
    stale: dict[str, list[Group]] = {}
    for g in observed.groups.values():
        (stale if g.stale else by_revision).setdefault(g.revision, []).append(g)
    new_groups = _rank(by_revision.get(new, [])) if new and new != stable else []
    stable_groups = _rank(by_revision.get(stable, []))
    g_new, g_stable = group_gpus(md, observed, new), group_gpus(md, observed, stable)

    new_kept = new_groups[:new_target]
    new_in = min(sum(g.ready for g in new_kept), new_rotate)
    # Stable groups wanted in rotation: keep capacity (replicas - new groups in rotation), so stable
    # groups go as new ones become ready and the surge budget carries the progress. Only when the
    # budget cannot hold even one more new group (and none is loading) does one more stable group
    # make room ahead of time, never below the floor the current weight needs.
    want_stable = min(n, max(stable_floor, n - new_in)) if stable_rotate is None else stable_rotate
    if g_stable:
        want_stable = min(want_stable, max(stable_floor, (budget - len(new_kept) * g_new) // g_stable))
        missing = new_target - len(new_kept)
        loading = any(not g.ready for g in new_kept)
        room_for_one = (budget - (len(new_kept) + 1) * g_new) // g_stable
        if missing > 0 and not loading and want_stable > room_for_one:
            want_stable = max(stable_floor, room_for_one)
    stable_kept = stable_groups[:want_stable]

    # Stable first (capacity), then the new revision. A stable group whose pods do not run its
    # revision's template keeps serving only while its replacement loads (never below one ready
    # group in rotation), and gives way first when the budget has no room for the replacement.
    for g in stable_kept:
        layout.keep(g, stable_track, in_rotation=True)
    ready_kept = sum(g.ready for g in stable_kept)
    covering = [g for g in _rank(stale.get(stable, [])) if g.ready][:max(0, want_stable - ready_kept)]
    for g in covering:
        layout.keep(g, stable_track, in_rotation=True)
    used = [g.replica for g in observed.groups.values() if g.revision == stable]
    for replica in _free_indices(used, want_stable - len(stable_kept)):
        layout.create(stable, replica, stable_track)
    if layout.blocked and covering and ready_kept + len(covering) > 1:
        layout.groups = [p for p in layout.groups if (p.revision, p.replica) != (stable, covering[-1].replica)]
    rotating_new = 0
    for g in new_kept:
        rotate = g.ready and rotating_new < new_rotate
        rotating_new += rotate
        layout.keep(g, new_track, in_rotation=rotate)
    used_new = [g.replica for g in observed.groups.values() if g.revision == new]
    for replica in _free_indices(used_new, new_target - len(new_kept)):
        layout.create(new, replica, new_track)

    kept = {(p.revision, p.replica) for p in layout.groups}
    lingering = []
    for g in observed.groups.values():
        if (g.revision, g.replica) in kept:
            continue
        if (linger or {}).get(g.revision) and not g.stale:
            lingering.append(g)
        else:
            layout.remove(g)
    for g in lingering:
        # Warm groups give way as soon as something else needs their GPUs.
        if layout.blocked:
            layout.remove(g)
        else:
            layout.linger(g)
    # Draining groups are listed last, so the new in-rotation labels are written before old ones go.
    ordered = sorted(layout.groups, key=lambda p: (not p.in_rotation, p.draining))
    return ordered, layout.blocked


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


def _fresh(revision: str, stable: str, strategy: str, now: float, handled: Mapping[str, Any]) -> dict:
    t = iso(now)
    return {"revision": revision, "fromRevision": stable, "strategy": strategy, "stepIndex": 0,
            "startedAt": t, "stepStartedAt": t, "lastProgressAt": t, "readyGroups": 0,
            "handled": dict(handled)}


def _is_new(value: str | None, state: Mapping[str, Any], key: str) -> bool:
    return bool(value) and (state.get("handled") or {}).get(key) != value


def _mark(state: dict, key: str, value: str | None) -> None:
    if value:
        state["handled"] = {**(state.get("handled") or {}), key: value}


def _plan(md: ModelDeployment, revision: str, stable: str | None, groups: list[GroupPlan], state: dict,
          *, rolling: bool, track: str | None, step_index: int | None = None) -> Plan:
    achieved = achieved_weight(groups, revision) if rolling else None
    if rolling:
        state["achievedWeight"] = achieved
    tracks = (names.TRACK_STABLE, track) if rolling and track else (names.TRACK_STABLE,)
    return Plan(revision=revision, stable_revision=stable, groups=tuple(groups), service_tracks=tracks,
                rolling=rolling, canary_weight=achieved if track == names.TRACK_CANARY else None,
                step_index=step_index, rollout_state=state)


def next_step(md: ModelDeployment, observed: Observed, revision: str, now: float,
              verdict: Verdict | None = None, requests: Requests = Requests(),
              options: Options | None = None) -> Plan:
    """The plan for this moment of the rollout of `revision` (pure)."""
    options = options or Options.of(md)
    state = dict(md.status.get("rollout") or {})
    stable = md.status.get("stableRevision") or _infer_stable(observed, revision)

    if stable is None or stable == revision:
        return _steady(md, observed, revision, state, requests, now, options)
    if state.get("revision") != revision:
        # A new rollout (the spec changed, perhaps in the middle of another one: that canary goes).
        state = _fresh(revision, stable, md.rollout.strategy, now, state.get("handled") or {})
        for key, value in (("retry", requests.retry), ("promote", requests.promote),
                           ("promoteFull", requests.promote_full), ("resume", requests.resume)):
            _mark(state, key, value)
    if state.get("aborted"):
        if requests.abort and requests.abort.revision == revision:
            _mark(state, "abort", requests.abort.key)   # moot now: a retry must not meet it again
        if _is_new(requests.retry, state, "retry"):
            state = _fresh(revision, stable, md.rollout.strategy, now, state.get("handled") or {})
            state["retriedAt"] = iso(now)
            _mark(state, "retry", requests.retry)
        else:
            return _aborted(md, observed, revision, stable, state, now, options)

    abort = _abort_reason(md, state, verdict, requests, now, options)
    if abort:
        state["aborted"] = abort
        state["abortedAt"] = iso(now)
        state.pop("paused", None)
        return _aborted(md, observed, revision, stable, state, now, options)
    if md.rollout.strategy == "BlueGreen":
        return _blue_green(md, observed, revision, stable, state, verdict, requests, now, options)
    return _canary(md, observed, revision, stable, state, verdict, requests, now, options)


def _abort_reason(md: ModelDeployment, state: dict, verdict: Verdict | None, requests: Requests,
                  now: float, options: Options) -> dict | None:
    req = requests.abort
    if req and req.revision == state["revision"] and _is_new(req.key, state, "abort"):
        _mark(state, "abort", req.key)
        return req.record(now)
    if verdict and verdict.result == FAIL:
        return {"reason": ABORT_ANALYSIS, "message": verdict.message, "source": "analysis", "at": iso(now),
                "figures": dict(verdict.figures)}
    if verdict and verdict.result == INCONCLUSIVE and options.on_inconclusive == "Abort":
        return {"reason": ABORT_INCONCLUSIVE, "message": verdict.message, "source": "analysis", "at": iso(now)}
    last = epoch(state.get("lastProgressAt")) or now
    if (options.progress_deadline_abort and not state.get("paused") and not state.get("holdingSince")
            and now - last > md.rollout.progress_deadline_seconds):
        return {"reason": ABORT_DEADLINE, "source": "deadline", "at": iso(now),
                "message": f"no progress for {md.rollout.progress_deadline_seconds}s"}
    return None


def _pause_bookkeeping(md: ModelDeployment, state: dict, verdict: Verdict | None, requests: Requests,
                       now: float, options: Options, waiting_by_design: bool) -> bool:
    """Update pauses the operator makes (inconclusive analysis, progress deadline) and the deadline
    clock; True when the rollout must not advance now."""
    if _is_new(requests.resume, state, "resume"):
        state.pop("paused", None)
        state["lastProgressAt"] = iso(now)
        _mark(state, "resume", requests.resume)
    if verdict and verdict.result == INCONCLUSIVE and not state.get("paused"):
        state["paused"] = {"reason": ABORT_INCONCLUSIVE, "message": verdict.message, "at": iso(now)}
    holding = bool(requests.paused or state.get("paused") or waiting_by_design)
    if holding:
        # The deadline does not run while paused: the hold's start is written once, and the clock
        # restarts when it ends (no status write on every resync while a rollout waits).
        state.setdefault("holdingSince", iso(now))
        return bool(requests.paused or state.get("paused"))
    if state.pop("holdingSince", None) is not None:
        state["lastProgressAt"] = iso(now)
    last = epoch(state.get("lastProgressAt")) or now
    deadline = md.rollout.progress_deadline_seconds
    if now - last > deadline:
        state["paused"] = {"reason": ABORT_DEADLINE, "at": iso(now),
                           "message": f"no progress for {deadline}s (e.g. no GPUs for the new groups); "
                                      "kubectl moe resume to keep waiting, abort to give up"}
        state["holdingSince"] = iso(now)
    return bool(state.get("paused"))


def _progress(state: dict, ready_new: int, now: float) -> None:
    if ready_new > int(state.get("readyGroups") or 0):
        state["lastProgressAt"] = iso(now)
    state["readyGroups"] = ready_new


def _weight_at(md: ModelDeployment, index: int) -> int:
    steps = md.rollout.steps
    if index >= len(steps):
        return 100
    weights = [s.set_weight for s in steps[:index + 1] if s.set_weight is not None]
    return weights[-1] if weights else 0


def _canary(md: ModelDeployment, observed: Observed, revision: str, stable: str, state: dict,
            verdict: Verdict | None, requests: Requests, now: float, options: Options) -> Plan:
    steps = md.rollout.steps
    n = md.replicas
    ready_new = sum(g.ready for g in observed.groups_of(revision))
    _progress(state, ready_new, now)

    # Skip steps the user promoted past.
    index = min(int(state.get("stepIndex") or 0), len(steps))
    if _is_new(requests.promote_full, state, "promoteFull"):
        index = len(steps)
        _mark(state, "promoteFull", requests.promote_full)
    if _is_new(requests.promote, state, "promote"):
        index = min(index + 1, len(steps))
        _mark(state, "promote", requests.promote)
        state.pop("paused", None)
    if index != int(state.get("stepIndex") or 0):
        state.update(stepIndex=index, stepStartedAt=iso(now), lastProgressAt=iso(now))

    # Advance through completed steps (several in one pass when nothing needs waiting).
    step_started = epoch(state.get("stepStartedAt")) or now
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
        state.update(stepIndex=index, stepStartedAt=iso(now), lastProgressAt=iso(now))

    analysis_passes = verdict is None or verdict.result == PASS    # no data is never a pass
    if index >= len(steps) and ready_new >= n and analysis_passes and not (requests.paused or state.get("paused")):
        # Every replica runs the new revision, is ready and judged healthy: promote (relabel, no restart).
        return _complete(md, observed, revision, stable, state, now, options.canary_scale_down_delay)

    weight = _weight_at(md, index)
    canary_target, stable_floor = canary_groups_for(weight, n)
    state["weight"] = weight
    groups, blocked = _layout(md, observed, now, stable=stable, stable_track=names.TRACK_STABLE,
                              stable_floor=stable_floor, new=revision, new_track=names.TRACK_CANARY,
                              new_target=canary_target, new_rotate=canary_target)
    state["blockedOnGPUs"] = blocked
    return _plan(md, revision, stable, groups, state, rolling=True, track=names.TRACK_CANARY,
                 step_index=index)


def _blue_green(md: ModelDeployment, observed: Observed, revision: str, stable: str, state: dict,
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

    promoting = bool(state.get("promoting"))
    if not promoting and ready_new >= preview and not state.get("previewReadyAt"):
        state["previewReadyAt"] = iso(now)
    paused = _pause_bookkeeping(md, state, verdict, requests, now, options,
                                waiting_by_design=bool(state.get("previewReadyAt")) and not promoting)
    if not promoting:
        if _is_new(requests.promote, state, "promote") or _is_new(requests.promote_full, state, "promoteFull"):
            promoting = True
        elif (not paused and bg.auto_promotion_seconds is not None and state.get("previewReadyAt")
              and now >= epoch(state["previewReadyAt"]) + bg.auto_promotion_seconds
              and (verdict is None or verdict.result == PASS)):
            promoting = True
        if promoting:
            state.update(promoting=True, promotedAt=iso(now), lastProgressAt=iso(now))
            state.pop("paused", None)
    _mark(state, "promote", requests.promote)
    _mark(state, "promoteFull", requests.promote_full)
    paused = bool(requests.paused or state.get("paused"))

    if promoting and not paused and ready_new >= max(full, 1 if n else 0):
        return _complete(md, observed, revision, stable, state, now, float(bg.scale_down_delay_seconds))
    target = full if promoting else preview
    groups, blocked = _layout(md, observed, now, stable=stable, stable_track=names.TRACK_STABLE,
                              stable_floor=floor, stable_rotate=n, new=revision,
                              new_track=names.TRACK_PREVIEW, new_target=target, new_rotate=0)
    state["blockedOnGPUs"] = blocked
    return _plan(md, revision, stable, groups, state, rolling=True, track=names.TRACK_PREVIEW)


def _complete(md: ModelDeployment, observed: Observed, revision: str, stable: str, state: dict, now: float,
              delay: float) -> Plan:
    """Promotion: the new revision becomes stable; the old one stays warm for `delay` seconds."""
    for key in ("paused", "promoting", "blockedOnGPUs", "weight", "achievedWeight"):
        state.pop(key, None)
    state.update(completedAt=iso(now), previousRevision=stable, scaleDownAt=iso(now + delay),
                 stepIndex=len(md.rollout.steps) if md.rollout.strategy == "Canary" else state.get("stepIndex", 0))
    md_status = {**md.status, "stableRevision": revision, "rollout": state}
    return _steady(_with_status(md, md_status), observed, revision, state, Requests(), now, Options.of(md))


def _with_status(md: ModelDeployment, status: Mapping[str, Any]) -> ModelDeployment:
    return replace(md, status=dict(status))


def _steady(md: ModelDeployment, observed: Observed, revision: str, state: dict, requests: Requests,
            now: float, options: Options) -> Plan:
    """No rollout running: the spec's revision serves; a just-replaced revision stays warm until its
    scale-down time (and an abort of the new revision in that window switches back at once)."""
    n = md.replicas
    if state.get("revision") not in (None, revision) and not state.get("completedAt"):
        state = {"handled": state.get("handled") or {}}      # the spec went back: that rollout is over
    previous = state.get("previousRevision")
    warm_until = epoch(state.get("scaleDownAt"))
    warm = bool(previous and previous != revision and warm_until and now < warm_until)
    if warm and state.get("revision") == revision:
        req = requests.abort
        if req and req.revision == revision and _is_new(req.key, state, "abort"):
            # Rollback of the revision just promoted: the old one is put back, at once where it is
            # still whole and warm, else as fast as the GPU budget allows (status says which).
            previous_ready = sum(g.ready for g in observed.groups_of(previous) if not g.stale)
            _mark(state, "abort", req.key)
            state = {**state, "revision": revision, "fromRevision": previous, "aborted": req.record(now),
                     "abortedAt": iso(now), "rollbackInstant": previous_ready >= n}
            for key in ("completedAt", "previousRevision", "scaleDownAt"):
                state.pop(key, None)
            return _aborted(_with_status(md, {**md.status, "stableRevision": previous}), observed, revision,
                            previous, state, now, options)
    if previous and not warm:
        for key in ("previousRevision", "scaleDownAt"):
            state.pop(key, None)
    groups, _ = _layout(md, observed, now, stable=revision, stable_track=names.TRACK_STABLE, stable_floor=n,
                        stable_rotate=n, linger={previous: True} if warm else None)
    live = observed.groups_of(revision)
    done = len(live) >= n and sum(g.ready for g in live) >= n
    stable_before = md.status.get("stableRevision")
    stable = revision if (done or stable_before == revision) else stable_before
    return _plan(md, revision, stable, groups, state, rolling=False, track=None)


def _aborted(md: ModelDeployment, observed: Observed, revision: str, stable: str, state: dict, now: float,
             options: Options) -> Plan:
    """The new revision out of rotation at once, its pods kept (warm, for a look) for a short delay
    unless stable needs their GPUs; the stable revision back at full size. Only while no group of
    the stable revision is ready (a rollback after a promotion that had already let it go) do the
    aborted revision's ready groups keep serving, giving way one by one as stable groups come back."""
    n = md.replicas
    for key in ("promoting", "weight", "paused", "blockedOnGPUs", "holdingSince"):
        state.pop(key, None)
    aborted_at = epoch(state.get("abortedAt")) or now
    linger = now < aborted_at + options.abort_scale_down_delay
    stable_ready = sum(g.ready for g in observed.groups_of(stable) if not g.stale)
    ready_new = [g for g in observed.groups_of(revision) if g.ready and not g.stale]
    serving = [g for g in ready_new if g.in_rotation]
    if state.get("rollbackInstant") is False and stable_ready == 0 and serving:
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
    if state.get("rollbackInstant") is False and stable_ready < n:
        # Said in status (a condition reason, and so an Event) until the old revision is whole again.
        state["restoring"] = {"readyGroups": stable_ready, "replicas": n,
                              "abortedServing": bool(stable_ready == 0 and serving)}
    else:
        state.pop("restoring", None)
    state["achievedWeight"] = 0
    tracks = (names.TRACK_STABLE,)
    return Plan(revision=revision, stable_revision=stable, groups=tuple(groups), service_tracks=tracks,
                rolling=False, canary_weight=0 if md.rollout.strategy == "Canary" else None,
                step_index=state.get("stepIndex"), rollout_state=state)


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

    at(state.get("scaleDownAt"))
    due.extend(g.drain_until for g in plan.groups if g.drain_until is not None)
    if state.get("abortedAt"):
        at(state["abortedAt"], ABORT_SCALE_DOWN_DELAY_SECONDS)
    steps = md.rollout.steps
    idx = state.get("stepIndex")
    if plan.rolling and idx is not None and idx < len(steps) and steps[idx].is_pause \
            and steps[idx].pause_seconds is not None:
        at(state.get("stepStartedAt"), steps[idx].pause_seconds)
    if plan.rolling and state.get("previewReadyAt") and md.rollout.blue_green.auto_promotion_seconds is not None:
        at(state["previewReadyAt"], md.rollout.blue_green.auto_promotion_seconds)
    if plan.rolling and state.get("lastProgressAt"):
        at(state["lastProgressAt"], md.rollout.progress_deadline_seconds + 0.5)
    future = [t - now for t in due if t > now]
    return max(0.05, min(future)) if future else None

