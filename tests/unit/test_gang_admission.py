"""Gang admission by scheduling gates (world/capacity.py, app/gates.py): which gated groups are
released, from nodes and the pods bound on them."""

from collections import Counter

import pytest
from moe_operator.api import names
from moe_operator.app import gates
from moe_operator.world import capacity

pytestmark = pytest.mark.unit

GPU = "nvidia.com/gpu"


def node(name, gpus=8, labels=None, taints=(), ready=True, unschedulable=False):
    return capacity.node_of({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {"taints": [dict(zip(("key", "value", "effect"), t, strict=True)) for t in taints], "unschedulable": unschedulable},
        "status": {"allocatable": {GPU: str(gpus), "cpu": "64"},
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


def pod(name, ns="ns", group="g", gpus=8, size=2, gated=True, node_name=None, created="2026-12-05T10:00:00Z",
        selector=None, tolerations=(), domain=None, hosts=None, phase="Pending", unschedulable=False):
    spec = {"containers": [{"args": ["--nnodes", str(size)], "resources": {"limits": {GPU: str(gpus), "cpu": "1"}}}]}
    if gated:
        spec["schedulingGates"] = [{"name": names.GANG_GATE}]
    if node_name:
        spec["nodeName"] = node_name
    if selector:
        spec["nodeSelector"] = selector
    if tolerations:
        spec["tolerations"] = list(tolerations)
    affinity = {}
    if domain:
        affinity["podAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {names.LABEL_GROUP: group}}, "topologyKey": domain}]}
    if hosts:
        affinity["nodeAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": list(hosts)}]}]}}
    if affinity:
        spec["affinity"] = affinity
    conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}] if unschedulable else []
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created,
                         "labels": {names.LABEL_GROUP: group}},
            "spec": spec, "status": {"phase": phase, "conditions": conditions}}


def released(owned, nodes, bound=()):
    groups, _ = gates.waiting_groups(owned)
    return [g.key[1] for g, _ in capacity.admit(groups, nodes, capacity.used_on_nodes(bound))]


def test_a_group_is_released_only_when_every_pod_has_room():
    nodes = [node("a"), node("b")]
    assert released([pod("g-0"), pod("g-1")], nodes) == ["g"]
    # one node: the first pod would fit, the second not: nothing is released
    assert released([pod("g-0"), pod("g-1")], [node("a")]) == []
    # room taken by a pod bound there
    assert released([pod("g-0"), pod("g-1")], nodes, [pod("other", gpus=1, gated=False, node_name="b")]) == []
    # a finished pod takes nothing
    done = pod("other", gpus=8, gated=False, node_name="b", phase="Succeeded")
    assert released([pod("g-0"), pod("g-1")], nodes, [done]) == ["g"]


def test_two_groups_that_fit_one_at_a_time_are_never_released_together_oldest_first():
    nodes = [node("a"), node("b")]
    owned = [pod("y-0", group="young", created="2026-12-05T10:00:05Z"), pod("y-1", group="young", created="2026-12-05T10:00:05Z"),
             pod("o-0", group="old"), pod("o-1", group="old")]
    assert released(owned, nodes) == ["old"]
    # a smaller group behind a big one that does not fit still goes (best effort FIFO)
    owned = [pod("b-0", group="big", gpus=16), pod("b-1", group="big", gpus=16),
             pod("s-0", group="small", gpus=1, created="2026-12-05T10:00:09Z"),
             pod("s-1", group="small", gpus=1, created="2026-12-05T10:00:09Z")]
    assert released(owned, nodes) == ["small"]


def test_incomplete_groups_wait_and_a_group_lifted_halfway_is_finished():
    nodes = [node("a"), node("b")]
    assert released([pod("g-0")], nodes) == []                 # rank 1 not created yet
    groups, stragglers = gates.waiting_groups([pod("g-0", gated=False), pod("g-1")])
    assert groups == [] and [p["metadata"]["name"] for p in stragglers] == ["g-1"]


def test_node_selector_affinity_taints_and_readiness_are_honoured():
    nodes = [node("a", labels={"pool": "h100"}), node("b", labels={"pool": "h100"}, taints=[("gpu", "x", "NoSchedule")]),
             node("c", labels={"pool": "a100"}), node("d", ready=False, labels={"pool": "h100"}),
             node("e", unschedulable=True, labels={"pool": "h100"})]
    h100 = {"pool": "h100"}
    assert released([pod("g-0", selector=h100), pod("g-1", selector=h100)], nodes) == []
    tolerate = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert released([pod("g-0", selector=h100, tolerations=tolerate),
                     pod("g-1", selector=h100, tolerations=tolerate)], nodes) == ["g"]
    assert released([pod("g-0", hosts=["a", "c"]), pod("g-1", hosts=["a", "c"])], nodes) == ["g"]
    assert released([pod("g-0", hosts=["a"]), pod("g-1", hosts=["a"])], nodes) == []


