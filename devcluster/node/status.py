"""What the node reports: each pod's status (phase, conditions, container statuses, as the kubelet
builds them), pod events, the Node's status and its Lease."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import aiohttp

from devcluster.kubeapi import ApiClient, ApiError, micro_time, rfc3339

log = logging.getLogger("devcluster.node")

LOCAL_NODE_LABEL = "devcluster.serving.moe.dev/local"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40
MAX_PODS = 110


# --- pods -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ContainerRecord:
    """What the agent knows about one container, in the shape of a v1 ContainerStatus."""

    name: str
    image: str = ""
    state: dict = dataclasses.field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = dataclasses.field(default_factory=dict)
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    container_id: str | None = None

    def as_status(self) -> dict:
        status = {"name": self.name, "image": self.image or "devcluster/none", "imageID": "",
                  "ready": self.ready, "started": self.started, "restartCount": self.restart_count,
                  "state": self.state, "lastState": self.last_state}
        if self.container_id:
            status["containerID"] = self.container_id
        return status

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> dict | None:
        return self.state.get("terminated")


def pod_phase(restart_policy: str, init_done: bool, init_failed: bool,
              containers: list[ContainerRecord]) -> str:
    """The kubelet's getPhase, for containers that are not unknown."""
    if init_failed:
        return "Failed"
    if not init_done:
        return "Pending"
    running = waiting = stopped = succeeded = failed = 0
    for c in containers:
        if c.running:
            running += 1
        elif c.terminated is not None:
            stopped += 1
            if c.terminated.get("exitCode") == 0:
                succeeded += 1
            else:
                failed += 1
        elif c.last_state.get("terminated") is not None:
            stopped += 1
            if c.last_state["terminated"].get("exitCode") == 0:
                succeeded += 1
            else:
                failed += 1
        else:
            waiting += 1
    if waiting > 0:
        return "Pending"
    if running > 0:
        return "Running"
    if stopped > 0:
        if restart_policy == "Always":
            return "Running"
        if restart_policy == "OnFailure":
            return "Succeeded" if stopped == succeeded else "Running"
        return "Failed" if failed > 0 else "Succeeded"
    return "Pending"


def _condition(ctype: str, ok: bool, previous: dict[str, dict], now: str, reason: str = "",
               message: str = "") -> dict:
    status = "True" if ok else "False"
    prev = previous.get(ctype) or {}
    condition = {"type": ctype, "status": status, "lastProbeTime": None,
                 "lastTransitionTime": prev.get("lastTransitionTime") if prev.get("status") == status
                 else now}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def pod_status(pod: dict, *, init: list[ContainerRecord], main: list[ContainerRecord],
               init_done: bool, init_failed: bool, pod_ip: str | None, host_ip: str,
               start_time: str, now: str, message: str = "", reason: str = "") -> dict:
    """The pod's status as this node reports it (phase, conditions, IPs, container statuses).
    Conditions keep their lastTransitionTime while their status does not change."""
    spec = pod.get("spec") or {}
    previous = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    phase = pod_phase(spec.get("restartPolicy", "Always"), init_done, init_failed, main)
    containers_ready = init_done and bool(main) and all(c.ready for c in main)
    gates_ok = all((previous.get(g["conditionType"]) or {}).get("status") == "True"
                   for g in spec.get("readinessGates") or [])
    terminal = phase in ("Succeeded", "Failed")
    not_ready = [c.name for c in main if not c.ready]
    unready_reason = "PodCompleted" if terminal else "ContainersNotReady"
    unready_message = "" if terminal else f"containers with unready status: [{' '.join(not_ready)}]"
    unready_init = [c.name for c in init if c.terminated is None or c.terminated.get("exitCode") != 0]
    conditions = [
        _condition("PodReadyToStartContainers", pod_ip is not None and not terminal, previous, now),
        _condition("Initialized", init_done, previous, now,
                   *(("PodCompleted", "") if terminal and init_done else ("", "") if init_done else
                     ("ContainersNotInitialized",
                      f"containers with incomplete status: [{' '.join(unready_init)}]"))),
        _condition("ContainersReady", containers_ready, previous, now,
                   *(("", "") if containers_ready else (unready_reason, unready_message))),
        _condition("Ready", containers_ready and gates_ok, previous, now,
                   *(("", "") if containers_ready and gates_ok else
                     (unready_reason if not containers_ready else "ReadinessGatesNotReady",
                      unready_message if not containers_ready else "readiness gates not satisfied"))),
    ]
    if "PodScheduled" in previous:
        conditions.insert(0, previous["PodScheduled"])
    status = {"phase": phase, "conditions": conditions, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
              "startTime": start_time,
              "containerStatuses": [c.as_status() for c in main]}
    if init:
        status["initContainerStatuses"] = [c.as_status() for c in init]
    if pod_ip:
        status["podIP"], status["podIPs"] = pod_ip, [{"ip": pod_ip}]
    if message:
        status["message"] = message
    if reason:
        status["reason"] = reason
    return status


