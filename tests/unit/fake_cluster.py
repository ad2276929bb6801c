"""An in-memory cluster for reconcile tests: it stores what the operator writes as the API server
would (server-side apply, relabels, deletes by uid, merge-patched status, the scale subresource),
and tests play kubelet and scheduler by setting pod status."""

import copy
import itertools

from moe_operator.analysis import Baselines
from moe_operator.api import names
from moe_operator.api.timestamps import iso
from moe_operator.apply import StatusConflict
from moe_operator.reconcile import reconcile
from moe_operator.world.observe import observed_from

T0 = 1_800_000_000.0          # the rollout and autoscaling clock starts here
DRAIN = 5.0                   # spec.runtime.drainSeconds' default


def merge(target, patch):
    """Apply a JSON merge patch (RFC 7386), as the API server does for the status subresource."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class FakeCluster:
    """Reads and Writes of reconcile over dicts; `time` is the clock the reconcile sees."""

    def __init__(self, spec):
        self.md = {"apiVersion": names.API_VERSION, "kind": names.KIND,
                   "metadata": {"name": "chat", "namespace": "ns", "uid": "md-uid", "generation": 1,
                                "resourceVersion": "1"},
                   "spec": spec, "status": {}}
        self.objects = {}          # (kind, name) -> body
        self.writes = []
        self.events = []
        self.scales = []
        self.uids = itertools.count()
        self.clock = itertools.count()
        self.time = T0
        self.baselines = Baselines()

    # Reads
    def observe(self, namespace, name, pods_per_replica):
        pods = [copy.deepcopy(b) for (k, _), b in self.objects.items() if k == "Pod"]
        services = [copy.deepcopy(b) for (k, _), b in self.objects.items() if k == "Service"]
        revisions = [copy.deepcopy(b) for (k, _), b in self.objects.items() if k == "ControllerRevision"]
        return observed_from(pods, services, pods_per_replica, revisions=revisions)

    def collect_signal(self, settings, namespace, name, observed, memory):
        raise AssertionError("this cluster has no autoscaling signal")

    # Writes
    def write(self, namespace, changes):
        for body in changes.applies:
            key = (body["kind"], body["metadata"]["name"])
            self.writes.append(("apply", key))
            old = self.objects.get(key)
            assert not (old and body["kind"] == "Pod"), f"re-applied existing pod {key}: pod specs are immutable"
            assert not (old and body["kind"] == "ControllerRevision" and old["data"] != body["data"]), \
                f"{key}: a ControllerRevision's data is immutable"
            new = copy.deepcopy(body)
            new["metadata"]["uid"] = old["metadata"]["uid"] if old else f"uid-{next(self.uids)}"
            new["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"] if old else iso(self.time)
            new["status"] = old.get("status", {}) if old else {"phase": "Pending"}
            self.objects[key] = new
        for name, patch in changes.relabels:
            self.writes.append(("relabel", ("Pod", name)))
            self.objects[("Pod", name)]["metadata"] = merge(self.objects[("Pod", name)]["metadata"], patch)
        for kind, name, uid in changes.delete:
            self.writes.append(("delete", (kind, name)))
            if self.objects.get((kind, name), {}).get("metadata", {}).get("uid") == uid:
                del self.objects[(kind, name)]

    def patch_status(self, namespace, name, patch, resource_version=None):
        if resource_version is not None and resource_version != self.md["metadata"].get("resourceVersion"):
            raise StatusConflict(f"{name}: {resource_version} is stale")
        self.writes.append(("status", tuple(sorted(patch))))
        self.md["status"] = merge(self.md["status"], patch)
        self._bump()
        return self.md

    def scale(self, namespace, name, replicas):
        self.scales.append(replicas)
        self.md["spec"]["replicas"] = replicas
        self.md["metadata"]["generation"] += 1
        return self._bump()

    def read(self, namespace, name):
        return copy.deepcopy(self.md)

    def _bump(self) -> str:
        """A write moves the ModelDeployment's resourceVersion on, as the API server does."""
        version = str(int(self.md["metadata"].get("resourceVersion") or 0) + 1)
        self.md["metadata"]["resourceVersion"] = version
        return version

    def reconcile(self):
        self.writes.clear()
        return reconcile(copy.deepcopy(self.md), self, self, lambda *e: self.events.append(e), self.baselines,
                         now=lambda: f"t{next(self.clock)}", clock=lambda: self.time,
                         collect_signal=self.collect_signal)

    def converge(self, ready=True, rounds=10, drain=True):
        """Reconcile until nothing is written; with `drain`, the clock moves on to the end of a
        drain period the reconcile waits for (a group out of rotation, deleted once drained)."""
        for _ in range(rounds):
            if ready:
                self.set_ready()
            out = self.reconcile()
            if not out.wrote:
                if drain and self.draining() and out.requeue_after is not None and out.requeue_after <= DRAIN:
                    self.time += out.requeue_after
                    continue
                return
        raise AssertionError("did not converge")

    def advance(self):
        """One reconcile; when it writes nothing because groups are draining, the clock moves to the
        end of the drain and it reconciles again (what the operator's requeue does)."""
        out = self.reconcile()
        if not out.wrote and self.draining() and out.requeue_after is not None and out.requeue_after <= DRAIN:
            self.time += out.requeue_after
            out = self.reconcile()
        return out

    def draining(self):
        """Pods out of rotation that wait for their drain period to end."""
        return [n for n, p in self.pods().items()
                if names.ANNOTATION_OUT_OF_ROTATION in (p["metadata"].get("annotations") or {})
                and p["metadata"]["labels"].get(names.LABEL_IN_ROTATION) == "false"]

    # The kubelet and scheduler.
    def pods(self):
        return {n: b for (k, n), b in self.objects.items() if k == "Pod"}

    def set_ready(self, only=lambda name: True, ready=True):
        for name, pod in self.pods().items():
            if only(name):
                pod["status"] = {"phase": "Running", "podIP": "127.100.0.9", "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True" if ready else "False"}]}

    def labels(self, name):
        return self.objects[("Pod", name)]["metadata"]["labels"]

    def set_spec(self, **changes):
        self.md["spec"].update(changes)
        self.md["metadata"]["generation"] += 1

    def conditions(self):
        return {c["type"]: (c["status"], c["reason"]) for c in self.md["status"]["conditions"]}
