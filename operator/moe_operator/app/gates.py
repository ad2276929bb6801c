"""Gang admission by scheduling gates, where the cluster serves no Workload API (`--gang-scheduling`).

Without PodGroups the scheduler binds a group's pods one by one: half a group can hold GPUs it cannot
use, and two deployments that each fit alone can deadlock each other half-scheduled. So (with
`--gang-scheduling auto` on such a cluster, or `gates`) a multi-pod group's pods are created behind
the scheduling gate `serving.moe.dev/gang`, and the leader's GateKeeper lifts the gates of all of a
group's pods together, only when the whole group fits the free accelerators it sees
(world/capacity.py), oldest group first. While a released group's pods are still being bound nothing
else is released, so two releases never count the same free GPUs.

It needs to see the cluster's capacity: `list`/`watch` on nodes, and on pods in every namespace
(the chart's cluster-wide install grants both). Without them the operator does not gate (pods are
created ungated, as before) and lifts any gate it finds, so no pod is ever left behind one. With
`auto` on a cluster that serves PodGroups the view is not needed, and its watches (every node, every
bound pod) are not started: discovery is asked again every NEEDED_RECHECK_SECONDS, and they start if
the Workload API goes away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.dynamic.exceptions import ApiException, ForbiddenError, NotFoundError

from ..api import names
from ..world import capacity
from ..world.cache import KindCache

log = logging.getLogger("moe_operator.gates")

INTERVAL_SECONDS = 1.0
NEEDED_RECHECK_SECONDS = 60.0   # auto: whether the cluster still serves PodGroups, asked this often
BOUND = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    return {"metadata": {"name": meta.get("name"), "labels": meta.get("labels") or {}},
            "spec": {"taints": spec.get("taints") or [], "unschedulable": bool(spec.get("unschedulable"))},
            "status": {"allocatable": status.get("allocatable") or {},
                       "conditions": [c for c in status.get("conditions") or () if c.get("type") == "Ready"]}}


def slim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What the capacity view needs of a bound pod: where it runs and what it takes."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    return {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": {"nodeName": spec.get("nodeName"),
                     "containers": [{"resources": c.get("resources") or {}} for c in spec.get("containers") or ()],
                     "initContainers": [{"resources": c.get("resources") or {}}
                                        for c in spec.get("initContainers") or ()]},
            "status": {"phase": (pod.get("status") or {}).get("phase")}}


gated = capacity.gated


def _live(pod: Mapping[str, Any]) -> bool:
    return (not (pod.get("metadata") or {}).get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))


def group_size(pod: Mapping[str, Any]) -> int | None:
    """Pods in the pod's group: its `--nnodes` argument (every multi-pod group's pods carry it)."""
    for container in (pod.get("spec") or {}).get("containers") or ():
        args = list(container.get("args") or ())
        for i, arg in enumerate(args):
            if arg == "--nnodes" and i + 1 < len(args) and str(args[i + 1]).isdigit():
                return int(args[i + 1])
            if str(arg).startswith("--nnodes=") and arg.split("=", 1)[1].isdigit():
                return int(arg.split("=", 1)[1])
    return None


def group_domain(pod: Mapping[str, Any]) -> str | None:
    """The topology key of the pod's required affinity to its own group (topology.groupDomain)."""
    group = ((pod.get("metadata") or {}).get("labels") or {}).get(names.LABEL_GROUP)
    affinity = ((pod.get("spec") or {}).get("affinity") or {}).get("podAffinity") or {}
    for term in affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or ():
        labels = (term.get("labelSelector") or {}).get("matchLabels") or {}
        if group and labels.get(names.LABEL_GROUP) == group:
            return term.get("topologyKey")
    return None


