"""The revision records (ControllerRevisions) that should exist: the spec's revision recorded (or
renumbered when it comes back), the result of a rollout that ended, the one-line change, and the
history pruned to `spec.revisionHistoryLimit`. Pure; world/revisions.py reads them back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..api import names
from ..api.spec import ModelDeployment
from ..world.revisions import (
    ABORTED,
    ANNOTATION_CHANGE,
    ANNOTATION_CHANGE_CAUSE,
    ANNOTATION_RESULT,
    API_VERSION,
    KIND,
    MAX_CHANGE_CHARS,
    PROMOTED,
    Recorded,
    record_name,
    template_of,
)
from ..world.state import RolloutState
from .pods import common_labels, owner_reference

# --- the one-line change -------------------------------------------------------------------------

def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(_flatten(value[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."


def change_summary(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str:
    """`model.source: builtin:a -> builtin:b; resources.gpus: 1 -> 2` (the first revision: `created`)."""
    if before is None:
        return "created"
    old, new = _flatten(before), _flatten(after)
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a = "(unset)" if key not in old else _short(old[key])
            b = "(unset)" if key not in new else _short(new[key])
            parts.append(f"{key}: {a} -> {b}")
    text = "; ".join(parts) or "no change in the pod template"
    return text if len(text) <= MAX_CHANGE_CHARS else text[:MAX_CHANGE_CHARS - 3] + "..."


# --- what should be recorded ---------------------------------------------------------------------

def _result_for(revision: str, state: RolloutState, stable_revision: str | None,
                rec: Recorded | None, now: str) -> dict[str, Any] | None:
    """The result annotation to record now for `revision`, or None to keep what is there."""
    current = rec.result if rec else {}
    aborted = state.aborted if state.revision == revision else None
    if aborted:
        want = {"result": ABORTED, "reason": aborted.get("reason", ""), "message": aborted.get("message", ""),
                "at": state.aborted_at or aborted.get("at") or now}
        same = current.get("result") == ABORTED and current.get("at") == want["at"]
        return None if same else want
    if stable_revision == revision and current.get("result") != PROMOTED:
        return {"result": PROMOTED, "at": state.completed_at or now}
    return None


def desired_records(md: ModelDeployment, spec: Mapping[str, Any], annotations: Mapping[str, str],
                    revision: str, stable_revision: str | None, state: RolloutState,
                    records: Mapping[str, Recorded], in_use: set[str], now: str,
                    legacy: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The ControllerRevisions that should exist: the spec's revision (recorded, or renumbered when
    it comes back), the result of the rollout that just ended, and the newest
    `revisionHistoryLimit` others; revisions with pods, the spec's and the stable one are always
    kept. `legacy`: templates an older operator kept in status.rollout.templates, recorded once."""
    latest = max((r.number for r in records.values()), default=0)
    numbers = {rev: rec.number for rev, rec in records.items()}
    templates = {rev: rec.template for rev, rec in records.items()}
    for rev, template in (legacy or {}).items():
        if rev not in numbers and rev != revision:
            latest += 1
            numbers[rev] = latest
            templates[rev] = dict(template)
    own = records.get(revision)
    arriving = md.status.get("currentRevision") != revision
    if own is None or (arriving and own.number < latest):
        latest += 1
        numbers[revision] = latest
    templates[revision] = own.template if own else template_of(spec)

    keep = {revision, *in_use, *([stable_revision] if stable_revision else [])}
    by_age = sorted(numbers, key=lambda r: numbers[r], reverse=True)
    others = [r for r in by_age if r not in keep]
    keep.update(others[:md.revision_history_limit])

    previous = md.status.get("stableRevision") or md.status.get("currentRevision")
    out = []
    for rev in sorted(keep & set(numbers), key=lambda r: numbers[r]):
        rec = records.get(rev)
        meta_annotations = dict(rec.annotations) if rec else {}
        if rec is None:
            before = templates.get(previous) if previous and previous != rev else None
            cause = annotations.get(ANNOTATION_CHANGE_CAUSE)
            meta_annotations[ANNOTATION_CHANGE] = change_summary(before, templates[rev])
            if cause and rev == revision:
                meta_annotations[ANNOTATION_CHANGE_CAUSE] = cause
        result = _result_for(rev, state, stable_revision, rec, now)
        if result is not None:
            meta_annotations[ANNOTATION_RESULT] = json.dumps(result, sort_keys=True)
        out.append({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": record_name(md.name, rev),
                "namespace": md.namespace,
                "labels": {**common_labels(md), names.LABEL_REVISION: rev},
                "annotations": meta_annotations,
                "ownerReferences": [owner_reference(md)],
            },
            "data": {"spec": templates[rev]},
            "revision": numbers[rev],
        })
    return out
