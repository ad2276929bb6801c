"""A multi-pod group that keeps losing a rank is re-created with a back-off, as the kubelet backs off
a crashing container: the first re-creation at once, then 10 s, 20 s, ... up to 5 minutes; the count
survives in status.groupRestarts and starts over after 10 quiet minutes."""

import copy

import pytest
from fake_cluster import FakeCluster
from moe_operator.api import names
from moe_operator.rollout.restarts import Restarts, recorded

pytestmark = pytest.mark.unit

SPEC = {"replicas": 1, "model": {"source": "builtin:tiny-deepseek-v3"}, "resources": {"gpus": 1},
        "topology": {"podsPerReplica": 2}}


def lose_rank_1(c: FakeCluster) -> set[str]:
    """Deletes rank 1's pod of the serving group (as a node loss would); returns the group's pods."""
    pods = c.pods()
    group = {n for n, p in pods.items() if p["metadata"]["labels"][names.LABEL_IN_ROTATION] == "true"}
    (rank_1,) = [n for n in group if c.labels(n)[names.LABEL_RANK] == "1"]
    del c.objects[("Pod", rank_1)]
    return group


def degraded(c: FakeCluster) -> dict:
    return next(x for x in c.md["status"]["conditions"] if x["type"] == "Degraded")


def test_back_off_grows_between_re_creations_of_a_group_that_keeps_failing():
    c = FakeCluster(copy.deepcopy(SPEC))
    c.converge()

    # 1st loss: the group is made again at once.
    old = lose_rank_1(c)
    c.converge()
    assert len(c.pods()) == 2 and not old & set(c.pods())
    (record,) = c.md["status"]["groupRestarts"]
    assert record["restarts"] == 1

    # 2nd loss within 10 minutes: the broken group goes, but the next one waits 10 s.
    c.time += 60
    old = lose_rank_1(c)
    out = c.reconcile()
    c.converge()
    assert not old & set(c.pods()) and c.pods() == {}, "a group was made during its back-off"
    assert c.md["status"]["groupRestarts"][0]["restarts"] == 2
    d = degraded(c)
    assert d["status"] == "True" and d["reason"] == "GroupRestarting"
    assert "lost rank 1" in d["message"] and "back-off: the 2nd re-creation in a row" in d["message"], d
    assert c.conditions()["Available"][0] == "False"
    out = c.reconcile()
    assert not out.wrote and out.requeue_after is not None and 0 < out.requeue_after <= 10.0

    c.time += out.requeue_after
    c.converge()
    assert len(c.pods()) == 2 and c.conditions()["Available"][0] == "True"
    assert c.conditions()["Degraded"][0] == "False"

    # 3rd loss: 20 s.
    c.time += 30
    lose_rank_1(c)
    c.converge()
    assert c.pods() == {}
    out = c.reconcile()
    assert 10.0 < out.requeue_after <= 20.0
    c.time += out.requeue_after
    c.converge()
    assert len(c.pods()) == 2

    # Ten quiet minutes after the back-off: the count is forgotten, the next loss is re-created at once.
    c.time += 20 + 600
    c.converge()
    assert "groupRestarts" not in c.md["status"]
    lose_rank_1(c)
    c.converge()
    assert len(c.pods()) == 2 and c.md["status"]["groupRestarts"][0]["restarts"] == 1


def test_the_back_off_doubles_up_to_five_minutes_and_reads_back_what_it_wrote():
    assert [Restarts("r", n, 0.0).wait for n in (1, 2, 3, 4, 5, 6, 7, 8, 12)] == \
        [0, 10, 20, 40, 80, 160, 300, 300, 300]
    r = Restarts("r", 3, 1_800_000_000.0, (0, 2))
    assert recorded({"groupRestarts": [r.to_json()]}) == {"r": r}
    # what it cannot read starts over rather than failing the reconcile
    assert recorded({"groupRestarts": [{"revision": "r", "restarts": "x"}, "junk"]}) == {}


def test_a_one_pod_deployment_has_no_back_off():
    c = FakeCluster({**copy.deepcopy(SPEC), "topology": {"podsPerReplica": 1}})
    c.converge()
    for _ in range(3):
        (name,) = c.pods()
        c.objects[("Pod", name)]["status"] = {"phase": "Failed", "reason": "Evicted"}
        c.reconcile()
        c.converge()
        assert len(c.pods()) == 1
    assert "groupRestarts" not in c.md["status"]
