"""Revision history: the pod template of every revision, recorded when the revision first appears.

Each revision is one ControllerRevision (apps/v1) owned by its ModelDeployment, named
`<name>-<revision>`, as Deployments, StatefulSets and DaemonSets keep theirs: `data.spec` holds the
spec's pod-template fields (`TEMPLATE_FIELDS`) as the user wrote them, `revision` a number that
grows with each rollout (a revision that comes back, by undo or a Git revert, gets the next number,
as `kubectl rollout undo` does), and two annotations the history shows: the change from the
revision before it in one line, and the result (promoted, or aborted and why).

Every pod of a revision is built from its record (`templates()`), whatever the spec says now; the
current spec's revision is recorded in the same pass that first creates its pods, before them.
Everything here is pure; the records are observed and written like the other children.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api import names
from ..api.spec import ModelDeployment, SpecError
from ..desired.pods import revision_of

API_VERSION = "apps/v1"
KIND = "ControllerRevision"
TEMPLATE_FIELDS = ("model", "runtime", "resources", "topology", "scheduling")
ANNOTATION_CHANGE = f"{names.PREFIX}/change"          # the change from the revision before, one line
ANNOTATION_RESULT = f"{names.PREFIX}/result"          # JSON: result (promoted | aborted), reason, message, at
ANNOTATION_CHANGE_CAUSE = "kubernetes.io/change-cause"   # copied from the ModelDeployment, as kubectl rollout does
PROMOTED, ABORTED = "promoted", "aborted"
MAX_CHANGE_CHARS = 240


@dataclass(frozen=True)
class Recorded:
    """One observed ControllerRevision."""

    revision: str                     # the hash (label serving.moe.dev/revision)
    number: int                       # .revision
    template: Mapping[str, Any]       # data.spec
    name: str = ""
    uid: str = ""
    created: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def result(self) -> dict[str, Any]:
        try:
            value = json.loads(self.annotations.get(ANNOTATION_RESULT) or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def recorded_from(body: Mapping[str, Any]) -> Recorded | None:
    meta = body.get("metadata") or {}
    revision = (meta.get("labels") or {}).get(names.LABEL_REVISION)
    template = (body.get("data") or {}).get("spec")
    if not revision or not isinstance(template, Mapping):
        return None
    return Recorded(revision, int(body.get("revision") or 0), template, meta.get("name", ""),
                    meta.get("uid", ""), meta.get("creationTimestamp") or "",
                    dict(meta.get("annotations") or {}), body)


def record_name(md_name: str, revision: str) -> str:
    return f"{md_name}-{revision}"


def template_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The pod-template fields of a spec, as written."""
    return {k: copy.deepcopy(spec[k]) for k in TEMPLATE_FIELDS if k in spec}


def templates(md: ModelDeployment, records: Mapping[str, Recorded],
              legacy: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, ModelDeployment]:
    """Every revision whose pods can be built: the recorded ones and the spec's own, each as a
    ModelDeployment carrying that revision's template (replicas, rollout and budget stay the spec's).
    `legacy`: templates an older operator kept in status, for revisions not recorded yet."""
    out: dict[str, ModelDeployment] = {}
    sources = {**(legacy or {}), **{rev: rec.template for rev, rec in records.items()}}
    for rev, template in sources.items():
        try:
            out[rev] = md.with_template(template)
        except SpecError:
            continue      # a template this operator can no longer read: its pods are not rebuilt
    out[revision_of(md)] = md
    return out
