"""The operator's watch-fed caches (world/cache.py): once synced, an observation makes no API read;
a change of an owned object reaches the cache and triggers its owner's reconcile."""

import threading
import time

import pytest
from moe_operator.api import names
from moe_operator.world.observe import Reader

pytestmark = pytest.mark.unit


def owned(kind, name, deployment="m", namespace="ns", **labels):
    return {"kind": kind, "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1", "labels": {
        names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_DEPLOYMENT: deployment, **labels}}}


class Listed:
    def __init__(self, body):
        self.body = body

    def to_dict(self):
        return self.body


class FakeDynamic:
    def __init__(self):
        self.objects = {"Pod": [owned("Pod", "m-a-0-0"), owned("Pod", "other-0", deployment="other")],
                        "Service": [owned("Service", "m")], "ControllerRevision": []}
        self.reads = []
        self.events = {kind: [] for kind in self.objects}
        self.stop = threading.Event()
        self.resources = self

    def get(self, api_version=None, kind=None, resource=None, **kwargs):
        if resource is None and kind is not None and "label_selector" not in kwargs:   # discovery
            if kind in self.objects:
                return type("Resource", (), {"kind": kind})()
            raise __import__("kubernetes").dynamic.exceptions.ResourceNotFoundError(kind)
        resource = api_version if resource is None else resource
        self.reads.append(resource.kind)
        selector = kwargs.get("label_selector", "")
        items = [o for o in self.objects[resource.kind]
                 if all(f"{k}={v}" in selector or k not in selector for k, v in o["metadata"]["labels"].items())]
        return Listed({"items": items, "metadata": {"resourceVersion": "1"}})

    def watch(self, resource, **kwargs):
        while not self.stop.is_set():
            if self.events[resource.kind]:
                yield self.events[resource.kind].pop(0)
            else:
                time.sleep(0.01)


def test_a_synced_cache_answers_without_reading_and_a_change_triggers_its_owner():
    dyn = FakeDynamic()
    changed = []
    reader = Reader(dyn)
    reader.rules_resource = lambda: None
    reader.pod_groups_resource = lambda: None
    try:
        assert [p.name for p in reader.observe("ns", "m", 1).pods] == ["m-a-0-0"]   # not synced: listed
        caches = reader.use_caches([], on_change=changed.append)
        deadline = time.monotonic() + 5
        while not all(c.synced for c in caches):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        dyn.reads.clear()
        observed = reader.observe("ns", "m", 1)
        assert [p.name for p in observed.pods] == ["m-a-0-0"] and list(observed.services) == ["m"]
        assert dyn.reads == []   # no API read
        dyn.events["Pod"].append({"type": "ADDED", "raw_object": owned("Pod", "m-a-0-1")})
        while [p.name for p in reader.observe("ns", "m", 1).pods] != ["m-a-0-0", "m-a-0-1"]:
            assert time.monotonic() < deadline + 5
            time.sleep(0.01)
        assert ("ns", "m") in changed and dyn.reads == []
        dyn.events["Pod"].append({"type": "DELETED", "raw_object": owned("Pod", "m-a-0-0")})
        while [p.name for p in reader.observe("ns", "m", 1).pods] != ["m-a-0-1"]:
            assert time.monotonic() < deadline + 10
            time.sleep(0.01)
    finally:
        dyn.stop.set()
        for cache in reader._caches.values():
            cache.stop()


def test_caches_and_the_controller_keep_objects_without_managed_fields():
    """At 2,000 ModelDeployments memory is the limit: managedFields (and kopf's copy of the spec) are
    never read and are dropped from what is kept."""
    from moe_operator.app.controller import Controller
    from moe_operator.world.cache import KOPF_DIFFBASE, KindCache

    dyn = FakeDynamic()
    pod = owned("Pod", "m-a-0-0")
    pod["metadata"]["managedFields"] = [{"manager": "moe-operator", "fieldsV1": {"f:spec": {}}}]
    dyn.objects["Pod"] = [pod]
    cache = KindCache(dyn, type("Resource", (), {"kind": "Pod"})())
    cache._list(None)
    (kept,) = cache.items("ns", "m")
    assert "managedFields" not in kept["metadata"] and kept["metadata"]["name"] == "m-a-0-0"
    controller = Controller(reader=None, writer=None)
    md = {"metadata": {"name": "m", "namespace": "ns", "resourceVersion": "5",
                       "annotations": {KOPF_DIFFBASE: '{"spec": {}}', "keep": "me"},
                       "managedFields": [{"manager": "kubectl"}]}, "spec": {"replicas": 1}}
    controller.remember(md)
    stored = controller.body(("ns", "m"))
    assert "managedFields" not in stored["metadata"] and stored["metadata"]["annotations"] == {"keep": "me"}
    assert stored["spec"] == {"replicas": 1}
