"""The built-in autoscaler of replica groups as one pure function: `decide(...) -> Decision`.

Inputs: the autoscaling settings, the signal measured now (moe_operator.autoscaling.signals), the capacity as
the autoscaler sees it (`capacity_of(md, observed, now)`: ready groups in rotation, groups still
loading, groups the scheduler cannot place), the rollout as it stands, the autoscaler's previous
state (`status.autoscaling`, JSON-able) and the time. Output: the replica count to ask for, why,
whether scaling is limited (`ScalingLimited`), the stable/canary split during a canary, and the next
state. Nothing here does I/O, so every rule is unit-tested over simulated time.

How a count is reached:
1. Pressure `p`: the load in replica groups' worth, from ready groups only (a loading group is no
   capacity). requestsWaiting uses a queueing model rather than HPA's proportional rule, because a
   queue is empty whenever capacity suffices, and "0 waiting" says nothing about how many groups
   could go: with `L` requests in the system (running + waiting) and `S` requests a group runs at
   once (learned from groups that have a queue), `p = L / (S + target)`: the fewest groups that keep
   at most `target` requests waiting per group. kvCacheUsage and PromQL are proportional (HPA's rule,
   `p = sum / target`). ttftP99 scales up proportionally (`ready x ttft / target`); latency is not
   linear in load, so it scales down from the load per group at which TTFT last broke its target
   (`p = L / that`), or one group at a time until it has seen that.
2. Recommendation, with hysteresis (`tolerance`): up to `ceil(p)` when `p > current x (1 + tol)`,
   down to `ceil(p x (1 + tol))` when that is below `current` (the headroom means the smaller count
   does not immediately look overloaded), else `current`. Clamped to [minReplicas, maxReplicas].
3. Stabilisation as HPA's `behavior`: recommendations are kept over the windows; a scale-up takes the
   lowest recommendation of the scale-up window (it must be sustained), a scale-down the highest of
   the scale-down window (the safe side).
4. Cold start: while groups load (within `coldStartAllowance` of their creation) nothing more is
   added unless the pressure keeps rising beyond the pressure of the last scale-up.
5. GPU shortage: with a group the scheduler cannot place, the autoscaler asks for no more and says
   `ScalingLimited`/`InsufficientGPUCapacity`.
6. Rollouts: the count is the steady-state size; the rollout planner splits it by the canary weight
   (`rollout.canary_groups_for`, reported in `split`), so stable and canary scale in proportion, the
   GPU budget (`replicas x GPUs per group + maxSurgeGPUs`) follows the count, and an aborted canary
   gets nothing. `duringRollout: Freeze` holds the count while a rollout (and its analysis) runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..api import names
from ..api.reasons import (
    ABOVE_MAX,
    BELOW_MIN,
    DOWN_STABILIZING,
    FROZEN,
    INSUFFICIENT_GPU,
    NO_SIGNAL,
    SCALE_DOWN,
    SCALE_UP,
    TOO_FEW,
    TOO_MANY,
    UNSCHEDULABLE,
    UP_STABILIZING,
    WAITING_FOR_LOADING,
    WITHIN_RANGE,
    WITHIN_TOLERANCE,
)
from ..api.timestamps import epoch, iso
from ..rollout.layout import canary_groups_for
from ..world.observe import Observed
from ..world.state import RolloutState

# Metrics (spec.autoscaling.metric).
REQUESTS_WAITING, KV_CACHE_USAGE, TTFT_P99, PROMQL = "requestsWaiting", "kvCacheUsage", "ttftP99", "PromQL"
FOLLOW, FREEZE = "Follow", "Freeze"

# Decision reasons (status.autoscaling.lastDecision.reason, the operator's decision metric label).

# ScalingLimited reasons (HPA's, plus the GPU ones).

DEFAULT_INTERVAL_SECONDS = 15.0
DEFAULT_TOLERANCE = 0.1
DEFAULT_COLD_START_SECONDS = 600.0
_EPS = 1e-9


# --- inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """spec.autoscaling as the decision reads it (fields newer than the typed spec via getattr)."""

    min_replicas: int = 1
    max_replicas: int = 1
    metric: str = REQUESTS_WAITING
    target: float = 4.0
    query: str | None = None
    scale_up_window: float = 0.0
    scale_down_window: float = 300.0
    interval: float = DEFAULT_INTERVAL_SECONDS
    tolerance: float = DEFAULT_TOLERANCE
    cold_start_allowance: float = DEFAULT_COLD_START_SECONDS
    during_rollout: str = FOLLOW
    prometheus_url: str | None = None

    @classmethod
    def of(cls, spec) -> Settings:
        """From the typed spec (moe_operator.spec.AutoscalingSpec)."""
        prom = getattr(spec, "prometheus", None) or {}
        return cls(
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            metric=spec.metric,
            target=float(spec.target),
            query=spec.query,
            scale_up_window=float(spec.scale_up_stabilization_seconds),
            scale_down_window=float(spec.scale_down_stabilization_seconds),
            interval=float(getattr(spec, "interval_seconds", DEFAULT_INTERVAL_SECONDS)),
            tolerance=float(getattr(spec, "tolerance", DEFAULT_TOLERANCE)),
            cold_start_allowance=float(getattr(spec, "cold_start_allowance_seconds", DEFAULT_COLD_START_SECONDS)),
            during_rollout=getattr(spec, "during_rollout", FOLLOW),
            prometheus_url=prom.get("url") if isinstance(prom, Mapping) else None,
        )

    @property
    def history_seconds(self) -> float:
        return max(self.scale_up_window, self.scale_down_window)


@dataclass(frozen=True)
class Signal:
    """One measurement (moe_operator.autoscaling.signals). `value` is what status shows against the target: waiting
    requests per group, mean KV-cache use (0..1), p99 TTFT in ms, or the PromQL query's value.
    `groups` is how many ready groups it covers; `running`/`waiting` are totals over them."""

    metric: str
    value: float | None = None
    groups: int = 0
    running: float | None = None
    waiting: float | None = None
    saturated_slots: float | None = None    # running requests per group among groups with a queue
    total: float | None = None              # sum over groups (kvCacheUsage); the query's value (PromQL)
    source: str = "scrape"
    error: str | None = None

    @property
    def load(self) -> float | None:
        """Requests in the system (running + waiting), when known."""
        if self.running is None or self.waiting is None:
            return None
        return self.running + self.waiting

    @property
    def usable(self) -> bool:
        return self.error is None and self.value is not None and (self.groups > 0 or self.metric == PROMQL)


@dataclass(frozen=True)
class Capacity:
    """Replica groups as the autoscaler counts them."""

    current: int                     # groups the spec asks for now (spec.replicas)
    ready: int = 0                   # ready and in rotation: the capacity that serves
    loading: int = 0                 # scheduled, starting or loading the model, within the allowance
    pending: int = 0                 # a pod the scheduler cannot place
    pending_reason: str | None = None    # InsufficientGPUCapacity | Unschedulable
    pending_message: str = ""


@dataclass(frozen=True)
class RolloutView:
    """What the autoscaler needs to know of the rollout (from status.rollout)."""

    active: bool = False             # a new revision is rolling in (analysis runs)
    weight: int | None = None        # canary weight (percent) of the current step
    aborted: bool = False

    @classmethod
    def of(cls, status: Mapping[str, Any], strategy: str = "Canary") -> RolloutView:
        state = RolloutState.from_json(status.get("rollout"))
        revision = state.revision
        aborted = bool(state.aborted)
        active = bool(revision) and not aborted and not state.completed_at \
            and revision != status.get("stableRevision")
        weight = state.weight if strategy == "Canary" and active else None
        return cls(active=active, weight=int(weight) if weight is not None else None, aborted=aborted)


def _created(pod_body: Mapping[str, Any]) -> float | None:
    return epoch((pod_body.get("metadata") or {}).get("creationTimestamp"))


def capacity_of(current: int, observed: Observed, now: float, gpu_resource: str = "nvidia.com/gpu",
                cold_start_allowance: float = DEFAULT_COLD_START_SECONDS,
                exclude_revisions: Iterable[str] = ()) -> Capacity:
    """Pure: count ready in-rotation groups, loading groups (younger than the allowance) and groups
    the scheduler cannot place. Groups of `exclude_revisions` (an aborted canary) and preview groups
    (not capacity until a switch) neither serve nor hold scale-ups back."""
    excluded = set(exclude_revisions)
    ready = loading = pending = 0
    short, messages = False, []
    for g in observed.groups.values():
        pods = list(g.pods.values())
        if g.ready and g.in_rotation:
            ready += 1
            continue
        if g.revision in excluded or g.ready:
            continue
        unschedulable = [p.unschedulable for p in pods if p.unschedulable]
        if unschedulable:
            pending += 1
            short = short or any(f"Insufficient {gpu_resource}" in m for m in unschedulable)
            messages.append(unschedulable[0])
            continue
        if g.track == names.TRACK_PREVIEW or any(p.failure for p in pods):
            continue
        created = [t for t in (_created(p.body) for p in pods) if t is not None]
        if not created or now - min(created) < cold_start_allowance:
            loading += 1
    reason = (INSUFFICIENT_GPU if short else UNSCHEDULABLE) if pending else None
    return Capacity(current=current, ready=ready, loading=loading, pending=pending, pending_reason=reason,
                    pending_message=messages[0] if messages else "")


# --- output --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    current: int
    desired: int
    reason: str
    message: str
    state: dict[str, Any]
    limited: tuple[str, str] | None = None        # ScalingLimited=True (reason, message)
    split: tuple[int, int] | None = None          # (stable, canary) groups in rotation during a canary
    recommendation: int | None = None             # this sample's recommendation before the windows
    pressure: float | None = None

    @property
    def scales(self) -> bool:
        return self.desired != self.current

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "none"


def due(settings: Settings, state: Mapping[str, Any] | None, now: float) -> bool:
    """Whether a new sample (and decision) is due."""
    last = (state or {}).get("lastSampleAt")
    return last is None or now - float(last) >= settings.interval - 1e-3


def next_sample_in(settings: Settings, state: Mapping[str, Any] | None, now: float) -> float:
    last = (state or {}).get("lastSampleAt")
    return 0.0 if last is None else max(0.0, float(last) + settings.interval - now)


# --- the decision --------------------------------------------------------------------------------

def _ceil(x: float) -> int:
    return max(0, math.ceil(x - 1e-6))


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _groups(n: int) -> str:
    return f"{n} group{'' if n == 1 else 's'}"


def pressure(settings: Settings, signal: Signal, capacity: Capacity, state: Mapping[str, Any]
             ) -> tuple[float | None, dict[str, Any], bool]:
    """The load in groups' worth (None: no usable signal), what was learned (slots per group, the
    load per group where TTFT broke its target), and whether only a one-group step down is safe."""
    learned: dict[str, Any] = {}
    if not signal.usable:
        return None, learned, False
    target, g = settings.target, max(signal.groups, 1)
    if settings.metric == REQUESTS_WAITING:
        load = signal.load
        if load is None:
            return g * signal.value / target, learned, False
        slots = signal.saturated_slots or state.get("slotsPerReplica")
        if signal.saturated_slots:
            learned["slotsPerReplica"] = round(signal.saturated_slots, 3)
        if not slots:
            # No group has had a queue: what runs per group is a lower bound of its slots, so the
            # estimate errs on the side of more groups.
            slots = max((signal.running or 0.0) / g, 1.0)
        return load / (float(slots) + target), learned, False
    if settings.metric == KV_CACHE_USAGE:
        total = signal.total if signal.total is not None else signal.value * g
        return total / target, learned, False
    if settings.metric == PROMQL:
        return signal.value / target, learned, False
    # ttftP99 (value and target in ms).
    load = signal.load
    if signal.value > target:
        if load is not None and load > 0:
            learned["loadPerReplicaAtTarget"] = round(load / g * target / signal.value, 3)
        return g * signal.value / target, learned, False
    knee = state.get("loadPerReplicaAtTarget")
    if knee and load is not None:
        return load / float(knee), learned, False
    return g * signal.value / target, learned, True


def recommend(settings: Settings, p: float, current: int, step_down_only: bool = False) -> int:
    """This sample's recommendation from the pressure, with the tolerance band as hysteresis."""
    tol = settings.tolerance
    if p > current * (1 + tol) + _EPS:
        return _ceil(p)
    down = _ceil(p * (1 + tol))
    if down < current:
        return max(down, current - 1) if step_down_only else down
    return current


