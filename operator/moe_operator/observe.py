"""What is there: the pods and Services of a ModelDeployment, grouped into replica groups.

`observed_from(...)` is pure (tests feed it pod bodies); `Reader` is the one place that reads the API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from . import names

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
    def track(self) -> str:
        leader = self.pods.get(0) or next(iter(self.pods.values()))
        return leader.track


@dataclass(frozen=True)
class Observed:
    pods: tuple[ObservedPod, ...] = ()
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    pods_per_replica: int = 1

    @cached_property
    def groups(self) -> dict[tuple[str, int], Group]:
        by_key: dict[tuple[str, int], dict[int, ObservedPod]] = {}
        for pod in self.pods:
            if pod.live and pod.rank < self.pods_per_replica:
                by_key.setdefault((pod.revision, pod.replica), {})[pod.rank] = pod
        return {key: Group(key[0], key[1], self.pods_per_replica, ranks) for key, ranks in sorted(by_key.items())}

    def groups_of(self, revision: str) -> list[Group]:
        return [g for g in self.groups.values() if g.revision == revision]


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
        body=body,
    )


def observed_from(pods: Iterable[Mapping[str, Any]], services: Iterable[Mapping[str, Any]],
                  pods_per_replica: int) -> Observed:
    """Pure: the observation from pod and Service bodies (as the API returns them)."""
    return Observed(
        pods=tuple(sorted((observed_pod(p) for p in pods), key=lambda p: p.name)),
        services={s["metadata"]["name"]: s for s in services},
        pods_per_replica=pods_per_replica,
    )


class Reader:
    """The one reader: lists a ModelDeployment's pods and Services by label."""

    def __init__(self, dynamic_client):
        self.dyn = dynamic_client
        self._pods = dynamic_client.resources.get(api_version="v1", kind="Pod")
        self._services = dynamic_client.resources.get(api_version="v1", kind="Service")

    def observe(self, namespace: str, name: str, pods_per_replica: int) -> Observed:
        selector = names.selector_string(names.owned_selector(name))
        pods = self.dyn.get(self._pods, namespace=namespace, label_selector=selector).to_dict()
        services = self.dyn.get(self._services, namespace=namespace, label_selector=selector).to_dict()
        return observed_from(pods.get("items") or [], services.get("items") or [], pods_per_replica)
