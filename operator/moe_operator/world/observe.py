"""What is there: the pods and Services of a ModelDeployment, grouped into replica groups.

`observed_from(...)` is pure (tests feed it pod bodies); `Reader` is the one place that reads the API.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import (
    ForbiddenError,
    NotFoundError,
    ResourceNotFoundError,
    ResourceNotUniqueError,
)

from ..api import names
from ..api.timestamps import epoch
from . import capacity
from .cache import KindCache, owner_of
from .revisions import Recorded, recorded_from

RULES_RECHECK_SECONDS = 60.0   # how often discovery is asked whether an optional API (a CRD) is served
POD_GROUP_API_VERSION, POD_GROUP_KIND = "scheduling.k8s.io/v1alpha2", "PodGroup"   # desired/gang.py

# Container states that will not get better by waiting: the user must change something.
FAILING_WAITING_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "ErrImageNeverPull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreCreateHookError",
    "PostStartHookError",
})


@dataclass(frozen=True)
class ObservedPod:
    name: str
    uid: str
    revision: str
    track: str
    replica: int | None
    rank: int | None
    in_rotation: bool
    phase: str
    terminating: bool
    ready: bool
    unschedulable: str | None = None          # the scheduler's message when PodScheduled=False/Unschedulable
    failure: tuple[str, str] | None = None     # (reason, message) when the pod is failing
    out_of_rotation_since: float | None = None   # when the operator took it out of rotation (its own clock)
    stale: bool = False                        # its spec is not what its revision's template builds
    restarts: int = 0                          # container restarts (sum over its containers)
    started: bool = False                      # its containers passed their startup probes (since their last start)
    last_exit: str | None = None               # how its container last ended, when it restarted
    body: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def live(self) -> bool:
        """Counts toward its group: not being deleted, not finished, with well-formed labels."""
        return (not self.terminating and self.phase not in ("Failed", "Succeeded")
                and self.replica is not None and self.rank is not None and bool(self.revision))

    @property
    def loading(self) -> bool:
        """Scheduled and starting or loading the model, not failing."""
        return self.live and not self.ready and self.unschedulable is None and self.failure is None


@dataclass(frozen=True)
class Group:
    """One replica group: the live pods of one (revision, replica), ranks 0..size-1."""

    revision: str
    replica: int
    size: int
    pods: Mapping[int, ObservedPod]

    @property
    def complete(self) -> bool:
        return all(rank in self.pods for rank in range(self.size))

    @property
    def ready(self) -> bool:
        return self.complete and all(p.ready for p in self.pods.values())

    @property
    def in_rotation(self) -> bool:
        return any(p.in_rotation for p in self.pods.values())

    @property
    def stale(self) -> bool:
        """A pod of the group does not run its revision's template: the group is replaced."""
        return any(p.stale for p in self.pods.values())

    @property
    def broken(self) -> tuple[int, str] | None:
        """(rank, why) when a group of several pods has lost a rank: a container that restarted, or
        a rank missing while its peers are ready. Its ranks share collectives, so it cannot recover
        in place: it leaves rotation and is re-created whole (LeaderWorkerSet's
        RecreateGroupOnPodRestart). A pod that cannot start at all (an image that cannot be pulled,
        a bad config) is not: re-creating would not help, and it stays Degraded for the user.
        None for a healthy (or single-pod) group."""
        if self.size < 2:
            return None
        for rank, pod in sorted(self.pods.items()):
            if pod.restarts:
                return rank, f"pod {pod.name} restarted ({pod.last_exit or 'its container exited'})"
        missing = [rank for rank in range(self.size) if rank not in self.pods]
        # A peer that started (its ranks met the missing one's) has lost it, ready or not: it goes
        # unready before it exits; a group still being made has no started pod.
        if missing and any(p.ready or p.started for p in self.pods.values()):
            return missing[0], "its pod is gone"
        return None

    @property
    def out_of_rotation_since(self) -> float | None:
        """When the group left rotation (None: it never was in rotation, or is in it now)."""
        if self.in_rotation:
            return None
        times = [p.out_of_rotation_since for p in self.pods.values() if p.out_of_rotation_since is not None]
        return max(times) if times else None

    @property
    def track(self) -> str:
        leader = self.pods.get(0) or next(iter(self.pods.values()))
        return leader.track


