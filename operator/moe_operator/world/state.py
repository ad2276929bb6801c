"""The rollout state, typed: what `status.rollout` holds, field by field.

All of a rollout's state lives in the ModelDeployment's status (the operator can be killed at any
moment and resumes), so this dataclass is read from that JSON at the start of a reconcile and
written back at its end. It serialises to the same JSON as before it was typed (camelCase keys,
absent fields left out), so the CRD and every reader of `status.rollout` are unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join("GPUs" if part == "gpus" else part.title() for part in rest)


@dataclass
class RolloutState:
    """status.rollout. Times are RFC 3339 strings (api/timestamps.py); None means absent."""

    revision: str | None = None                 # the revision being rolled out (or last rolled out)
    from_revision: str | None = None            # the stable revision it started from
    strategy: str | None = None                 # Canary | BlueGreen
    step_index: int | None = None               # canary step
    started_at: str | None = None
    step_started_at: str | None = None
    last_progress_at: str | None = None         # the progress deadline counts from here
    holding_since: str | None = None            # paused or waiting by design since (deadline stopped)
    ready_groups: int | None = None             # ready groups of the new revision last seen
    weight: int | None = None                   # the current step's weight
    achieved_weight: int | None = None          # the weight the groups in rotation give
    blocked_on_gpus: bool | None = None         # something wanted did not fit maxSurgeGPUs
    paused: dict[str, Any] | None = None        # {reason, message, at}: a pause the operator made
    promoting: bool | None = None               # blue-green: scaling to full size for the switch
    promoted_at: str | None = None
    preview_ready_at: str | None = None
    retried_at: str | None = None
    aborted: dict[str, Any] | None = None       # {reason, message, source, at, labels[, figures]}
    aborted_at: str | None = None
    out_of_rotation_at: str | None = None       # when the aborted revision left rotation
    rollback_instant: bool | None = None        # an abort after promotion: was the old revision whole?
    restoring: dict[str, Any] | None = None     # {readyGroups, replicas, abortedServing} until it is
    completed_at: str | None = None
    previous_revision: str | None = None        # kept warm until scale_down_at
    scale_down_at: str | None = None
    analysis: dict[str, Any] | None = None      # the analysis' counts and last results
    handled: dict[str, str] | None = None       # one-off requests acted on: {kind: value or id}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RolloutState:
        """From status.rollout (keys this version does not know are dropped)."""
        data = data or {}
        return cls(**{f.name: copy.deepcopy(data[_KEYS[f.name]]) for f in fields(cls) if _KEYS[f.name] in data})

    def to_json(self) -> dict[str, Any]:
        return {_KEYS[f.name]: copy.deepcopy(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def copy(self) -> RolloutState:
        return RolloutState.from_json(self.to_json())

    def clear(self, *names: str) -> None:
        """Forget these fields (snake_case names)."""
        for name in names:
            setattr(self, name, None)

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


_KEYS = {f.name: _camel(f.name) for f in fields(RolloutState)}
