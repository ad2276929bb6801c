"""The plan: which replica groups should exist, of which revision and track, and which are in rotation.

`plan_groups(md, observed, revision)` is pure. This module's strategy replaces a new revision's groups
one at a time (surge of one group when the GPU budget allows, else remove one old group first); the
rollouts issue swaps in canary / blue-green state machines with the same output, a `Plan`.

Removing a group is two-phase: a group that is in rotation is first planned out of rotation
(`draining`), and only deleted once observed out of rotation, so Services stop sending it traffic
before its pods get SIGTERM.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import names
from .observe import Group, Observed
from .spec import ModelDeployment


@dataclass(frozen=True)
class GroupPlan:
    revision: str
    replica: int
    track: str
    in_rotation: bool
    draining: bool = False


@dataclass(frozen=True)
class Plan:
    revision: str                          # the revision the spec asks for
    stable_revision: str | None            # the revision that last completed a rollout
    groups: tuple[GroupPlan, ...]          # every group that should exist now (draining ones included)
    service_tracks: tuple[str, ...] = (names.TRACK_STABLE,)   # track Services besides <name>
    rolling: bool = False                  # old-revision groups are being replaced
    canary_weight: int | None = None       # percent of in-rotation groups on a canary track
    step_index: int | None = None          # canary step (rollouts issue)
    rollout_state: Mapping[str, Any] = field(default_factory=dict)   # status.rollout (rollouts issue)

    def serving(self) -> list[GroupPlan]:
        return [g for g in self.groups if not g.draining]


def _keep(groups: Iterable[Group], count: int, prefer_revision: str | None = None) -> list[Group]:
    """The `count` groups to keep: ready ones first, then the preferred revision, then low indices."""
    ranked = sorted(groups, key=lambda g: (not g.ready, g.revision != prefer_revision, g.replica))
    return ranked[:max(0, count)]


def _free_indices(used: Iterable[int], count: int) -> list[int]:
    taken, out, i = set(used), [], 0
    while len(out) < count:
        if i not in taken:
            out.append(i)
        i += 1
    return out


def _drain(groups: Iterable[Group], kept: Iterable[Group]) -> list[GroupPlan]:
    kept_keys = {(g.revision, g.replica) for g in kept}
    return [GroupPlan(g.revision, g.replica, g.track, in_rotation=False, draining=True)
            for g in groups if (g.revision, g.replica) not in kept_keys and g.in_rotation]


def canary_weight(groups: Iterable[GroupPlan]) -> int | None:
    in_rotation = [g for g in groups if g.in_rotation]
    canary = [g for g in in_rotation if g.track == names.TRACK_CANARY]
    if not any(g.track == names.TRACK_CANARY for g in groups):
        return None
    return round(100 * len(canary) / len(in_rotation)) if in_rotation else 0


def plan_groups(md: ModelDeployment, observed: Observed, revision: str) -> Plan:
    """Steady state, scaling, and a new revision replacing the old one group at a time."""
    n = md.replicas
    stable_before = md.status.get("stableRevision") or None
    current = observed.groups_of(revision)
    old = [g for g in observed.groups.values() if g.revision != revision]

    if not old:
        kept = _keep(current, n)
        groups = [GroupPlan(revision, g.replica, names.TRACK_STABLE, in_rotation=g.ready) for g in kept]
        groups += [GroupPlan(revision, i, names.TRACK_STABLE, in_rotation=False)
                   for i in _free_indices((g.replica for g in current), n - len(kept))]
        groups += _drain(current, kept)
        done = len(kept) == n and all(g.ready for g in kept)
        return Plan(revision, revision if done else stable_before, tuple(groups))

    ready_new = [g for g in current if g.ready]
    target_new = min(n, len(ready_new) + 1)      # one new group loading at a time
    surge = md.gpus_per_group == 0 or md.surge_gpus >= md.gpus_per_group
    old_budget = n - min(len(ready_new), n) if surge else n - target_new
    kept_old = _keep(old, old_budget, prefer_revision=stable_before)
    # Draining groups still hold their GPUs: a new group waits for them to go.
    draining_old = _drain(old, kept_old)
    room = n + (1 if surge else 0) - len(kept_old) - len(draining_old)
    target_new = min(target_new, max(room, len(ready_new)))
    kept_new = _keep(current, target_new)

    groups = [GroupPlan(g.revision, g.replica, names.TRACK_STABLE, in_rotation=g.ready) for g in kept_old]
    groups += [GroupPlan(revision, g.replica, names.TRACK_CANARY, in_rotation=g.ready) for g in kept_new]
    groups += [GroupPlan(revision, i, names.TRACK_CANARY, in_rotation=False)
               for i in _free_indices((g.replica for g in current), target_new - len(kept_new))]
    groups += draining_old + _drain(current, kept_new)
    tracks = (names.TRACK_STABLE, names.TRACK_CANARY)
    return Plan(revision, stable_before, tuple(groups), service_tracks=tracks, rolling=True,
                canary_weight=canary_weight(groups))