@dataclass(frozen=True)
class Observed:
    pods: tuple[ObservedPod, ...] = ()
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    pods_per_replica: int = 1                  # group size of a revision with no known template
    # The ModelDeployment's PrometheusRules by name; None where there is no PrometheusRule CRD (or
    # the operator may not list them): then none is rendered.
    rules: Mapping[str, Mapping[str, Any]] | None = None
    revisions: Mapping[str, Recorded] = field(default_factory=dict)   # recorded templates by revision
    # The ModelDeployment's PodGroups by name; None where the cluster does not serve the gang
    # scheduling API (scheduling.k8s.io/v1alpha2): then pods get no scheduling group.
    pod_groups: Mapping[str, Mapping[str, Any]] | None = None
    # No PodGroups, and the operator's own gang admission runs (app/gates.py): a multi-pod group's
    # pods are created behind a scheduling gate, lifted together when the group fits.
    gates: bool = False
    sizes: Mapping[str, int] = field(default_factory=dict)            # pods per group, by revision
    gpus: Mapping[str, int] = field(default_factory=dict)             # GPUs per pod, by revision

    def size_of(self, revision: str) -> int:
        return self.sizes.get(revision, self.pods_per_replica)

    @cached_property
    def groups(self) -> dict[tuple[str, int], Group]:
        by_key: dict[tuple[str, int], dict[int, ObservedPod]] = {}
        for pod in self.pods:
            if pod.live and pod.rank < self.size_of(pod.revision):
                by_key.setdefault((pod.revision, pod.replica), {})[pod.rank] = pod
        return {key: Group(key[0], key[1], self.size_of(key[0]), ranks) for key, ranks in sorted(by_key.items())}

    def groups_of(self, revision: str) -> list[Group]:
        return [g for g in self.groups.values() if g.revision == revision]

    def serving_leaders(self, revision: str | None = None, in_rotation_only: bool = False) -> list[ObservedPod]:
        """Ready group leaders (rank 0: the pod the Services send to) with a pod IP, of `revision`
        if given, and only those in rotation if asked: the pods whose /metrics tell how serving goes."""
        return [p for p in self.pods
                if p.rank == 0 and p.ready and p.live and (p.body.get("status") or {}).get("podIP")
                and (revision is None or p.revision == revision) and (p.in_rotation or not in_rotation_only)]


def _int_label(labels: Mapping[str, str], key: str) -> int | None:
    try:
        return int(labels.get(key, ""))
    except ValueError:
        return None