def _compress(history: list[list[float]]) -> list[list[float]]:
    """Drop recommendations that can never be a window's min or max again: an entry with a newer one
    at least as high (outlives it for the max) and a newer one at least as low (for the min)."""
    kept: list[list[float]] = []
    hi, lo = -math.inf, math.inf
    for t, n in reversed(history):
        if not (hi >= n and lo <= n):
            kept.append([t, n])
        hi, lo = max(hi, n), min(lo, n)
    return list(reversed(kept))


def stabilize(settings: Settings, history: list[list[float]], rec: int, current: int, now: float
              ) -> tuple[int, list[list[float]]]:
    """HPA's stabilisation: the lowest recommendation of the scale-up window bounds a scale-up, the
    highest of the scale-down window bounds a scale-down. Returns the count and the kept history."""
    history = [[t, n] for t, n in history if now - t <= settings.history_seconds + _EPS]
    # The recommendation of this sample always counts (its stored time is rounded).
    up = min([rec] + [n for t, n in history if now - t <= settings.scale_up_window + _EPS])
    down = max([rec] + [n for t, n in history if now - t <= settings.scale_down_window + _EPS])
    history.append([round(now, 3), rec])
    desired = current
    if desired < up:
        desired = up
    if desired > down:
        desired = down
    return int(desired), _compress(history)


