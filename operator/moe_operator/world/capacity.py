"""Pure: whether replica groups fit the cluster's free accelerators now (gang admission by scheduling
gates, where the cluster serves no Workload API).

A multi-pod group's pods are created with the scheduling gate `serving.moe.dev/gang`; the scheduler
ignores them until the gate is lifted. `admit` decides which gated groups to release: a group is
released only when every one of its pods has a node with enough free extended resources
(`nvidia.com/gpu` and any other `vendor/name` resource) among the nodes its nodeSelector and
tolerations allow, within one value of its `topology.groupDomain` label when it has one. Groups are
taken oldest first; one that does not fit is skipped, so a smaller one behind it may go (Kueue's
BestEffortFIFO). Each release is counted against the free capacity of the same pass, so two groups
that fit only one at a time are never released together: neither can end up half-bound.

This is an estimate made from the operator's view of nodes and pods, not the scheduler's decision:
nodeSelector, required node affinity, taints and the group's domain are honoured; CPU, memory, pod
(anti-)affinity to other pods and pods per node are left to the scheduler. A group released on a wrong estimate shows up as Unschedulable like any pod.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..api import names

GATE = names.GANG_GATE


def gated(pod: Mapping[str, Any]) -> bool:
    """The pod waits behind the gang gate."""
    return any(g.get("name") == GATE for g in (pod.get("spec") or {}).get("schedulingGates") or ())


def gang_relevant(pod: Mapping[str, Any]) -> bool:
    """A pod of a multi-pod group that is gated or not bound yet: what gang admission looks at (the
    operator's pod cache marks these, so a round decodes only them)."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    return bool((meta.get("labels") or {}).get(names.LABEL_GROUP)) and (gated(pod) or not spec.get("nodeName"))


def extended(resources: Mapping[str, Any] | None) -> Counter:
    """The extended resources (`vendor/name`, e.g. nvidia.com/gpu) of a resource list, as integers."""
    out: Counter = Counter()
    for name, value in (resources or {}).items():
        if "/" in name and not name.startswith(("hugepages-", "kubernetes.io/")):
            try:
                out[name] = int(str(value))
            except ValueError:
                continue
    return out


@dataclass(frozen=True)
class Node:
    name: str
    labels: Mapping[str, str]
    taints: tuple[tuple[str, str, str], ...]     # (key, value, effect)
    allocatable: Counter
    schedulable: bool


@dataclass(frozen=True)
class PodNeed:
    name: str
    needs: Counter
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    node_terms: tuple[Mapping[str, Any], ...] = ()   # required nodeAffinity: any one term must match


@dataclass(frozen=True)
class GatedGroup:
    key: tuple[str, str]                 # (namespace, group label value)
    created: str                         # the oldest pod's creationTimestamp (RFC 3339 sorts as time)
    pods: tuple[PodNeed, ...]
    domain: str | None = None            # topology.groupDomain: a node label all pods must share


def node_of(body: Mapping[str, Any]) -> Node:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    taints = tuple((t.get("key", ""), t.get("value", "") or "", t.get("effect", "")) for t in spec.get("taints") or ())
    return Node(meta.get("name", ""), dict(meta.get("labels") or {}), taints,
                extended(status.get("allocatable")), ready and not spec.get("unschedulable"))


def pod_needs(spec: Mapping[str, Any]) -> Counter:
    """What a pod takes of the extended resources: its containers' requests (limits where a request is
    not given, as the API server defaults it), or an init container's when that is larger."""
    def of(container: Mapping[str, Any]) -> Counter:
        res = container.get("resources") or {}
        return extended({**(res.get("limits") or {}), **(res.get("requests") or {})})
    total: Counter = Counter()
    for c in spec.get("containers") or ():
        total.update(of(c))
    for c in spec.get("initContainers") or ():
        for name, value in of(c).items():
            total[name] = max(total[name], value)
    return total


def need_of(body: Mapping[str, Any]) -> PodNeed:
    spec = body.get("spec") or {}
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    return PodNeed((body.get("metadata") or {}).get("name", ""), pod_needs(spec),
                   dict(spec.get("nodeSelector") or {}), tuple(spec.get("tolerations") or ()),
                   tuple(required.get("nodeSelectorTerms") or ()))


def used_on_nodes(pods: Iterable[Mapping[str, Any]]) -> dict[str, Counter]:
    """Extended resources taken on each node by the pods bound there and not finished."""
    used: dict[str, Counter] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            used.setdefault(node, Counter()).update(pod_needs(pod.get("spec") or {}))
    return used


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: tuple[str, str, str]) -> bool:
    key, value, effect = taint
    for t in tolerations:
        if t.get("effect") and t["effect"] != effect:
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t["key"] == key:
                return True
        elif t.get("key") == key and (t.get("value") or "") == value:
            return True
    return False