def terminated_state(returncode: int, started_at: str, finished_at: str, container_id: str | None,
                     message: str = "") -> dict:
    """A v1 ContainerStateTerminated from a process return code (negative: killed by a signal)."""
    state = {"exitCode": returncode if returncode >= 0 else 128 - returncode,
             "reason": "Completed" if returncode == 0 else "Error",
             "startedAt": started_at, "finishedAt": finished_at}
    if returncode < 0:
        state["signal"] = -returncode
    if container_id:
        state["containerID"] = container_id
    if message:
        state["message"] = message
    return state


class EventRecorder:
    """Pod events as the kubelet reports them (`kubectl describe pod`), best effort: a bounded
    queue, and the same event of one container at most once a minute."""

    REPEAT_SECONDS = 60.0

    def __init__(self, node_name: str):
        self.node_name = node_name
        self.queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=500)
        self._recent: dict[tuple, float] = {}

    def record(self, pod: dict, container: str, init: bool, kind: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        key = (meta["uid"], container, reason, message)
        now = time.monotonic()
        if now - self._recent.get(key, -self.REPEAT_SECONDS) < self.REPEAT_SECONDS:
            return
        if len(self._recent) > 5000:
            self._recent = {k: t for k, t in self._recent.items() if now - t < self.REPEAT_SECONDS}
        self._recent[key] = now
        stamp = rfc3339()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace", "default")},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "namespace": meta.get("namespace", "default"), "uid": meta["uid"],
                               "fieldPath": f"spec.{'initContainers' if init else 'containers'}{{{container}}}"},
            "reason": reason, "message": message[:1024], "type": kind, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet", "reportingInstance": self.node_name,
        }
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(event)

    async def run(self, client: ApiClient) -> None:
        while True:
            event = await self.queue.get()
            try:
                await client.post(f"/api/v1/namespaces/{event['metadata']['namespace']}/events", event)
            except (ApiError, aiohttp.ClientError, TimeoutError) as e:
                log.debug("event not recorded: %s", e)


# --- the node -------------------------------------------------------------------------------------


def machine_memory_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def node_capacity(gpus: int, state_dir: Path) -> dict[str, str]:
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{machine_memory_kib()}Ki",
            "ephemeral-storage": f"{shutil.disk_usage(state_dir).total // 1024}Ki",
            "pods": str(MAX_PODS), "nvidia.com/gpu": str(gpus)}


def node_labels(node_name: str) -> dict[str, str]:
    return {LOCAL_NODE_LABEL: "true", "kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                                             platform.machine()),
            "beta.kubernetes.io/os": "linux"}


def node_status(node_name: str, host_ip: str, capacity: dict[str, str], kubelet_version: str, now: str,
                ready_since: str, kubelet_port: int = 0) -> dict:
    def condition(ctype: str, status: str, reason: str, message: str) -> dict:
        return {"type": ctype, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": ready_since}

    def read(path: str) -> str:
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip()
        return ""

    uname = platform.uname()
    return {
        "capacity": capacity, "allocatable": capacity,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "devcluster local node is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": host_ip},
                      {"type": "Hostname", "address": node_name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": read("/etc/machine-id"), "systemUUID": read("/etc/machine-id"),
            "bootID": read("/proc/sys/kernel/random/boot_id"), "kernelVersion": uname.release,
            "osImage": read("/etc/debian_version") and f"Debian {read('/etc/debian_version')}" or uname.system,
            "containerRuntimeVersion": "devcluster://local-processes", "kubeletVersion": kubelet_version,
            "kubeProxyVersion": "", "operatingSystem": "linux",
            "architecture": node_labels(node_name)["kubernetes.io/arch"],
        },
    }


async def renew_lease(client: ApiClient, node_name: str, node_uid: str) -> None:
    """The node's heartbeat: its Lease in kube-node-lease, created (owned by the Node) if missing."""
    path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
    spec = {"holderIdentity": node_name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": micro_time()}
    try:
        await client.patch(f"{path}/{node_name}", {"spec": spec}, kind="merge-patch")
    except ApiError as e:
        if e.status != 404:
            raise
        await client.post(path, {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node_name, "namespace": LEASE_NAMESPACE, "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid}]},
            "spec": spec})