def _clamp(settings: Settings, n: int) -> int:
    return max(settings.min_replicas, min(settings.max_replicas, n))


def decide(settings: Settings, signal: Signal, capacity: Capacity, state: Mapping[str, Any] | None, now: float,
           rollout: RolloutView = RolloutView()) -> Decision:
    """The replica count to ask for now (pure). Call when `due()`; between samples keep the last."""
    prev = dict(state or {})
    current = capacity.current
    history = [list(e) for e in prev.get("recommendations") or []]
    s: dict[str, Any] = {k: prev[k] for k in ("slotsPerReplica", "loadPerReplicaAtTarget", "coldStart",
                                              "lastScaleTime", "lastDecision") if k in prev}
    s.update(metric=settings.metric, target=settings.target, lastSampleAt=round(now, 3),
             readyReplicas=capacity.ready, loadingReplicas=capacity.loading, pendingReplicas=capacity.pending,
             source=signal.source)
    if signal.value is not None:
        s["currentValue"] = round(signal.value, 4)

    p, learned, step_down_only = pressure(settings, signal, capacity, prev)
    s.update(learned)
    limited: tuple[str, str] | None = None
    rec: int | None = None
    raw: int | None = None
    what = f"{settings.metric} {_fmt(signal.value)}" + (" per group" if settings.metric == REQUESTS_WAITING else "") \
        + f" (target {_fmt(settings.target)}) on {_groups(signal.groups)}"

    if current < settings.min_replicas or current > settings.max_replicas:
        # Outside the bounds (a manual scale, new bounds): back inside at once, whatever the windows.
        desired = _clamp(settings, current)
        reason = BELOW_MIN if current < settings.min_replicas else ABOVE_MAX
        message = f"{current} outside [{settings.min_replicas}, {settings.max_replicas}]: {desired}"
        s["recommendations"] = [[round(now, 3), desired]]
    elif p is None:
        desired, reason = current, NO_SIGNAL
        message = f"no usable {settings.metric} signal ({signal.error or 'no ready group in rotation answered'}); " \
                  f"keeping {_groups(current)}"
        s["recommendations"] = [e for e in history if now - e[0] <= settings.history_seconds + _EPS]
    else:
        s["pressure"] = round(p, 3)
        raw = recommend(settings, p, current, step_down_only)
        rec = _clamp(settings, raw)
        desired, s["recommendations"] = stabilize(settings, history, rec, current, now)
        if desired > current:
            reason, message = SCALE_UP, f"{what}: {_groups(desired)}"
        elif desired < current:
            reason, message = SCALE_DOWN, f"{what}: {_groups(desired)}"
        elif rec > current:
            reason = UP_STABILIZING
            message = f"{what} asks for {_groups(rec)}; waiting for it to hold over {settings.scale_up_window:g}s"
        elif rec < current:
            reason = DOWN_STABILIZING
            message = (f"{what} allows {_groups(rec)}; keeping {_groups(current)} for the "
                       f"{settings.scale_down_window:g}s scale-down window")
        else:
            reason, message = WITHIN_TOLERANCE, f"{what}: {_groups(current)} fit"

        # Cold start: while groups load, add more only if the pressure keeps rising.
        cold = s.get("coldStart")
        if capacity.loading > 0 and desired > current:
            reference = cold.get("pressure") if cold else None
            if reference is not None and p > reference * (1 + settings.tolerance) + _EPS:
                message += f" (still rising while {_groups(capacity.loading)} load)"
            else:
                desired, reason = current, WAITING_FOR_LOADING
                message = f"{what}: {_groups(capacity.loading)} still loading; waiting for them before adding more"
                if reference is None:
                    s["coldStart"] = {"pressure": round(p, 3), "at": iso(now)}
        elif capacity.loading == 0:
            s.pop("coldStart", None)

    # GPU shortage: a group the scheduler cannot place means no more are asked for.
    if capacity.pending > 0 and desired >= current:
        why = capacity.pending_reason or UNSCHEDULABLE
        detail = f"{_groups(capacity.pending)} cannot be scheduled" + \
                 (f": {capacity.pending_message}" if capacity.pending_message else "")
        if desired > current or (rec is not None and rec > current):
            message = f"{what} asks for more, but {detail}; not asking for more"
            reason = why
        desired = current
        limited = (why, detail)

    if rollout.active and settings.during_rollout == FREEZE and desired != current \
            and settings.min_replicas <= current <= settings.max_replicas:
        desired, reason = current, FROZEN
        message = f"{message}; frozen while the rollout runs (duringRollout: Freeze)"

    if limited is None and raw is not None:
        if raw > settings.max_replicas:
            limited = (TOO_MANY, f"the signal asks for {_groups(raw)}, maxReplicas is {settings.max_replicas}")
        elif raw < settings.min_replicas:
            limited = (TOO_FEW, f"the signal asks for {_groups(raw)}, minReplicas is {settings.min_replicas}")

    if desired > current:
        s["coldStart"] = {"pressure": round(p if p is not None else 0.0, 3), "at": iso(now)}
    if desired != current:
        s["lastScaleTime"] = iso(now)
        s["lastDecision"] = {"at": iso(now), "from": current, "to": desired, "reason": reason, "message": message}
    s.update(desiredReplicas=desired, reason=reason, message=message)
    if limited:
        s["limited"] = {"reason": limited[0], "message": limited[1]}

    split = None
    if rollout.aborted:
        split = (desired, 0)             # an aborted canary is never scaled up
    elif rollout.active and rollout.weight is not None:
        canary, stable = canary_groups_for(rollout.weight, desired)
        split = (stable, canary)
    if split:
        s["split"] = {"stable": split[0], "canary": split[1]}
    return Decision(current=current, desired=desired, reason=reason, message=message, state=s, limited=limited,
                    split=split, recommendation=rec, pressure=p)