def _condition(pod: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if cond.get("type") == ctype:
            return cond
    return None


def _failure(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return status.get("reason") or "Failed", status.get("message") or "the pod failed"
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILING_WAITING_REASONS:
            message = waiting.get("message") or ""
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if not message and last:
                message = f"exit code {last.get('exitCode')}: {last.get('reason') or ''}".strip()
            return waiting["reason"], message
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        # Crashed at least once and not ready again yet: report it now rather than at the back-off.
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if not cs.get("ready") and cs.get("restartCount", 0) >= 1 and last.get("exitCode", 0) != 0:
            return "CrashLoopBackOff", (f"container {cs.get('name')} exited with code {last.get('exitCode')} "
                                        f"({last.get('reason') or 'Error'}), restarted {cs['restartCount']}x")
    return None


def _restarts(pod: Mapping[str, Any]) -> int:
    return sum(int(cs.get("restartCount") or 0) for cs in (pod.get("status") or {}).get("containerStatuses") or ())


def _started(pod: Mapping[str, Any]) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or ()
    return bool(statuses) and all(cs.get("started") for cs in statuses)


def _last_exit(pod: Mapping[str, Any]) -> str | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if last:
            return f"container {cs.get('name')} exited with code {last.get('exitCode')}" + (
                f" ({last['reason']})" if last.get("reason") else "")
    return None


def observed_pod(body: Mapping[str, Any]) -> ObservedPod:
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    ready = _condition(body, "Ready")
    scheduled = _condition(body, "PodScheduled")
    unschedulable = None
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "no node fits the pod"
    return ObservedPod(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        revision=labels.get(names.LABEL_REVISION, ""),
        track=labels.get(names.LABEL_TRACK, names.TRACK_STABLE),
        replica=_int_label(labels, names.LABEL_REPLICA),
        rank=_int_label(labels, names.LABEL_RANK),
        in_rotation=labels.get(names.LABEL_IN_ROTATION) == "true",
        phase=(body.get("status") or {}).get("phase") or "Pending",
        terminating=bool(meta.get("deletionTimestamp")),
        ready=bool(ready and ready.get("status") == "True"),
        unschedulable=unschedulable,
        failure=_failure(body),
        restarts=_restarts(body),
        started=_started(body),
        last_exit=_last_exit(body),
        out_of_rotation_since=epoch((meta.get("annotations") or {}).get(names.ANNOTATION_OUT_OF_ROTATION)),
        body=body,
    )


def observed_from(pods: Iterable[Mapping[str, Any]], services: Iterable[Mapping[str, Any]],
                  pods_per_replica: int = 1, rules: Iterable[Mapping[str, Any]] | None = None,
                  revisions: Iterable[Mapping[str, Any]] = (),
                  pod_groups: Iterable[Mapping[str, Any]] | None = None, gates: bool = False) -> Observed:
    """Pure: the observation from pod, Service, PrometheusRule and ControllerRevision bodies (as the
    API returns them)."""
    recorded = [r for r in (recorded_from(b) for b in revisions) if r is not None]
    return Observed(
        pods=tuple(sorted((observed_pod(p) for p in pods), key=lambda p: p.name)),
        services={s["metadata"]["name"]: s for s in services},
        pods_per_replica=pods_per_replica,
        rules=None if rules is None else {r["metadata"]["name"]: r for r in rules},
        revisions={r.revision: r for r in sorted(recorded, key=lambda r: r.number)},
        pod_groups=None if pod_groups is None else {g["metadata"]["name"]: g for g in pod_groups},
        gates=gates and pod_groups is None,
    )


class Reader:
    """The one reader of a ModelDeployment's pods, Services, ControllerRevisions and (where served)
    PodGroups and PrometheusRules: from the watch-fed caches once `use_caches` has started them and
    they are synced (world/cache.py), else by label from the API."""

    def __init__(self, dynamic_client, clock: Callable[[], float] = time.monotonic):
        self.dyn = dynamic_client
        self._pods = dynamic_client.resources.get(api_version="v1", kind="Pod")
        self._services = dynamic_client.resources.get(api_version="v1", kind="Service")
        self._revisions = dynamic_client.resources.get(api_version="apps/v1", kind="ControllerRevision")
        self.clock = clock
        self._optional: dict[tuple[str, str], tuple[Any, float]] = {}   # (api, kind) -> (resource, checked)
        self._discovery = threading.Lock()   # the client's discovery cache is not safe to refresh concurrently
        self._caches: dict[str, KindCache] = {}
        self._cache_scope: list[str] | None = None
        self._on_change = None
        self.caching = False
        # --gang-scheduling: "auto" (PodGroups where served, else scheduling gates when the gate
        # keeper runs), "workload" (PodGroups only), "gates" (scheduling gates only), "none".
        self.gang_mode = "auto"
        self.gates_active: Callable[[], bool] = lambda: False   # the gate keeper can see the cluster's capacity

    def use_caches(self, namespaces: list[str] | None, on_change=None) -> list[KindCache]:
        """Start the caches (every namespace when `namespaces` is empty); `on_change(key)` is called
        for the owner of every object that changes. Observations read from them once synced."""
        self.caching, self._cache_scope, self._on_change = True, list(namespaces or []), on_change
        for kind, resource in (("Pod", self._pods), ("Service", self._services),
                               ("ControllerRevision", self._revisions)):
            self._cache(kind, resource)
        return list(self._caches.values())

    def _cache(self, kind: str, resource: Any) -> KindCache | None:
        if not self.caching or resource is None:
            return None
        cache = self._caches.get(kind)
        if cache is None:
            mark = capacity.gang_relevant if kind == "Pod" else None
            cache = self._caches[kind] = KindCache(self.dyn, resource, self._cache_scope, self._on_change, mark=mark)
            cache.start()
        return cache

    def _items(self, kind: str, resource: Any, namespace: str, name: str, selector: str) -> list:
        cache = self._cache(kind, resource)
        items = cache.items(namespace, name) if cache is not None else None
        if items is None:   # no cache, or not synced yet: ask the API server
            items = self.dyn.get(resource, namespace=namespace, label_selector=selector).to_dict().get("items") or []
        return items

    def _optional_resource(self, api_version: str, kind: str) -> Any:
        """A resource the cluster may or may not serve (a CRD, an alpha API), or None. Discovery is
        asked again every RULES_RECHECK_SECONDS (it may be installed or removed while the operator runs)."""
        now = self.clock()
        resource, checked = self._optional.get((api_version, kind), (None, None))
        if checked is None or now - checked >= RULES_RECHECK_SECONDS:
            with self._discovery:   # reconciles on many threads: one asks, the others take its answer
                resource, checked = self._optional.get((api_version, kind), (None, None))
                if checked is None or now - checked >= RULES_RECHECK_SECONDS:
                    try:   # a miss refreshes the discovery cache (the client does), a hit costs nothing
                        resource = self.dyn.resources.get(api_version=api_version, kind=kind)
                    except (ResourceNotFoundError, ResourceNotUniqueError, ApiException):
                        resource = None
                    self._optional[(api_version, kind)] = (resource, now)
        return resource

    def _forget(self, api_version: str, kind: str) -> None:
        self._optional[(api_version, kind)] = (None, self.clock())

    def rules_resource(self) -> Any:
        """The PrometheusRule resource, or None without the CRD."""
        return self._optional_resource(names.RULE_API_VERSION, names.RULE_KIND)

    def pod_groups_resource(self) -> Any:
        """The PodGroup resource (gang scheduling), or None where the cluster does not serve it."""
        return self._optional_resource(POD_GROUP_API_VERSION, POD_GROUP_KIND)

    def _list_optional(self, resource: Any, api_version: str, kind: str, namespace: str, selector: str,
                       name: str = ""):
        """The items of an optional resource, or None (gone since discovery, or no RBAC for it)."""
        if resource is None:
            return None
        try:
            return self._items(kind, resource, namespace, name, selector)
        except NotFoundError:               # the CRD / API went away: forget it, ask discovery afresh
            self._forget(api_version, kind)
            self.dyn.resources.invalidate_cache()
        except ForbiddenError:              # no RBAC for them: none, look again later
            self._forget(api_version, kind)
        return None

    def observe(self, namespace: str, name: str, pods_per_replica: int) -> Observed:
        selector = names.selector_string(names.owned_selector(name))
        pods = self._items("Pod", self._pods, namespace, name, selector)
        services = self._items("Service", self._services, namespace, name, selector)
        revisions = self._items("ControllerRevision", self._revisions, namespace, name, selector)
        rules = self._list_optional(self.rules_resource(), names.RULE_API_VERSION, names.RULE_KIND,
                                    namespace, selector, name)
        pod_groups = None
        if self.gang_mode in ("auto", "workload"):
            pod_groups = self._list_optional(self.pod_groups_resource(), POD_GROUP_API_VERSION, POD_GROUP_KIND,
                                             namespace, selector, name)
        gates = self.gang_mode in ("auto", "gates") and self.gates_active()
        return observed_from(pods, services, pods_per_replica, rules, revisions, pod_groups, gates)

    def gang_pods(self) -> list[dict[str, Any]] | None:
        """What gang admission looks at, from the pod cache (None without caches or until synced):
        the operator's group pods that are gated or not bound yet, and all the pods of the
        ModelDeployments that have a gated one (a group half released is finished)."""
        cache = self._caches.get("Pod")
        relevant = cache.marked() if cache is not None else None
        if relevant is None:
            return None
        pods = {(p["metadata"].get("namespace"), p["metadata"].get("name")): p for p in relevant}
        for owner in sorted({owner_of(p) for p in relevant if capacity.gated(p)} - {None}):
            for p in cache.items(*owner) or ():
                pods.setdefault((p["metadata"].get("namespace"), p["metadata"].get("name")), p)
        return list(pods.values())
