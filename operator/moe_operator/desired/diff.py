"""From a plan to the objects that should exist, and from those to the writes that are needed.

All pure: `with_templates(observed, templates)` tells each group's size and whether its pods run
their revision's template; `desired_objects(md, plan, observed, templates, records, now)` builds the
revision records, every pod (from its own revision's template) and Service; `changes(desired,
observed)` says what to apply and what to delete, and is empty when the world already matches
(converged means quiet: no write at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..api import names
from ..api.spec import ModelDeployment
from ..api.timestamps import iso
from ..world.observe import Observed
from ..world.plan import Plan
from ..world.revisions import KIND as RECORD_KIND
from .gang import KIND as POD_GROUP_KIND
from .gang import desired_pod_group
from .pods import PodSlot, desired_pod, owner_reference, pod_labels, pod_name, template_fingerprint
from .rules import KIND as RULE_KIND
from .rules import desired_rule
from .services import desired_group_service, desired_service


@dataclass(frozen=True)
class Changes:
    """Writes to make: `apply` holds every desired object that differs from what is there, `delete`
    what should go. A pod that already exists is only ever relabelled (`relabels`), never re-applied:
    its spec is immutable and was built from its own revision's spec, which may no longer be the
    current one. New pods and Services are server-side applied (`applies`)."""

    apply: tuple[Mapping[str, Any], ...] = ()
    delete: tuple[tuple[str, str, str], ...] = ()   # (kind, name, uid)
    existing_pods: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.apply or self.delete)

    @property
    def applies(self) -> list[Mapping[str, Any]]:
        return [b for b in self.apply if not (b["kind"] == "Pod" and b["metadata"]["name"] in self.existing_pods)]

    @property
    def relabels(self) -> list[tuple[str, Mapping[str, Any]]]:
        """(pod name, metadata patch: its labels and annotations) for each existing pod to change."""
        return [(b["metadata"]["name"], {k: b["metadata"][k] for k in ("labels", "annotations")
                                         if k in b["metadata"]})
                for b in self.apply if b["kind"] == "Pod" and b["metadata"]["name"] in self.existing_pods]

    @property
    def created_pods(self) -> int:
        return sum(1 for body in self.applies if body["kind"] == "Pod")

    def traffic_first(self) -> tuple[Changes, Changes]:
        """(relabels of existing pods: what moves traffic, everything else), to write in that order."""
        moves = tuple(b for b in self.apply if b["kind"] == "Pod" and b["metadata"]["name"] in self.existing_pods)
        rest = tuple(b for b in self.apply if not (b["kind"] == "Pod" and b["metadata"]["name"] in self.existing_pods))
        return Changes(moves, (), self.existing_pods), Changes(rest, self.delete, self.existing_pods)


def with_templates(observed: Observed, templates: Mapping[str, ModelDeployment]) -> Observed:
    """The observation with each revision's group size and GPUs per pod from its own template, and
    every live pod marked `stale` when its spec is not what its revision's template builds (a pod
    made by an older operator from the wrong spec, or edited by hand)."""
    def stale(pod) -> bool:
        view = templates.get(pod.revision)
        if view is None or not pod.live or not (pod.body or {}).get("spec"):
            return False
        slot = PodSlot(pod.revision, pod.replica, pod.rank, pod.track, pod.in_rotation, pod.name)
        return template_fingerprint(pod.body) != template_fingerprint(desired_pod(view, slot))

    return replace(observed,
                   pods=tuple(replace(p, stale=stale(p)) for p in observed.pods),
                   sizes={rev: view.pods_per_replica for rev, view in templates.items()},
                   gpus={rev: view.resources.gpus for rev, view in templates.items()})


def pod_slots(plan: Plan, observed: Observed, md_name: str) -> list[PodSlot]:
    """Every pod the plan wants, named: a live pod keeps its name; a missing one gets the first name
    not taken by any observed pod (a terminating predecessor keeps its name until it is gone). A
    group leaving rotation (`draining`) gets no new pod: one that lost a rank would look whole
    again, and be kept instead of re-created."""
    live = {(p.revision, p.replica, p.rank): p.name for p in observed.pods if p.live}
    taken = {p.name for p in observed.pods}
    slots = []
    for g in plan.groups:
        for rank in range(observed.size_of(g.revision)):
            name = live.get((g.revision, g.replica, rank))
            if name is None and g.draining:
                continue
            if name is None:
                incarnation = 0
                while (name := pod_name(md_name, g.revision, g.replica, rank, incarnation)) in taken:
                    incarnation += 1
            slots.append(PodSlot(g.revision, g.replica, rank, g.track, g.in_rotation, name))
    return slots


def _out_of_rotation_since(observed: Observed, slot: PodSlot, now: float) -> str | None:
    """The annotation a pod out of rotation carries: when it left (now, for one leaving now)."""
    pod = next((p for p in observed.pods if p.name == slot.name), None)
    if slot.in_rotation or pod is None:
        return None
    if pod.in_rotation:
        return iso(now)
    return (pod.body.get("metadata", {}).get("annotations") or {}).get(names.ANNOTATION_OUT_OF_ROTATION)


def desired_objects(md: ModelDeployment, plan: Plan, observed: Observed,
                    templates: Mapping[str, ModelDeployment] | None = None,
                    records: Sequence[Mapping[str, Any]] = (), now: float = 0.0) -> list[dict[str, Any]]:
    """The revision records first (a revision is recorded before its first pod), pods of every
    planned group built from their revision's template, the traffic Service, one Service per
    planned track and, where the PrometheusRule CRD exists, the latency alerts of the spec's slo.
    A planned group whose revision has no template (no record, not the spec's) gets no new pod."""
    templates = templates if templates is not None else {plan.revision: md}
    objects: list[dict[str, Any]] = [dict(r) for r in records]
    existing = {p.name for p in observed.pods}
    for slot in pod_slots(plan, observed, md.name):
        view = templates.get(slot.revision)
        if view is None:
            if slot.name in existing:    # still relabelled (in and out of rotation), never rebuilt
                pod = next(p for p in observed.pods if p.name == slot.name)
                objects.append(_relabelled(md, pod.body, slot, observed, now))
            continue
        pod = desired_pod(view, slot, gang=observed.pod_groups is not None, gate=observed.gates)
        since = _out_of_rotation_since(observed, slot, now)
        if since:
            pod["metadata"]["annotations"] = {names.ANNOTATION_OUT_OF_ROTATION: since}
        objects.append(pod)
    for g in plan.groups:   # each multi-pod group's headless Service (its ranks' names) and PodGroup
        view = templates.get(g.revision)
        if view is not None and view.pods_per_replica > 1:
            objects.append(desired_group_service(view, g.revision, g.replica))
            if observed.pod_groups is not None:
                objects.append(desired_pod_group(view, g.revision, g.replica))
    objects.append(desired_service(md))
    objects.extend(desired_service(md, track) for track in plan.service_tracks)
    if observed.rules is not None and (rule := desired_rule(md)) is not None:
        objects.append(rule)
    return objects


def is_subset(want: Any, have: Any) -> bool:
    """True when every field of `want` is present in `have` with the same value (lists by position)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(is_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(want) == len(have)
                and all(is_subset(w, h) for w, h in zip(want, have, strict=True)))
    return want == have


def _up_to_date(want: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    wm, hm = want["metadata"], have.get("metadata") or {}
    if not (is_subset(wm.get("labels", {}), hm.get("labels") or {})
            and is_subset(wm.get("ownerReferences", []), hm.get("ownerReferences") or [])):
        return False
    if want["kind"] == "Pod":
        # The name carries the revision; a pod's spec never changes in place (a stale one is replaced).
        return is_subset(wm.get("annotations", {}), hm.get("annotations") or {})
    if want["kind"] == RECORD_KIND:
        # A record's data never changes; its number (a revision that comes back) and result may.
        return want["revision"] == have.get("revision") and is_subset(wm.get("annotations", {}),
                                                                      hm.get("annotations") or {})
    if want["kind"] == RULE_KIND:
        return is_subset(want["spec"], have.get("spec") or {})
    if want["kind"] == POD_GROUP_KIND:   # immutable: one per group, never rewritten
        return True
    spec, hspec = want["spec"], have.get("spec") or {}
    return spec["selector"] == hspec.get("selector") and is_subset(spec, hspec)


def changes(desired: list[Mapping[str, Any]], observed: Observed) -> Changes:
    existing: dict[tuple[str, str], Mapping[str, Any]] = {("Pod", p.name): p.body for p in observed.pods}
    existing.update({("Service", name): body for name, body in observed.services.items()})
    existing.update({(RULE_KIND, name): body for name, body in (observed.rules or {}).items()})
    existing.update({(POD_GROUP_KIND, name): body for name, body in (observed.pod_groups or {}).items()})
    existing.update({(RECORD_KIND, rec.name): rec.body for rec in observed.revisions.values() if rec.body})
    wanted = {(d["kind"], d["metadata"]["name"]) for d in desired}
    stale = tuple(d for d in desired if (key := (d["kind"], d["metadata"]["name"])) not in existing
                  or not _up_to_date(d, existing[key]))
    delete = tuple(
        (kind, name, (body.get("metadata") or {}).get("uid", ""))
        for (kind, name), body in sorted(existing.items())
        if (kind, name) not in wanted and not (body.get("metadata") or {}).get("deletionTimestamp")
    )
    return Changes(stale, delete, frozenset(p.name for p in observed.pods))


def _relabelled(md: ModelDeployment, body: Mapping[str, Any], slot: PodSlot, observed: Observed,
                now: float) -> dict[str, Any]:
    """An existing pod of a revision with no known template, as the plan labels it (only its
    labels and annotations are ever written)."""
    out: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": slot.name, "namespace": md.namespace, "labels": pod_labels(md, slot),
        "ownerReferences": [owner_reference(md)]}, "spec": body.get("spec") or {}}
    since = _out_of_rotation_since(observed, slot, now)
    if since:
        out["metadata"]["annotations"] = {names.ANNOTATION_OUT_OF_ROTATION: since}
    return out
