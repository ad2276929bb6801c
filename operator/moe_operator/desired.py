"""From a plan to the objects that should exist, and from those to the writes that are needed.

Both functions are pure: `desired_objects(md, plan, observed)` builds every pod and Service;
`changes(desired, observed)` says what to apply and what to delete, and is empty when the world
already matches (converged means quiet: no write at all).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .observe import Observed
from .plan import Plan
from .pods import PodSlot, desired_pod, pod_name
from .prometheus_rule import KIND as RULE_KIND
from .prometheus_rule import desired_rule
from .services import desired_service
from .spec import ModelDeployment


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
    def relabels(self) -> list[tuple[str, Mapping[str, str]]]:
        return [(b["metadata"]["name"], b["metadata"]["labels"]) for b in self.apply
                if b["kind"] == "Pod" and b["metadata"]["name"] in self.existing_pods]

    @property
    def created_pods(self) -> int:
        return sum(1 for body in self.applies if body["kind"] == "Pod")

    def traffic_first(self) -> tuple[Changes, Changes]:
        """(relabels of existing pods: what moves traffic, everything else), to write in that order."""
        moves = tuple(b for b in self.apply if b["kind"] == "Pod" and b["metadata"]["name"] in self.existing_pods)
        rest = tuple(b for b in self.apply if not (b["kind"] == "Pod" and b["metadata"]["name"] in self.existing_pods))
        return Changes(moves, (), self.existing_pods), Changes(rest, self.delete, self.existing_pods)


def pod_slots(md: ModelDeployment, plan: Plan, observed: Observed) -> list[PodSlot]:
    """Every pod the plan wants, named: a live pod keeps its name; a missing one gets the first name
    not taken by any observed pod (a terminating predecessor keeps its name until it is gone)."""
    live = {(p.revision, p.replica, p.rank): p.name for p in observed.pods if p.live}
    taken = {p.name for p in observed.pods}
    slots = []
    for g in plan.groups:
        for rank in range(md.pods_per_replica):
            name = live.get((g.revision, g.replica, rank))
            if name is None:
                incarnation = 0
                while (name := pod_name(md.name, g.revision, g.replica, rank, incarnation)) in taken:
                    incarnation += 1
            slots.append(PodSlot(g.revision, g.replica, rank, g.track, g.in_rotation, name))
    return slots


def desired_objects(md: ModelDeployment, plan: Plan, observed: Observed) -> list[dict[str, Any]]:
    """Pods of every planned group, the traffic Service, one Service per planned track and, where the
    PrometheusRule CRD exists, the latency alerts of the spec's slo."""
    objects: list[dict[str, Any]] = [desired_pod(md, slot) for slot in pod_slots(md, plan, observed)]
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
        return True          # the name carries the revision; a pod's spec never changes in place
    if want["kind"] == RULE_KIND:
        return is_subset(want["spec"], have.get("spec") or {})
    spec, hspec = want["spec"], have.get("spec") or {}
    return spec["selector"] == hspec.get("selector") and is_subset(spec, hspec)


def changes(desired: list[Mapping[str, Any]], observed: Observed) -> Changes:
    existing: dict[tuple[str, str], Mapping[str, Any]] = {("Pod", p.name): p.body for p in observed.pods}
    existing.update({("Service", name): body for name, body in observed.services.items()})
    existing.update({(RULE_KIND, name): body for name, body in (observed.rules or {}).items()})
    wanted = {(d["kind"], d["metadata"]["name"]) for d in desired}
    stale = tuple(d for d in desired if (key := (d["kind"], d["metadata"]["name"])) not in existing
                  or not _up_to_date(d, existing[key]))
    delete = tuple(
        (kind, name, (body.get("metadata") or {}).get("uid", ""))
        for (kind, name), body in sorted(existing.items())
        if (kind, name) not in wanted and not (body.get("metadata") or {}).get("deletionTimestamp")
    )
    return Changes(stale, delete, frozenset(p.name for p in observed.pods))
