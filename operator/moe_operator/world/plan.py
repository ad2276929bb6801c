"""The plan: which replica groups should exist, of which revision and track, and which are in rotation.

`rollout.next_step(...)` makes it (steady state, scaling, canary and blue-green rollouts).

Removing a group is two-phase: a group that is in rotation is first planned out of rotation
(`draining`), and only deleted once it has been out of rotation for the drain period
(`spec.runtime.drainSeconds`), so every proxy has stopped sending it traffic before its pods get
SIGTERM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..api import names
from .state import RolloutState


@dataclass(frozen=True)
class GroupPlan:
    revision: str
    replica: int
    track: str
    in_rotation: bool
    draining: bool = False
    drain_until: float | None = None       # a draining group is deleted from then on (operator's clock)


@dataclass(frozen=True)
class Plan:
    revision: str                          # the revision the spec asks for
    stable_revision: str | None            # the revision that last completed a rollout
    groups: tuple[GroupPlan, ...]          # every group that should exist now (draining ones included)
    service_tracks: tuple[str, ...] = (names.TRACK_STABLE,)   # track Services besides <name>
    rolling: bool = False                  # old-revision groups are being replaced
    canary_weight: int | None = None       # percent of in-rotation groups on a canary track
    step_index: int | None = None          # canary step
    rollout_state: RolloutState = field(default_factory=RolloutState)   # status.rollout
    # status.groupRestarts: re-creations in a row of a revision's groups (rollout/restarts.py)
    restarts: tuple[Any, ...] = ()
    backoff: str | None = None             # what waits out a back-off now, for Degraded