# --- at the reconcile's edge ---------------------------------------------------------------------



@dataclass(frozen=True)
class Step:
    """What the reconcile does with the autoscaler this pass."""

    desired: int                          # the replica count to ask for (spec.replicas when not due)
    state: dict[str, Any]                 # status.autoscaling
    next_in: float                        # seconds until the next sample
    decision: Decision | None = None      # None: no sample this pass (the last state stands)


Collect = Callable[..., tuple[Signal, dict[str, Any]]]   # moe_operator.signals.collect


def step(md, observed: Observed, now: float, collect: Collect) -> Step | None:
    """Sample and decide when due (the signal's I/O is `collect`'s); None when autoscaling is off."""
    if md.autoscaling is None:
        return None
    settings = Settings.of(md.autoscaling)
    prev = dict(md.status.get("autoscaling") or {})
    if not due(settings, prev, now):
        return Step(md.replicas, prev, next_sample_in(settings, prev, now))
    rollout_state = RolloutState.from_json(md.status.get("rollout"))
    aborted = [rollout_state.revision] if rollout_state.aborted and rollout_state.revision else []
    capacity = capacity_of(md.replicas, observed, now, md.resources.gpu_resource, settings.cold_start_allowance,
                           exclude_revisions=aborted)
    signal, memory = collect(settings, md.namespace, md.name, observed, prev.get("signalMemory"))
    decision = decide(settings, signal, capacity, prev, now, RolloutView.of(md.status, md.rollout.strategy))
    state = dict(decision.state)
    if memory:
        state["signalMemory"] = memory
    return Step(decision.desired, state, settings.interval, decision)


def limited_condition(state: Mapping[str, Any]) -> tuple[bool, str, str]:
    """ScalingLimited (status, reason, message) from status.autoscaling."""
    limited = state.get("limited")
    if limited:
        return True, limited.get("reason", UNSCHEDULABLE), limited.get("message", "")
    desired = state.get("desiredReplicas")
    return False, WITHIN_RANGE, f"the desired count {desired} is within the bounds and schedulable" \
        if desired is not None else "no decision yet"