def in_flight(pod: Mapping[str, Any]) -> bool:
    """A pod of a released group the scheduler has not bound yet (and has not given up on)."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    if not _live(pod) or gated(pod) or spec.get("nodeName") or not capacity.pod_needs(spec):
        return False
    if not ((pod.get("metadata") or {}).get("labels") or {}).get(names.LABEL_GROUP):
        return False
    return not any(c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"
                   for c in status.get("conditions") or ())


def waiting_groups(owned: list[Mapping[str, Any]]) -> tuple[list[capacity.GatedGroup], list[Mapping[str, Any]]]:
    """(complete groups whose pods are all gated, pods to lift at once: the rest of a group some of
    whose pods were already released)."""
    by_group: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for pod in owned:
        meta = pod.get("metadata") or {}
        group = (meta.get("labels") or {}).get(names.LABEL_GROUP)
        if group and _live(pod):
            by_group.setdefault((meta.get("namespace", ""), group), []).append(pod)
    groups, stragglers = [], []
    for key, pods in sorted(by_group.items()):
        waiting = [p for p in pods if gated(p)]
        if not waiting:
            continue
        if len(waiting) < len(pods):          # released before (a lift cut short): finish it
            stragglers.extend(waiting)
            continue
        if len(pods) != group_size(pods[0]):   # not all of its pods exist yet: the next pass
            continue
        groups.append(capacity.GatedGroup(
            key, min(p["metadata"].get("creationTimestamp") or "" for p in pods),
            tuple(capacity.need_of(p) for p in pods), group_domain(pods[0])))
    return groups, stragglers


class GateKeeper:
    """Lifts the gang gates of groups that fit, in a thread of the leading operator."""

    def __init__(self, dynamic_client, gang_pods: Callable[[], list[dict[str, Any]] | None],
                 interval: float = INTERVAL_SECONDS, on_wait: Callable[[int], None] | None = None,
                 needed: Callable[[], bool] = lambda: True):
        self.dyn, self.gang_pods, self.interval, self.on_wait = dynamic_client, gang_pods, interval, on_wait
        self.needed = needed        # gates are in use (auto: the cluster serves no PodGroups)
        self.watching = False
        self._asked: float | None = None
        self._pods = dynamic_client.resources.get(api_version="v1", kind="Pod")
        self._nodes_resource = dynamic_client.resources.get(api_version="v1", kind="Node")
        self.nodes = KindCache(dynamic_client, self._nodes_resource, selector=None, slim=slim_node)
        self.bound = KindCache(dynamic_client, self._pods, selector=None, field_selector=BOUND, slim=slim_pod)
        self.permitted = False
        self._stop = threading.Event()
        self._announced: set[tuple[str, str]] = set()

    def active(self) -> bool:
        """New groups are gated only while their gates can be lifted: the capacity view is readable
        and watched (so only while gates are in use)."""
        return self.permitted and self.watching

    def start(self) -> None:
        self.permitted = self._can_see_capacity()
        if self.permitted:
            self._watch_if_needed()
        else:
            log.warning("gang admission by scheduling gates is off: no list/watch on nodes and on pods in "
                        "every namespace; multi-pod groups are scheduled pod by pod (docs/operator.md)")
        threading.Thread(target=self._run, name="gate-keeper", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.nodes.stop()
        self.bound.stop()

    def _can_see_capacity(self) -> bool:
        try:
            self.dyn.get(self._nodes_resource, limit=1)
            self.dyn.get(self._pods, limit=1, field_selector=BOUND)
            return True
        except ForbiddenError:
            return False

    def _watch_if_needed(self) -> None:
        """Start watching nodes and bound pods the first time gates are needed (asked again every
        NEEDED_RECHECK_SECONDS until then)."""
        if self.watching or not self.permitted:
            return
        now = time.monotonic()
        if self._asked is not None and now - self._asked < NEEDED_RECHECK_SECONDS:
            return
        self._asked = now
        if self.needed():
            self.nodes.start()
            self.bound.start()
            self.watching = True
            log.info("gang admission by scheduling gates: groups are released when they fit")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._watch_if_needed()
                self.run_once()
            except Exception as error:    # the API server away: the next round
                log.warning("gate keeper: %s", error)

    def run_once(self) -> list[tuple[str, str]]:
        """One round; returns the groups released."""
        owned = self.gang_pods()
        if owned is None:
            return []
        groups, stragglers = waiting_groups(owned)
        for pod in stragglers:
            self._lift(pod["metadata"]["namespace"], pod["metadata"]["name"])
        if not groups:
            return []
        if not self.active():      # gated by an operator that could see more, or by hand: never stuck
            return self._release([(g, {}) for g in groups])
        nodes, bound = self.nodes.everything(), self.bound.everything()
        if nodes is None or bound is None or any(in_flight(p) for p in owned):
            return []
        released = capacity.admit(groups, [capacity.node_of(n) for n in nodes], capacity.used_on_nodes(bound))
        waiting = [g.key for g in groups if g.key not in {r.key for r, _ in released}]
        for key in waiting:
            if key not in self._announced:
                self._announced.add(key)
                log.info("group %s/%s waits behind its gate: not all of its pods fit now", *key)
        if self.on_wait is not None:
            self.on_wait(len(waiting))
        return self._release(released)

    def _release(self, released: list[tuple[capacity.GatedGroup, dict[str, str]]]) -> list[tuple[str, str]]:
        done = []
        for group, placement in released:
            namespace = group.key[0]
            for pod in group.pods:
                self._lift(namespace, pod.name)
            self._announced.discard(group.key)
            where = f" (room on {', '.join(sorted(set(placement.values())))})" if placement else ""
            log.info("group %s/%s released: its %d pods fit%s", *group.key, len(group.pods), where)
            done.append(group.key)
        return done

    def _lift(self, namespace: str, name: str) -> None:
        try:
            self.dyn.patch(self._pods, name=name, namespace=namespace, body={"spec": {"schedulingGates": None}},
                           content_type="application/merge-patch+json", field_manager=names.FIELD_MANAGER)
        except NotFoundError:
            pass
        except ApiException as error:
            log.warning("could not lift the gate of %s/%s: %s", namespace, name, error)