def test_a_group_domain_keeps_the_whole_group_in_one_domain():
    nodes = [node("a", labels={"rack": "r1"}), node("b", labels={"rack": "r2"}),
             node("c", labels={"rack": "r2"})]
    owned = [pod("g-0", domain="rack"), pod("g-1", domain="rack")]
    assert released(owned, nodes) == ["g"]
    (group,), _ = gates.waiting_groups(owned)
    placement = capacity.place(group, nodes, {n.name: n.allocatable for n in nodes})
    assert set(placement.values()) == {"b", "c"}
    # r2 has no room left: the two racks together would, but no single one does
    busy = [pod("x", gpus=8, gated=False, node_name="c")]
    assert released(owned, nodes, busy) == []


def test_extended_resources_and_needs():
    assert capacity.extended({GPU: "8", "cpu": "4", "memory": "1Gi", "hugepages-2Mi": "1Gi"}) == Counter({GPU: 8})
    spec = {"containers": [{"resources": {"requests": {GPU: "2"}, "limits": {GPU: "2"}}},
                           {"resources": {"limits": {"amd.com/gpu": "1"}}}],
            "initContainers": [{"resources": {"limits": {GPU: "4"}}}]}
    assert capacity.pod_needs(spec) == Counter({GPU: 4, "amd.com/gpu": 1})


def test_in_flight_pods_hold_further_releases_until_bound_or_given_up():
    assert gates.in_flight(pod("g-0", gated=False))
    assert not gates.in_flight(pod("g-0", gated=False, node_name="a"))
    assert not gates.in_flight(pod("g-0", gated=False, unschedulable=True))
    assert not gates.in_flight(pod("g-0"))


class FakeDynamic:
    """Enough of the dynamic client for GateKeeper.run_once: resources and patches recorded."""

    class Resources:
        def get(self, api_version, kind):
            return kind

    def __init__(self):
        self.resources = self.Resources()
        self.patches = []

    def patch(self, resource, name, namespace, body, content_type, field_manager):
        self.patches.append((namespace, name, body))


def test_the_keeper_lifts_every_gate_of_a_released_group_and_nothing_else():
    dyn = FakeDynamic()
    owned = [pod("g-0"), pod("g-1"), pod("h-0", group="h", created="2026-12-05T10:00:05Z"),
             pod("h-1", group="h", created="2026-12-05T10:00:05Z")]
    keeper = gates.GateKeeper(dyn, lambda: owned)
    keeper.permitted = keeper.watching = True
    nodes = [{"metadata": {"name": n, "labels": {}}, "spec": {},
              "status": {"allocatable": {GPU: "8"}, "conditions": [{"type": "Ready", "status": "True"}]}}
             for n in ("a", "b")]
    keeper.nodes.everything = lambda: nodes
    keeper.bound.everything = lambda: []
    assert keeper.run_once() == [("ns", "g")]
    assert dyn.patches == [("ns", "g-0", {"spec": {"schedulingGates": None}}),
                           ("ns", "g-1", {"spec": {"schedulingGates": None}})]
    # g's pods now unbound and ungated: in flight, so h waits even once room appears
    owned[:2] = [pod("g-0", gated=False), pod("g-1", gated=False)]
    assert keeper.run_once() == []
    # without the capacity view the keeper never leaves a gate behind
    keeper.permitted = False
    assert keeper.run_once() == [("ns", "h")]


def test_with_pod_groups_served_auto_watches_no_node_and_no_pod_and_gates_nothing():
    """`--gang-scheduling auto` where the cluster serves PodGroups: the capacity view (every node,
    every bound pod) is not watched, new pods are not gated, and a gate found is lifted; once the
    Workload API goes away (asked again a minute later) the watches start and gating resumes."""
    dyn = FakeDynamic()
    served = [True]
    owned = [pod("g-0"), pod("g-1")]
    keeper = gates.GateKeeper(dyn, lambda: owned, needed=lambda: not served[0])
    started = []
    keeper.nodes.start = lambda: started.append("nodes")
    keeper.bound.start = lambda: started.append("pods")
    keeper._can_see_capacity = lambda: True
    keeper._run = lambda: None
    keeper.start()
    assert keeper.permitted and not keeper.active() and started == []
    assert keeper.run_once() == [("ns", "g")]          # never left behind a gate
    served[0] = False
    keeper._watch_if_needed()
    assert started == [], "discovery is not asked again within the minute"
    keeper._asked -= gates.NEEDED_RECHECK_SECONDS
    keeper._watch_if_needed()
    assert started == ["nodes", "pods"] and keeper.active()