def _matches(requirement: Mapping[str, Any], values: Mapping[str, str]) -> bool:
    """One node selector requirement (In, NotIn, Exists, DoesNotExist, Gt, Lt) against labels or fields."""
    key, op, wanted = requirement.get("key", ""), requirement.get("operator"), requirement.get("values") or []
    have = values.get(key)
    if op == "In":
        return have in wanted
    if op == "NotIn":
        return have not in wanted
    if op == "Exists":
        return key in values
    if op == "DoesNotExist":
        return key not in values
    if op in ("Gt", "Lt") and have is not None and wanted:
        try:
            return int(have) > int(wanted[0]) if op == "Gt" else int(have) < int(wanted[0])
        except ValueError:
            return False
    return False


def _term_matches(term: Mapping[str, Any], node: Node) -> bool:
    expressions, fields = term.get("matchExpressions") or (), term.get("matchFields") or ()
    if not expressions and not fields:
        return False          # an empty term matches no node (as the scheduler reads it)
    return (all(_matches(r, node.labels) for r in expressions)
            and all(_matches(r, {"metadata.name": node.name}) for r in fields))


def allows(node: Node, pod: PodNeed) -> bool:
    """The node is one the scheduler may put the pod on: schedulable, its nodeSelector and required
    node affinity, and taints it tolerates."""
    if not node.schedulable:
        return False
    if any(node.labels.get(k) != v for k, v in pod.node_selector.items()):
        return False
    if pod.node_terms and not any(_term_matches(t, node) for t in pod.node_terms):
        return False
    return all(tolerates(pod.tolerations, t) for t in node.taints if t[2] in ("NoSchedule", "NoExecute"))


def _fits(free: Counter, needs: Counter) -> bool:
    return all(free[name] >= amount for name, amount in needs.items())


def place(group: GatedGroup, nodes: Sequence[Node], free: Mapping[str, Counter]) -> dict[str, str] | None:
    """pod name -> node for every pod of the group, or None when one of them has no room. The
    biggest pods go first, each to the fullest node that still takes it (best fit)."""
    domains: list[list[Node]]
    if group.domain:
        by_value: dict[str, list[Node]] = {}
        for n in nodes:
            if group.domain in n.labels:
                by_value.setdefault(n.labels[group.domain], []).append(n)
        domains = [by_value[v] for v in sorted(by_value)]
    else:
        domains = [list(nodes)]
    for candidates in domains:
        left = {n.name: Counter(free.get(n.name, Counter())) for n in candidates}
        placement: dict[str, str] = {}
        for pod in sorted(group.pods, key=lambda p: (-sum(p.needs.values()), p.name)):
            fitting = [n for n in candidates if allows(n, pod) and _fits(left[n.name], pod.needs)]
            if not fitting:
                break
            best = min(fitting, key=lambda n: (sum(left[n.name].values()), n.name))
            left[best.name].subtract(pod.needs)
            placement[pod.name] = best.name
        else:
            return placement
    return None


def admit(groups: Iterable[GatedGroup], nodes: Sequence[Node], used: Mapping[str, Counter]
          ) -> list[tuple[GatedGroup, dict[str, str]]]:
    """The gated groups to release now, oldest first, each counted against the room the ones before
    it take."""
    free = {n.name: n.allocatable - used.get(n.name, Counter()) for n in nodes}
    released = []
    for group in sorted(groups, key=lambda g: (g.created, g.key)):
        placement = place(group, nodes, free)
        if placement is None:
            continue
        for pod in group.pods:
            free[placement[pod.name]] = free[placement[pod.name]] - pod.needs
        released.append((group, placement))
    return released
