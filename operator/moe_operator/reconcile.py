"""One level-based reconcile of one ModelDeployment, reading like the data flow.

spec -> observe -> plan -> desired -> changes -> apply -> status. It never branches on create vs
update, holds no state between calls, and writes nothing when the world already matches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from . import progressive
from .analysis import provider_for
from .apply import WriteRefused
from .desired import Changes, changes, desired_objects
from .observe import Observed
from .plan import Plan
from .pods import revision_of
from .spec import ModelDeployment, SpecError
from .status import INVALID_SPEC, events_for, invalid_status, status_of, status_patch

Emit = Callable[[str, str, str], None]   # (type, reason, message) -> an Event on the ModelDeployment


class Reads(Protocol):
    def observe(self, namespace: str, name: str, pods_per_replica: int) -> Observed: ...


class Writes(Protocol):
    def write(self, namespace: str, changes: Changes) -> None: ...
    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class Outcome:
    changes: Changes = Changes()
    status_patch: Mapping[str, Any] = field(default_factory=dict)
    plan: Plan | None = None
    written: Mapping[str, Any] | None = None    # the object as returned by the status write
    report: progressive.Report = progressive.Report()   # rollbacks and promotions, for the metrics
    requeue_after: float | None = None          # seconds until a timed rollout decision is due

    @property
    def wrote(self) -> bool:
        return bool(self.changes or self.status_patch)


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(body: Mapping[str, Any], reader: Reads, writer: Writes, emit: Emit,
              now: Callable[[], str] = utcnow, clock: Callable[[], float] = time.time,
              analysis_provider=provider_for) -> Outcome:
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace", "default"), meta.get("name", "")
    old_status = body.get("status") or {}
    generation = int(meta.get("generation") or 0)
    try:
        md = ModelDeployment.from_body(body)
    except SpecError as error:
        new_status = invalid_status(old_status, generation, INVALID_SPEC, str(error), now())
        return _finish(namespace, name, old_status, new_status, writer, emit)

    observed = reader.observe(md.namespace, md.name, md.pods_per_replica)
    plan = progressive.next_plan(md, body, observed, revision_of(md), clock(), analysis_provider)
    todo = changes(desired_objects(md, plan, observed), observed)
    moved_at = None
    try:
        # Traffic moves first (relabels: a canary out of rotation at once), then the rest (new pods,
        # Services, deletes); the time traffic moved is what a rollback's latency is measured to.
        for part in todo.traffic_first():
            if part:
                writer.write(md.namespace, part)
            moved_at = moved_at or clock()
    except WriteRefused as refused:
        new_status = invalid_status(old_status, generation, refused.reason, refused.message, now())
        outcome = _finish(namespace, name, old_status, new_status, writer, emit)
        return Outcome(todo, outcome.status_patch, plan, outcome.written)
    report = progressive.after_write(md, plan, moved_at or clock())
    new_status = status_of(md, observed, plan, now())
    outcome = _finish(namespace, name, old_status, new_status, writer, emit)
    return Outcome(todo, outcome.status_patch, plan, outcome.written, report,
                   progressive.due_in(md, plan, clock()))


def _finish(namespace: str, name: str, old_status: Mapping[str, Any], new_status: Mapping[str, Any],
            writer: Writes, emit: Emit) -> Outcome:
    patch = status_patch(old_status, new_status)
    written = writer.patch_status(namespace, name, patch) if patch else None
    for event in events_for(old_status, new_status):
        emit(*event)
    return Outcome(status_patch=patch, written=written)
