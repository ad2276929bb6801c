"""What users (`kubectl moe`) and alerts (`/alerts`) ask of a rollout: annotations on the
ModelDeployment, read into `Requests`. The operator never removes them and acts on each value once
(it remembers handled values in status.rollout.handled)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api import names
from ..api.reasons import ABORT_USER
from ..api.timestamps import epoch, iso

# Annotations users (kubectl moe) and the /alerts webhook write; the operator never removes them and
# acts on each value once (it remembers handled values in status.rollout.handled).
ANNOTATION_ABORT = f"{names.PREFIX}/abort"            # JSON: revision, reason, message, at, source, labels
ANNOTATION_PROMOTE = f"{names.PREFIX}/promote"        # timestamp: skip the current step / promote preview
ANNOTATION_PROMOTE_FULL = f"{names.PREFIX}/promote-full"   # timestamp: skip every remaining step
ANNOTATION_RETRY = f"{names.PREFIX}/retry"            # timestamp: roll the aborted revision out again
ANNOTATION_PAUSED = f"{names.PREFIX}/paused"          # "true" while paused by hand
ANNOTATION_RESUME = f"{names.PREFIX}/resume"          # timestamp: clears a pause the operator made

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
