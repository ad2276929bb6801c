"""One level-based reconcile of one ModelDeployment, reading like the data flow.

spec -> observe (+ each revision's recorded template) -> plan -> desired -> changes -> apply -> status. It never branches on create vs
update, holds no state between calls, and writes nothing when the world already matches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from .analysis import Baselines, provider_for
from .api.reasons import INVALID_SPEC
from .api.spec import ModelDeployment, SpecError
from .apply import StatusConflict, WriteRefused
from .autoscaling import decision as autoscaling
from .autoscaling import signals
from .desired.diff import Changes, changes, desired_objects, with_templates
from .desired.pods import revision_of
from .desired.records import desired_records
from .rollout import progressive
from .status import events_for, invalid_status, status_of, status_patch, with_autoscaling
from .world import revisions
from .world.observe import Observed
from .world.plan import Plan

FORBIDDEN_RETRY_SECONDS = 5.0
CONFLICT_RETRY_SECONDS = 0.5   # the status was computed from an old version: again once the watch has the new one
Emit = Callable[[str, str, str], None]   # (type, reason, message) -> an Event on the ModelDeployment


class Reads(Protocol):
    def observe(self, namespace: str, name: str, pods_per_replica: int) -> Observed: ...


class Writes(Protocol):
    def write(self, namespace: str, changes: Changes) -> None: ...
    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any],
                     resource_version: str | None = None) -> Mapping[str, Any] | None: ...
    def scale(self, namespace: str, name: str, replicas: int) -> str | None: ...
    def read(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class Outcome:
    changes: Changes = Changes()
    status_patch: Mapping[str, Any] = field(default_factory=dict)
    plan: Plan | None = None
    written: Mapping[str, Any] | None = None    # the object as returned by the status write
    report: progressive.Report = progressive.Report()   # rollbacks and promotions, for the metrics
    requeue_after: float | None = None          # seconds until a timed decision (rollout, autoscaler) is due
    scaling: autoscaling.Decision | None = None  # the autoscaler's decision, when it sampled this pass

    @property
    def wrote(self) -> bool:
        return bool(self.changes or self.status_patch)


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(body: Mapping[str, Any], reader: Reads, writer: Writes, emit: Emit, baselines: Baselines,
              now: Callable[[], str] = utcnow, clock: Callable[[], float] = time.time,
              analysis_provider=provider_for, collect_signal=signals.collect) -> Outcome:
    """One pass for one ModelDeployment. `baselines`: the analysis memos of this operator process
    (the controller owns them; they live as long as it does)."""
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace", "default"), meta.get("name", "")
    old_status = body.get("status") or {}
    generation = int(meta.get("generation") or 0)
    version = meta.get("resourceVersion")    # the status below is computed from this version of the object
    try:
        md = ModelDeployment.from_body(body)
    except SpecError as error:
        new_status = invalid_status(old_status, generation, INVALID_SPEC, str(error), now())
        return _finish(namespace, name, old_status, new_status, writer, emit, version, generation)

    observed = reader.observe(md.namespace, md.name, md.pods_per_replica)
    legacy = (old_status.get("rollout") or {}).get("templates") or {}   # kept by operators before 0.2
    templates = revisions.templates(md, observed.revisions, legacy)
    observed = with_templates(observed, templates)
    scaling = autoscaling.step(md, observed, clock(), collect_signal)
    if scaling and scaling.desired != md.replicas:
        # Through the scale subresource, like kubectl scale or an HPA; this pass plans with it already.
        version = writer.scale(md.namespace, md.name, scaling.desired) or version
        generation += 1
        emit("Normal", "SuccessfulRescale", f"New size: {scaling.desired} (was {md.replicas}); "
                                           f"{scaling.decision.reason}: {scaling.decision.message}")
        md = replace(md, replicas=scaling.desired)
    revision = revision_of(md)
    plan = progressive.next_plan(md, body, observed, revision, clock(), analysis_provider, baselines)
    in_use = {p.revision for p in observed.pods if p.live} | {g.revision for g in plan.groups}
    records = desired_records(md, body.get("spec") or {}, meta.get("annotations") or {}, revision,
                                        plan.stable_revision, plan.rollout_state, observed.revisions, in_use,
                                        now(), legacy)
    todo = changes(desired_objects(md, plan, observed, templates, records, clock()), observed)
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
        outcome = _finish(namespace, name, old_status, new_status, writer, emit, version, generation)
        # Nothing counts as applied: the refusal is in status (Degraded) and in the operator's log.
        # A Forbidden can clear by itself (a quota freed, RBAC fixed, or an API server that has not yet
        # refreshed its RESTMapper after the CRD was installed): try again soon, not at the resync.
        retry = FORBIDDEN_RETRY_SECONDS if refused.reason == "Forbidden" else outcome.requeue_after
        return Outcome(Changes(), outcome.status_patch, plan, outcome.written, requeue_after=retry)
    report, plan = progressive.after_write(md, plan, moved_at or clock())
    new_status = with_autoscaling(status_of(md, observed, plan, now()), md, scaling and scaling.state, now())
    outcome = _finish(namespace, name, old_status, new_status, writer, emit, version, generation)
    due = [t for t in (progressive.due_in(md, plan, clock(), baselines), scaling and scaling.next_in,
                       outcome.requeue_after) if t is not None]
    return Outcome(todo, outcome.status_patch, plan, outcome.written, report, min(due) if due else None,
                   scaling and scaling.decision)


def _finish(namespace: str, name: str, old_status: Mapping[str, Any], new_status: Mapping[str, Any],
            writer: Writes, emit: Emit, version: str | None, generation: int) -> Outcome:
    """Write the status, only onto the version of the object it was computed from; then the Events
    of its transitions. On a conflict the object is read once: if only its metadata moved on (kopf's
    bookkeeping, an annotation; same spec generation, same status) the status still holds and is
    written onto the new version (the autoscaler's decision must not be lost); if the spec or the
    status changed (a user's edit, a second writer), nothing is written and the pass runs again on
    the newer object."""
    patch = status_patch(old_status, new_status)
    try:
        written = writer.patch_status(namespace, name, patch, version) if patch else None
    except StatusConflict:
        now = writer.read(namespace, name)
        meta = (now or {}).get("metadata") or {}
        if now is None or int(meta.get("generation") or 0) != generation or (now.get("status") or {}) != old_status:
            return Outcome(requeue_after=CONFLICT_RETRY_SECONDS)
        try:
            written = writer.patch_status(namespace, name, patch, meta.get("resourceVersion"))
        except StatusConflict:
            return Outcome(requeue_after=CONFLICT_RETRY_SECONDS)
    for event in events_for(old_status, new_status):
        emit(*event)
    return Outcome(status_patch=patch, written=written)
