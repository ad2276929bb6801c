"""The devcluster's local node: an agent that runs the pods bound to one Node as local processes.

    python -m devcluster.node --kubeconfig K --node-name devcluster-local --state-dir D --gpus 4 \
        --pod-cidr 127.100.0.0/16 --api-host 127.0.0.1 --api-port P --ca-file CA

What a pod sees, compared with a real kubelet (docs/devcluster-node.md has the user's view):

- Network: every pod gets its own loopback address from ``--pod-cidr`` as ``status.podIP`` (Linux
  routes all of 127.0.0.0/8 to ``lo``), but pods share the machine's network stack: a process must
  bind to its pod IP (downward API ``status.podIP``), not 0.0.0.0, for two pods to use one port.
  ``hostNetwork`` pods get 127.0.0.1.
- Image: ignored. ``command`` + ``args`` run as a local process (``command`` is required; the first
  word is looked up in the container's ``PATH``, whose first entry is the directory of the Python
  running this agent, so the project's ``.venv`` console scripts resolve). The process starts in
  its own session/process group with a minimal environment (PATH, HOME, LANG and a few caches; never
  this agent's KUBECONFIG), plus env/envFrom as in Kubernetes (downward API fieldRef and
  resourceFieldRef, configMapKeyRef/secretKeyRef read from the API, ``$(VAR)`` expansion).
  ``KUBERNETES_SERVICE_HOST=127.0.0.1`` and ``KUBERNETES_SERVICE_PORT=<api port>`` are injected.
- Volumes: no mount namespaces (no root tricks), so a container's volumeMounts become environment
  variables ``DEVCLUSTER_MOUNT_<PATH>=<host dir>`` where ``<PATH>`` is the mount path upper-cased with
  every run of other characters replaced by ``_`` (``/models`` -> ``DEVCLUSTER_MOUNT_MODELS``). emptyDir
  is a per-pod directory; hostPath is the host path itself; configMap, secret, downwardAPI and
  projected volumes are files written into a per-pod directory; a PVC bound to a hostPath/local PV
  maps to that path.
- Service account: the process cannot see ``/var/run/secrets/kubernetes.io/serviceaccount``. Unless
  ``automountServiceAccountToken`` is false (pod, else service account), the agent requests a bound
  token with the TokenRequest API and writes ``token``, ``ca.crt``, ``namespace`` and a ``kubeconfig``
  into ``<state-dir>/pods/<ns>_<name>/serviceaccount/``; ``KUBECONFIG`` points at that kubeconfig
  (also ``DEVCLUSTER_SERVICEACCOUNT_DIR``), and the token is refreshed before it expires. The
  projected ``kube-api-access-*`` volume the API server adds is written too (and exported as
  ``DEVCLUSTER_MOUNT_VAR_RUN_SECRETS_KUBERNETES_IO_SERVICEACCOUNT``). RBAC therefore applies.
- Logs: ``<state-dir>/pods/<ns>_<name>/<container>.log`` (stdout and stderr, appended across
  restarts). The node serves the kubelet API's ``/containerLogs`` (HTTPS, clients need a cluster-CA
  certificate), so ``kubectl logs [-f] [--previous]`` works; ``exec`` and ``port-forward`` do not.
- Probes (startup, liveness, readiness; httpGet to the pod IP, tcpSocket, exec, grpc), restart
  policies with the kubelet's back-off (10 s doubling to 300 s, ``CrashLoopBackOff``), container
  statuses and pod phase/conditions, and graceful deletion (SIGTERM to the process group, the grace
  period, SIGKILL, then the pod object is deleted with grace 0) follow the kubelet.
- The agent keeps the Node's status and its Lease in ``kube-node-lease`` fresh. On SIGTERM it stops
  every pod process (SIGTERM, a bounded grace, SIGKILL) and exits without touching pod objects. On
  start it kills the processes a previous run recorded in ``<state-dir>/processes.json`` (checked
  against their start time) and restarts the pods it still owns with the pod IPs they had.
  ``--cleanup`` only does that kill and exits (for ``devcluster down``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import yaml

from devcluster import processes
from devcluster.files import write_atomic
from devcluster.kubeapi import (
    ApiClient,
    ApiError,
    ClusterAccess,
    Informer,
    kubeconfig,
    micro_time,
    parse_time,
    rfc3339,
)
from devcluster.loopback import is_loopback

log = logging.getLogger("devcluster.node")

LOCAL_NODE_LABEL = "devcluster.serving.moe.dev/local"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40
LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 30
MAX_PODS = 110
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 300.0
# The kubelet forgets a container's back-off once it ran this long without crashing.
BACKOFF_RESET_SECONDS = 600.0
TOKEN_EXPIRATION_SECONDS = 3607  # what the kubelet asks for
DEFAULT_GRACE_SECONDS = 30
LOG_ROTATE_BYTES = 64 * 1024 * 1024
# Environment of this agent that pod processes inherit (names, or prefixes ending in "*").
PASS_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR", "XDG_CACHE_HOME",
            "HF_*", "HUGGINGFACE_*", "TRANSFORMERS_*", "TORCH_*", "OMP_NUM_THREADS")
SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


class IpAllocator:
    """Hands out pod IPs from a CIDR round-robin, so a freed address is not reused soon, and never
    an address that is still held."""

    def __init__(self, cidr: str):
        self.network = ipaddress.ip_network(cidr)
        self.size = self.network.num_addresses
        self.held: dict[str, str] = {}  # ip -> owner (pod uid)
        self._next = 2  # skip .0 (network) and .1

    def hold(self, ip: str, owner: str) -> bool:
        """Records an address a pod already has; False if it is outside the CIDR or taken."""
        if ip in self.held and self.held[ip] != owner:
            return False
        if ipaddress.ip_address(ip) not in self.network:
            return False
        self.held[ip] = owner
        return True

    def allocate(self, owner: str) -> str:
        for ip, held_by in self.held.items():
            if held_by == owner:
                return ip
        for _ in range(self.size):
            offset, self._next = self._next, self._next + 1
            if self._next >= self.size - 1:
                self._next = 1
            ip = str(self.network.network_address + offset)
            if offset in (0, self.size - 1) or ip in self.held:
                continue
            self.held[ip] = owner
            return ip
        raise RuntimeError(f"pod CIDR {self.network} is exhausted")

    def release(self, owner: str) -> None:
        for ip in [ip for ip, held_by in self.held.items() if held_by == owner]:
            del self.held[ip]


_VAR_REF = re.compile(r"\$\$|\$\(([^)]*)\)")


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` escapes a `$`, anything else
    stays as written."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(replace, text)


class ConfigError(Exception):
    """A container cannot be configured yet (a missing ConfigMap key, say): waiting reason
    CreateContainerConfigError, retried."""


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.*)'\]$")


def field_ref_value(pod: dict, field_path: str, pod_ip: str, host_ip: str) -> str:
    """The downward API's fieldRef values."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if field_path in simple:
        return simple[field_path]
    match = _SUBSCRIPT.match(field_path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    if field_path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(field_path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError(f"unsupported fieldRef fieldPath {field_path!r}")


def resource_field_value(container: dict, ref: dict, node_allocatable: dict[str, str]) -> str:
    """The downward API's resourceFieldRef: ceil(quantity / divisor); a missing limit reads as the
    node's allocatable, as in the kubelet."""
    from kubernetes.utils import parse_quantity

    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    quantity = (resources.get(kind) or {}).get(name)
    if quantity is None:
        if kind == "requests":
            quantity = (resources.get("limits") or {}).get(name)
        quantity = quantity if quantity is not None else node_allocatable.get(name)
    if quantity is None:
        quantity = "0"
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    if divisor == 0:
        raise ConfigError(f"resourceFieldRef {resource}: divisor is zero")
    return str(math.ceil(parse_quantity(str(quantity)) / divisor))


def env_sources(container: dict) -> set[tuple[str, str]]:
    """The ConfigMaps and Secrets a container's env and envFrom read, as ("configmap"|"secret", name)."""
    needed = set()
    for source in container.get("envFrom") or []:
        if source.get("configMapRef"):
            needed.add(("configmap", source["configMapRef"]["name"]))
        if source.get("secretRef"):
            needed.add(("secret", source["secretRef"]["name"]))
    for var in container.get("env") or []:
        value_from = var.get("valueFrom") or {}
        if value_from.get("configMapKeyRef"):
            needed.add(("configmap", value_from["configMapKeyRef"]["name"]))
        if value_from.get("secretKeyRef"):
            needed.add(("secret", value_from["secretKeyRef"]["name"]))
    return needed


def object_data(obj: dict | None) -> dict[str, str] | None:
    """The string data of a ConfigMap or Secret (secrets decoded), None for a missing object."""
    if obj is None:
        return None
    data = dict(obj.get("data") or {})
    if obj.get("kind") == "Secret":
        data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}
        data.update(obj.get("stringData") or {})
    else:
        data.update({k: base64.b64decode(v).decode("utf-8", "replace")
                     for k, v in (obj.get("binaryData") or {}).items()})
    return data


def container_env(pod: dict, container: dict, *, pod_ip: str, host_ip: str, base: dict[str, str],
                  sources: dict[tuple[str, str], dict[str, str] | None],
                  node_allocatable: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: `base` (what the node injects), then
    envFrom, then env in order, each value `$(VAR)`-expanded against what is defined so far.
    `sources` maps ("configmap"|"secret", name) to that object's data (None: not found)."""
    env = dict(base)
    for source in container.get("envFrom") or []:
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            ref = source.get(key)
            if not ref:
                continue
            data = sources.get((kind, ref["name"]))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"{kind} {ref['name']!r} not found")
            prefix = source.get("prefix", "")
            env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var or not var.get("valueFrom"):
            env[name] = expand_vars(str(var.get("value", "")), env)
            continue
        value_from = var["valueFrom"]
        if value_from.get("fieldRef"):
            env[name] = field_ref_value(pod, value_from["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif value_from.get("resourceFieldRef"):
            ref = value_from["resourceFieldRef"]
            target = container
            if ref.get("containerName"):
                all_containers = (pod["spec"].get("containers") or []) + (
                    pod["spec"].get("initContainers") or [])
                target = next((c for c in all_containers if c["name"] == ref["containerName"]), container)
            env[name] = resource_field_value(target, ref, node_allocatable)
        else:
            for kind, key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
                ref = value_from.get(key)
                if not ref:
                    continue
                data = sources.get((kind, ref["name"]))
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        break
                    what = f"{kind} {ref['name']!r}" if data is None else (
                        f"key {ref['key']!r} in {kind} {ref['name']!r}")
                    raise ConfigError(f"{what} not found (env {name})")
                env[name] = data[ref["key"]]
                break
    return env


def mount_env_name(mount_path: str) -> str:
    """`/var/run/secrets/x.io` -> `DEVCLUSTER_MOUNT_VAR_RUN_SECRETS_X_IO`."""
    return "DEVCLUSTER_MOUNT_" + (re.sub(r"[^A-Za-z0-9]+", "_", mount_path).strip("_").upper() or "ROOT")


def mount_env(container: dict, volume_dirs: dict[str, str]) -> dict[str, str]:
    """The env variables that stand in for a container's volumeMounts (see the module docstring)."""
    env = {}
    for mount in container.get("volumeMounts") or []:
        host_dir = volume_dirs.get(mount["name"])
        if host_dir is None:
            continue
        if mount.get("subPath"):
            host_dir = os.path.join(host_dir, mount["subPath"])
        env[mount_env_name(mount["mountPath"])] = host_dir
    return env


def crash_backoff(crashes: int, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_MAX_SECONDS) -> float:
    """Delay before the next restart after `crashes` consecutive failed runs: the first restart is
    immediate, then base, 2*base, ... up to cap (the kubelet's schedule)."""
    if crashes <= 1:
        return 0.0
    return min(cap, base * 2 ** (crashes - 2))


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


@dataclasses.dataclass
class ProbeTracker:
    """Consecutive-result bookkeeping of one probe: `result` flips to success after
    successThreshold successes and to failure after failureThreshold failures."""

    success_threshold: int = 1
    failure_threshold: int = 3
    result: bool = False
    successes: int = 0
    failures: int = 0

    @classmethod
    def for_probe(cls, probe: dict, initial: bool) -> ProbeTracker:
        return cls(success_threshold=max(1, int(probe.get("successThreshold") or 1)),
                   failure_threshold=max(1, int(probe.get("failureThreshold") or 3)), result=initial)

    def observe(self, ok: bool) -> bool:
        """Records one probe outcome; True when `result` changed."""
        before = self.result
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.success_threshold:
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.failure_threshold:
                self.result = False
        return self.result != before


def probe_port(port: int | str | None, container: dict) -> int:
    """A probe's port: a number, or a name looked up in the container's ports."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"port {port!r} is not a number and no container port has that name")


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


def log_tail(path: Path, max_bytes: int = 2048, max_lines: int = 80) -> str:
    """The end of a container's log since its last start (terminationMessagePolicy
    FallbackToLogsOnError: at most 2 KiB or 80 lines, as the kubelet takes)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    text = text.rsplit("--- devcluster: ", 1)[-1].split("\n", 1)[-1] if "--- devcluster: " in text else text
    return "\n".join(text.splitlines()[-max_lines:])


def rotate_log(path: Path) -> None:
    """copytruncate: the running process keeps its (O_APPEND) descriptor and writes on from 0."""
    shutil.copyfile(path, path.with_suffix(".log.1"))
    os.truncate(path, 0)


def find_executable(command: str, path_env: str, working_dir: str | None) -> str | None:
    """The file `command` names, as execvp would find it (relative paths from the working dir)."""
    if "/" in command:
        candidate = command if os.path.isabs(command) else os.path.normpath(
            os.path.join(working_dir or os.getcwd(), command))
        return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None
    for directory in path_env.split(os.pathsep):
        candidate = os.path.join(directory or ".", command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def base_environment(parent_env: dict[str, str], python_bin_dir: str,
                     pass_env: Iterable[str] = PASS_ENV) -> dict[str, str]:
    """What every pod process inherits from the node: PATH (the agent's Python's bin dir first) and
    the allowed variables of `pass_env`; nothing else (in particular not KUBECONFIG)."""
    env = {}
    for name, value in parent_env.items():
        for allowed in pass_env:
            if name == allowed or (allowed.endswith("*") and name.startswith(allowed[:-1])):
                env[name] = value
    path = parent_env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PATH"] = python_bin_dir + os.pathsep + path if python_bin_dir not in path.split(os.pathsep) else path
    return env


def object_bytes(obj: dict) -> dict[str, bytes]:
    """A ConfigMap's or Secret's data as the bytes its volume files hold."""
    if obj.get("kind") == "Secret":
        files = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        files.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        return files
    files = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    files.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return files


def volume_files(files: dict[str, bytes], items: list[dict] | None, name: str,
                 optional: bool) -> dict[str, bytes]:
    """The files of a configMap/secret volume (or projected source): every key, or `items` mapped
    to their paths; a missing key fails unless the source is optional."""
    if not items:
        return dict(files)
    chosen = {}
    for item in items:
        if item["key"] not in files:
            if optional:
                continue
            raise ConfigError(f"key {item['key']!r} not found in {name!r}")
        chosen[item["path"]] = files[item["key"]]
    return chosen


def safe_join(root: Path, relative: str) -> Path:
    """`root/relative`, refusing paths that climb out of root."""
    target = (root / relative).resolve()
    if root.resolve() not in target.parents and target != root.resolve():
        raise ConfigError(f"path {relative!r} escapes its volume")
    return target


class ProcessTable:
    """The pids this agent started, kept in a file so a later run (or --cleanup) can kill the ones a
    crashed agent left behind."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}

    def add(self, pid: int, pod: str, container: str) -> None:
        self.entries[str(pid)] = {"start": processes.proc_start_time(pid), "pod": pod, "container": container}
        self._save()

    def remove(self, pid: int) -> None:
        if self.entries.pop(str(pid), None) is not None:
            self._save()

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.entries))

    def kill_leftovers(self, grace: float = 3.0) -> int:
        """Kills the process groups recorded by an earlier run that are still alive; returns how many."""
        try:
            recorded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            recorded = {}
        leftovers = [processes.ProcessRecord(entry.get("pod", ""), int(pid), entry["start"], [], "")
                     for pid, entry in recorded.items() if entry.get("start") is not None]
        for record in filter(processes.is_alive, leftovers):
            log.info("killing leftover process group %s (%s)", record.pid, record.name)
        processes.stop(leftovers, timeout=grace, group=True)
        self.entries = {}
        self._save()
        return len(recorded)


# ---------------------------------------------------------------------------------------------------
# Probes and lifecycle handlers.
# ---------------------------------------------------------------------------------------------------


class StartFailure(Exception):
    """A container process could not be started: waiting `reason` with `message`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _probe_host(handler: dict, pod_ip: str) -> str:
    host = handler.get("host") or pod_ip
    if host == "localhost":
        host = "127.0.0.1"
    if not is_loopback(host):
        raise ValueError(f"host {host!r} is not a loopback address (the devcluster stays on 127.0.0.0/8)")
    return host


async def _exec_handler(command: list[str], env: dict[str, str], cwd: str, timeout: float) -> tuple[bool, str]:
    if not command:
        return False, "exec: empty command"
    exe = find_executable(command[0], env.get("PATH", ""), cwd)
    if exe is None:
        return False, f'exec: "{command[0]}": executable file not found in $PATH'
    proc = await asyncio.create_subprocess_exec(
        exe, *command[1:], stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = output.decode("utf-8", "replace")[-500:].strip()
    return proc.returncode == 0, text or f"exit code {proc.returncode}"


async def _grpc_health(host: str, port: int, service: str, timeout: float) -> tuple[bool, str]:
    import grpc  # only for grpc probes

    # grpc.health.v1.HealthCheckRequest{service} / HealthCheckResponse{status}: two tiny protobufs.
    encoded = service.encode()
    request = (b"\n" + bytes([len(encoded)]) + encoded) if encoded else b""
    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        response = await check(request, timeout=timeout)
    serving = response == b"\x08\x01"
    return serving, "SERVING" if serving else f"not serving ({response!r})"


async def run_handler(handler: dict, *, pod_ip: str, container: dict, env: dict[str, str], cwd: str,
                      timeout: float, http: aiohttp.ClientSession) -> tuple[bool, str]:
    """Runs one probe or lifecycle handler (exec, httpGet, tcpSocket, grpc, sleep); (ok, message)."""
    try:
        if "exec" in handler:
            return await _exec_handler(handler["exec"].get("command") or [], env, cwd, timeout)
        if "httpGet" in handler:
            get = handler["httpGet"]
            host = _probe_host(get, pod_ip)
            port = probe_port(get.get("port"), container)
            scheme = (get.get("scheme") or "HTTP").lower()
            path = get.get("path") or "/"
            if not path.startswith("/"):
                path = "/" + path
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            headers.setdefault("User-Agent", "kube-probe/devcluster")
            async with http.get(f"{scheme}://{host}:{port}{path}", headers=headers, ssl=False,
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                ok = 200 <= resp.status < 400
                return ok, f"HTTP probe returned {resp.status}"
        if "tcpSocket" in handler:
            sock = handler["tcpSocket"]
            host, port = _probe_host(sock, pod_ip), probe_port(sock.get("port"), container)
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True, "connected"
        if "grpc" in handler:
            rpc = handler["grpc"]
            return await _grpc_health(_probe_host({}, pod_ip), int(rpc["port"]), rpc.get("service") or "",
                                      timeout)
        if "sleep" in handler:
            await asyncio.sleep(min(float(handler["sleep"].get("seconds") or 0), timeout))
            return True, "slept"
        return False, "unsupported handler (want exec, httpGet, tcpSocket, grpc or sleep)"
    except TimeoutError:
        return False, f"timed out after {timeout:g}s"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # connection refused, bad port name, grpc errors: all mean "failed"
        return False, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------
# Containers and pods.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NodeConfig:
    node_name: str
    state_dir: Path
    gpus: int
    pod_cidr: str
    api_host: str
    api_port: int
    ca_file: str
    host_ip: str = "127.0.0.1"
    backoff_base: float = BACKOFF_BASE_SECONDS
    shutdown_grace: float = 10.0


class ContainerRunner:
    """Runs one container of a pod: start, probes, exit, restart with back-off, until the pod stops
    or the restart policy says it is finished. `record` is its status."""

    def __init__(self, worker: PodWorker, container: dict, *, restart_policy: str, init: bool):
        self.worker, self.container = worker, container
        self.name = container["name"]
        self.restart_policy = restart_policy
        self.init = init
        self.record = ContainerRecord(name=self.name, image=container.get("image", ""),
                                      state={"waiting": {"reason": "PodInitializing" if init is False and
                                                         worker.has_init else "ContainerCreating"}})
        self.process: asyncio.subprocess.Process | None = None
        self.env: dict[str, str] = {}
        self.cwd = str(worker.dir)
        self.exit_code: int | None = None  # set once the container is finished for good
        self._kill_message = ""
        self.halted = False  # no more restarts (a sidecar whose pod's main containers are done)

    @property
    def sidecar(self) -> bool:
        return self.init and self.container.get("restartPolicy") == "Always"

    def _set(self, **changes) -> None:
        for key, value in changes.items():
            setattr(self.record, key, value)
        self.worker.changed()

    async def run(self) -> int | None:
        """Returns the final exit code, or None when the pod stopped first."""
        worker = self.worker
        crashes = 0  # consecutive failed runs: the back-off grows with them
        config_retries = 0
        while not worker.stopping and not self.halted:
            delay = crash_backoff(crashes, worker.agent.config.backoff_base)
            if delay:
                self._show_backoff(delay)
                if await worker.wait_stopping(delay):
                    break
            try:
                argv, self.env, self.cwd = await worker.container_command(self.container)
                config_retries = 0
                started_at = time.time()
                self.process = await worker.spawn(self.name, argv, self.env, self.cwd)
            except ConfigError as e:
                # The kubelet retries these on every sync; the pod stays Pending meanwhile.
                self._set(state={"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}})
                config_retries += 1
                await worker.wait_stopping(min(2.0 ** config_retries, 10.0))
                continue
            except StartFailure as e:
                crashes += 1
                if e.reason == "CreateContainerError":  # never created: no restart is counted
                    self._set(state={"waiting": {"reason": e.reason, "message": e.message}})
                    continue
                now = rfc3339()
                failed = {"exitCode": 128, "reason": "StartError", "message": e.message,
                          "startedAt": now, "finishedAt": now}
                self._event("Warning", "Failed", f"Error: {e.message}")
                if not should_restart(self._effective_policy(), 128):
                    self._set(state={"terminated": failed})
                    self.exit_code = 128
                    return 128
                self._set(state={"waiting": {"reason": e.reason, "message": e.message}},
                          last_state={"terminated": failed}, restart_count=self.record.restart_count + 1)
                continue
            if worker.stopping:  # the pod began stopping while this process started
                await self.terminate(0)
            container_id = f"devcluster://{self.process.pid}"
            self._kill_message = ""
            self._event("Normal", "Started", f"Started container {self.name}")
            self._set(state={"running": {"startedAt": rfc3339(started_at)}}, container_id=container_id,
                      started=False, ready=False)
            probes = asyncio.create_task(self._probe(self.process))
            returncode = await self.process.wait()
            probes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probes
            worker.reap(self.process)
            self.process = None
            message = self._kill_message
            if (not message and returncode != 0
                    and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError"):
                message = log_tail(worker.dir / f"{self.name}.log")
            finished = terminated_state(returncode, rfc3339(started_at), rfc3339(), container_id, message)
            if time.time() - started_at > BACKOFF_RESET_SECONDS:
                crashes = 0
            crashes += 1
            if worker.stopping or self.halted:
                self._set(state={"terminated": finished}, ready=False, started=False)
                return None
            if not should_restart(self._effective_policy(), finished["exitCode"]):
                # A completed init container counts as ready, as the kubelet reports it.
                self._set(state={"terminated": finished}, started=False,
                          ready=self.init and finished["exitCode"] == 0)
                self.exit_code = finished["exitCode"]
                return self.exit_code
            self._set(state={"waiting": {"reason": "ContainerCreating"}}, last_state={"terminated": finished},
                      ready=False, started=False, restart_count=self.record.restart_count + 1)
        return None

    def _effective_policy(self) -> str:
        # Init containers run to completion: a failed one is retried unless the pod says Never.
        if self.init and not self.sidecar:
            return "Never" if self.restart_policy == "Never" else "OnFailure"
        return self.restart_policy

    def _event(self, kind: str, reason: str, message: str) -> None:
        self.worker.agent.events.record(self.worker.pod, self.name, self.init, kind, reason, message)

    def _show_backoff(self, delay: float) -> None:
        """The waiting state during a back-off: CrashLoopBackOff, or the start error that caused it."""
        self._event("Warning", "BackOff", f"Back-off restarting failed container {self.name} in pod "
                                          f"{self.worker.name}_{self.worker.namespace}({self.worker.uid})")
        waiting = self.record.state.get("waiting") or {}
        backoff = (f"back-off {delay:g}s restarting failed container={self.name} "
                   f"pod={self.worker.name}_{self.worker.namespace}({self.worker.uid})")
        if waiting.get("reason") in ("RunContainerError", "CreateContainerError"):
            message = waiting.get("message", "").split("; back-off ")[0]
            self._set(state={"waiting": {"reason": waiting["reason"], "message": f"{message}; {backoff}"}})
        else:
            self._set(state={"waiting": {"reason": "CrashLoopBackOff", "message": backoff}},
                      ready=False, started=False)

    async def _probe(self, process: asyncio.subprocess.Process) -> None:
        """Startup probe first; then readiness and liveness side by side (the kubelet's order)."""
        startup = self.container.get("startupProbe")
        if startup:
            if not await self._probe_loop("startup", startup, process):
                return
        self._set(started=True)
        loops = []
        readiness = self.container.get("readinessProbe")
        if readiness:
            loops.append(self._probe_loop("readiness", readiness, process))
        else:
            self._set(ready=True)
        liveness = self.container.get("livenessProbe")
        if liveness:
            loops.append(self._probe_loop("liveness", liveness, process))
        if loops:
            await asyncio.gather(*loops)

    async def _probe_loop(self, kind: str, probe: dict, process: asyncio.subprocess.Process) -> bool:
        """Probes until a startup probe succeeds (True) or a startup/liveness probe fails (the process
        is killed; False). Readiness probes run until the process ends."""
        tracker = ProbeTracker.for_probe(probe, initial=(kind == "liveness"))
        period = max(1.0, float(probe.get("periodSeconds") or 10))
        timeout = max(1.0, float(probe.get("timeoutSeconds") or 1))
        await asyncio.sleep(float(probe.get("initialDelaySeconds") or 0))
        while process.returncode is None:
            ok, message = await run_handler(probe, pod_ip=self.worker.pod_ip or "", container=self.container,
                                            env=self.env, cwd=self.cwd, timeout=timeout,
                                            http=self.worker.agent.http)
            changed = tracker.observe(ok)
            if not ok:
                log.debug("%s/%s: %s probe failed: %s", self.worker.key, self.name, kind, message)
                self._event("Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {message}")
            if kind == "readiness" and changed:
                self._set(ready=tracker.result)
            elif kind == "startup" and tracker.result:
                return True
            elif not tracker.result and kind in ("startup", "liveness") and tracker.failures >= tracker.failure_threshold:
                log.info("%s/%s: %s probe failed %d times (%s); restarting", self.worker.key, self.name,
                         kind, tracker.failures, message)
                self._kill_message = f"{kind.capitalize()} probe failed: {message}"
                grace = probe.get("terminationGracePeriodSeconds")
                await self.terminate(self.worker.grace_seconds() if grace is None else float(grace))
                return False
            await asyncio.sleep(period)
        return False

    async def terminate(self, grace: float) -> None:
        """SIGTERM to the process group, then SIGKILL once `grace` seconds have passed."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), max(0.0, grace))
        except TimeoutError:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


class PodWorker:
    """Everything the node does for one pod, from its IP to the deletion of its object."""

    def __init__(self, agent: NodeAgent, pod: dict):
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.uid, self.name = meta["uid"], meta["name"]
        self.namespace = meta.get("namespace", "default")
        self.key = f"{self.namespace}/{self.name}"
        self.dir = agent.config.state_dir / "pods" / f"{self.namespace}_{self.name}"
        spec = pod["spec"]
        self.has_init = bool(spec.get("initContainers"))
        policy = spec.get("restartPolicy", "Always")
        self.init_runners = [ContainerRunner(self, c, restart_policy=c.get("restartPolicy") or policy, init=True)
                             for c in spec.get("initContainers") or []]
        self.runners = [ContainerRunner(self, c, restart_policy=policy, init=False)
                        for c in spec.get("containers") or []]
        status = pod.get("status") or {}
        self._restore_restart_counts(status)
        self.pod_ip: str | None = None
        if spec.get("hostNetwork"):
            self.pod_ip = agent.config.host_ip
        elif status.get("podIP") and agent.ips.hold(status["podIP"], self.uid):
            self.pod_ip = status["podIP"]
        self.start_time = status.get("startTime") or rfc3339()
        self.init_done = not self.init_runners
        self.init_failed = False
        self.message = ""
        self.stopping = False
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._written: dict | None = None
        self._terminal_before = status.get("phase") in ("Succeeded", "Failed")
        self.sa_env: dict[str, str] = {}
        self.volume_dirs: dict[str, str] = {}
        self._tokens: list[tuple[str, int, list[Path]]] = []  # (audience, expirationSeconds, files)
        self._tasks: list[asyncio.Task] = []
        self._status_task: asyncio.Task | None = None
        self._stopped: asyncio.Future | None = None
        self._deleting = False

    def _restore_restart_counts(self, status: dict) -> None:
        previous = {s["name"]: s for s in (status.get("containerStatuses") or []) +
                    (status.get("initContainerStatuses") or [])}
        for runner in self.init_runners + self.runners:
            if runner.name in previous:
                runner.record.restart_count = int(previous[runner.name].get("restartCount") or 0)

    # -- state shared with the runners ---------------------------------------------------------

    def changed(self) -> None:
        self._dirty.set()

    async def wait_stopping(self, seconds: float) -> bool:
        """Waits up to `seconds`; True if the pod began stopping meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self.stopping

    def grace_seconds(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds")
        return float(DEFAULT_GRACE_SECONDS if grace is None else grace)

    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp") and self._stopped is None and not self._deleting:
            self._deleting = True
            self._tasks.append(asyncio.create_task(self.stop(self.grace_seconds(), delete_object=True),
                                                   name=f"stop {self.key}"))

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs the pod until it is finished; stopping is `stop()`'s job."""
        self._status_task = asyncio.create_task(self._status_loop())
        self._tasks.append(self._status_task)
        self.changed()
        if self.pod["metadata"].get("deletionTimestamp"):
            self.update(self.pod)
            return
        if self._terminal_before:
            return  # finished before this agent (re)started: nothing to run, status stays
        if not await self._setup():
            return
        for runner in self.init_runners:
            if runner.sidecar:
                self._tasks.append(asyncio.create_task(runner.run()))
                while not runner.record.started and not self.stopping:
                    await self.wait_stopping(0.2)  # a bounded poll: sidecars count once started
                continue
            code = await runner.run()
            if code is None:
                return
            if code != 0:
                self.init_failed = True
                self.changed()
                await self._stop_sidecars()
                return
        self.init_done = True
        for runner in self.runners:
            runner.record.state = {"waiting": {"reason": "ContainerCreating"}}
        self.changed()
        await asyncio.gather(*(runner.run() for runner in self.runners))
        if not self.stopping:
            await self._stop_sidecars()

    async def _stop_sidecars(self) -> None:
        for runner in self.init_runners:
            runner.halted = True
        await asyncio.gather(*(r.terminate(self.grace_seconds()) for r in self.init_runners if r.sidecar))

    async def _setup(self) -> bool:
        """Pod directory, IP, service-account token and volumes; retried while the API says no."""
        delay = 1.0
        while not self.stopping:
            try:
                self._prepare_dir()
                self._tokens = []
                if self.pod_ip is None:
                    self.pod_ip = self.agent.ips.allocate(self.uid)
                    self.changed()
                await self._service_account()
                await self._volumes()
                self.message = ""
                self.changed()
                if self._tokens:
                    self._tasks.append(asyncio.create_task(self._refresh_tokens()))
                return True
            except (TimeoutError, ConfigError, ApiError, aiohttp.ClientError, OSError) as e:
                log.info("%s: not ready to start containers: %s", self.key, e)
                for runner in self.init_runners + self.runners:
                    runner.record.state = {"waiting": {"reason": "ContainerCreating", "message": str(e)}}
                self.changed()
                await self.wait_stopping(delay)
                delay = min(delay * 2, 10)
        return False

    def _prepare_dir(self) -> None:
        marker = self.dir / ".uid"
        if self.dir.exists() and (not marker.exists() or marker.read_text() != self.uid):
            shutil.rmtree(self.dir, ignore_errors=True)  # an earlier pod of the same name
        self.dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(self.uid)

    async def _service_account(self) -> None:
        spec = self.pod["spec"]
        sa_name = spec.get("serviceAccountName") or "default"
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            try:
                sa = await self.agent.client.get(f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa_name}")
            except ApiError as e:
                if e.status != 404:
                    raise
                raise ConfigError(f"service account {sa_name!r} not found") from e
            automount = sa.get("automountServiceAccountToken")
        if automount is False:
            return
        sa_dir = self.dir / "serviceaccount"
        token_file = sa_dir / "token"
        self._tokens.append(("", TOKEN_EXPIRATION_SECONDS, [token_file]))
        await self._write_token("", TOKEN_EXPIRATION_SECONDS, [token_file])
        ca = Path(self.agent.config.ca_file).read_bytes()
        write_atomic(sa_dir / "ca.crt", ca)
        write_atomic(sa_dir / "namespace", self.namespace)
        server = f"https://{self.agent.config.api_host}:{self.agent.config.api_port}"
        config = kubeconfig(server, {"certificate-authority": str(sa_dir / "ca.crt")}, "serviceaccount",
                            {"tokenFile": str(token_file)}, namespace=self.namespace)
        write_atomic(sa_dir / "kubeconfig", yaml.safe_dump(config), 0o600)
        self.sa_env = {"KUBECONFIG": str(sa_dir / "kubeconfig"), "DEVCLUSTER_SERVICEACCOUNT_DIR": str(sa_dir)}

    async def _write_token(self, audience: str, expiration: int, files: list[Path]) -> float:
        """Requests a token bound to this pod; returns its lifetime in seconds."""
        sa_name = self.pod["spec"].get("serviceAccountName") or "default"
        answer = await self.agent.client.request_token(
            self.namespace, sa_name, expiration, audience=audience,
            bound_to={"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid})
        for path in files:
            write_atomic(path, answer["token"], 0o600)
        expires = parse_time(answer.get("expirationTimestamp"))
        return min(float(expiration), (expires - time.time()) if expires else float(expiration))

    async def _refresh_tokens(self) -> None:
        """Renews each token at 80% of its lifetime (as the kubelet does)."""
        while not self.stopping:
            lifetime = min(exp for _, exp, _ in self._tokens)
            if await self.wait_stopping(max(60.0, 0.8 * lifetime)):
                return
            for audience, expiration, files in self._tokens:
                try:
                    await self._write_token(audience, expiration, files)
                except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as e:
                    log.warning("%s: token refresh failed: %s", self.key, e)

    async def _source_files(self, kind: str, ref: dict) -> dict[str, bytes] | None:
        name = ref.get("name") or ref.get("secretName")
        plural = "configmaps" if kind == "configmap" else "secrets"
        obj = await self.agent.client.get_optional(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
        if obj is None:
            if ref.get("optional"):
                return {}
            raise ConfigError(f"{kind} {name!r} not found")
        obj.setdefault("kind", "ConfigMap" if kind == "configmap" else "Secret")
        return volume_files(object_bytes(obj), ref.get("items"), name, bool(ref.get("optional")))

    def _downward_files(self, items: list[dict]) -> dict[str, bytes]:
        files = {}
        for item in items or []:
            if item.get("fieldRef"):
                value = field_ref_value(self.pod, item["fieldRef"]["fieldPath"], self.pod_ip or "",
                                        self.agent.config.host_ip)
            elif item.get("resourceFieldRef"):
                ref = item["resourceFieldRef"]
                container = next((c for c in self.pod["spec"]["containers"]
                                  if c["name"] == ref.get("containerName")), self.pod["spec"]["containers"][0])
                value = resource_field_value(container, ref, self.agent.allocatable)
            else:
                continue
            files[item["path"]] = value.encode()
        return files

    async def _volumes(self) -> None:
        volumes_dir = self.dir / "volumes"
        self.volume_dirs = {}
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            target = volumes_dir / name
            files: dict[str, bytes] | None = None
            if "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                host = volume["hostPath"]
                path, kind = Path(host["path"]), host.get("type") or ""
                if kind == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
                elif kind == "FileOrCreate" and not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                elif kind in ("Directory", "File") and not path.exists():
                    raise ConfigError(f"hostPath {path} does not exist on this machine")
                self.volume_dirs[name] = str(path)
                continue
            elif "configMap" in volume:
                files = await self._source_files("configmap", volume["configMap"])
            elif "secret" in volume:
                files = await self._source_files("secret", volume["secret"])
            elif "downwardAPI" in volume:
                files = self._downward_files(volume["downwardAPI"].get("items"))
            elif "projected" in volume:
                files = {}
                for source in volume["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        token = source["serviceAccountToken"]
                        audience = token.get("audience") or ""
                        expiration = int(token.get("expirationSeconds") or TOKEN_EXPIRATION_SECONDS)
                        path = safe_join(target, token["path"])
                        same = next((t for t in self._tokens if t[:2] == (audience, expiration)), None)
                        if same is not None:  # the kube-api-access-* volume wants the pod's own token
                            same[2].append(path)
                            write_atomic(path, same[2][0].read_bytes(), 0o600)
                        else:
                            self._tokens.append((audience, expiration, [path]))
                            await self._write_token(audience, expiration, [path])
                    elif "configMap" in source:
                        files.update(await self._source_files("configmap", source["configMap"]))
                    elif "secret" in source:
                        files.update(await self._source_files("secret", source["secret"]))
                    elif "downwardAPI" in source:
                        files.update(self._downward_files(source["downwardAPI"].get("items")))
            elif "persistentVolumeClaim" in volume:
                self.volume_dirs[name] = await self._claim_path(volume["persistentVolumeClaim"]["claimName"])
                continue
            else:
                log.info("%s: volume %s: type not supported on the local node; not exported", self.key, name)
                continue
            target.mkdir(parents=True, exist_ok=True)
            for relative, content in (files or {}).items():
                write_atomic(safe_join(target, relative), content, 0o644)
            self.volume_dirs[name] = str(target)

    async def _claim_path(self, claim: str) -> str:
        pvc = await self.agent.client.get_optional(f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/{claim}")
        if pvc is None or not (pvc.get("spec") or {}).get("volumeName"):
            raise ConfigError(f"persistentVolumeClaim {claim!r} is not bound")
        pv = await self.agent.client.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
        source = pv["spec"].get("hostPath") or pv["spec"].get("local")
        if not source:
            raise ConfigError(f"persistentVolume {pv['metadata']['name']!r} is neither hostPath nor local")
        return source["path"]

    async def container_command(self, container: dict) -> tuple[list[str], dict[str, str], str]:
        """argv, environment and working dir of one container start (ConfigError / StartFailure)."""
        command = list(container.get("command") or [])
        if not command:
            raise StartFailure(
                "CreateContainerError",
                "no command: the devcluster local node ignores images and runs the container's "
                "command and args as a local process; set spec.containers[].command")
        sources = {}
        for kind, name in env_sources(container):
            plural = "configmaps" if kind == "configmap" else "secrets"
            obj = await self.agent.client.get_optional(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
            if obj is not None:
                obj.setdefault("kind", "ConfigMap" if kind == "configmap" else "Secret")
            sources[(kind, name)] = object_data(obj)
        api_port = str(self.agent.config.api_port)
        base = {**self.agent.base_env, "HOSTNAME": self.name,
                "KUBERNETES_SERVICE_HOST": self.agent.config.api_host, "KUBERNETES_SERVICE_PORT": api_port,
                "KUBERNETES_SERVICE_PORT_HTTPS": api_port,
                "KUBERNETES_PORT": f"tcp://{self.agent.config.api_host}:{api_port}",
                **self.sa_env}
        env = container_env(self.pod, container, pod_ip=self.pod_ip or "", host_ip=self.agent.config.host_ip,
                            base=base, sources=sources, node_allocatable=self.agent.allocatable)
        env.update(mount_env(container, self.volume_dirs))
        env["DEVCLUSTER_POD_DIR"] = str(self.dir)
        argv = [expand_vars(str(word), env) for word in command + list(container.get("args") or [])]
        cwd = container.get("workingDir") or str(self.dir)
        if not os.path.isdir(cwd):
            raise StartFailure("RunContainerError", f"workingDir {cwd!r} does not exist on this machine")
        exe = find_executable(argv[0], env.get("PATH", ""), cwd)
        if exe is None:
            raise StartFailure("RunContainerError", f'exec: "{argv[0]}": executable file not found in $PATH')
        return [exe, *argv[1:]], env, cwd

    async def spawn(self, container_name: str, argv: list[str], env: dict[str, str],
                    cwd: str) -> asyncio.subprocess.Process:
        log_path = self.dir / f"{container_name}.log"
        with contextlib.suppress(OSError):
            if log_path.stat().st_size > LOG_ROTATE_BYTES:
                rotate_log(log_path)
        with open(log_path, "ab") as log_file:
            log_file.write(f"--- devcluster: {rfc3339()} starting {' '.join(argv)}\n".encode())
            log_file.flush()
            prefix = self.agent.setpriv_prefix
            try:
                process = await asyncio.create_subprocess_exec(
                    *prefix, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
            except OSError as e:
                raise StartFailure("RunContainerError", f"cannot start {argv[0]!r}: {e.strerror or e}") from e
        self.agent.processes.add(process.pid, self.key, container_name)
        return process

    def reap(self, process: asyncio.subprocess.Process) -> None:
        """After a container's main process ended: kill what is left of its group (as a runtime kills
        the whole container) and forget the pid."""
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        self.agent.processes.remove(process.pid)

    async def stop(self, grace: float, delete_object: bool) -> None:
        """Stops every container (preStop, SIGTERM, `grace`, SIGKILL); with `delete_object`, writes
        the final status and deletes the pod object with grace 0, as the kubelet does."""
        if self._stopped is not None:
            await asyncio.shield(self._stopped)  # a second caller waits for the first one's work
            return
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            await self._stop_containers(grace, delete_object)
        finally:
            self._stopped.set_result(None)

    async def _stop_containers(self, grace: float, delete_object: bool) -> None:
        self.stopping = True
        self._stop.set()
        deadline = time.monotonic() + max(grace, 0)
        runners = [r for r in self.runners + self.init_runners if r.process is not None]
        for runner in runners:
            runner._event("Normal", "Killing", f"Stopping container {runner.name}")
        await asyncio.gather(*(self._pre_stop(r, grace) for r in runners))
        remaining = max(deadline - time.monotonic(), 1.0 if grace > 0 else 0.0)
        # Main containers first, then sidecars (init containers with restartPolicy Always).
        await asyncio.gather(*(r.terminate(remaining) for r in self.runners))
        await asyncio.gather(*(r.terminate(max(deadline - time.monotonic(), 0.5)) for r in self.init_runners))
        for task in self._tasks:
            if task is not asyncio.current_task() and task is not self._status_task and not task.get_name(
                    ).startswith("stop"):
                task.cancel()
        self.agent.ips.release(self.uid)
        if delete_object:
            await self._delete_object()
        for task in self._tasks:
            if task is not asyncio.current_task() and not task.get_name().startswith("stop"):
                task.cancel()
        if delete_object:
            self.remove_files()

    def remove_files(self) -> None:
        """Volumes and tokens go with the pod; its logs stay a while (see NodeAgent._collect_pod_dirs)."""
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)
        shutil.rmtree(self.dir / "serviceaccount", ignore_errors=True)

    async def _delete_object(self) -> None:
        """Final status, then the pod object goes (grace 0, only this very pod: uid precondition)."""
        for attempt in range(5):
            try:
                with contextlib.suppress(ApiError):
                    await self._flush_status()
                await self.agent.client.delete(
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
                    {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                     "preconditions": {"uid": self.uid}})
                return
            except ApiError as e:
                if e.status in (404, 409):
                    return
                log.warning("%s: deleting the pod object failed: %s", self.key, e)
            except (TimeoutError, aiohttp.ClientError) as e:
                log.warning("%s: deleting the pod object failed: %s", self.key, e)
            await asyncio.sleep(2 ** attempt)

    async def _pre_stop(self, runner: ContainerRunner, grace: float) -> None:
        handler = (runner.container.get("lifecycle") or {}).get("preStop")
        if not handler or grace <= 0:
            return
        ok, message = await run_handler(handler, pod_ip=self.pod_ip or "", container=runner.container,
                                        env=runner.env, cwd=runner.cwd, timeout=grace, http=self.agent.http)
        if not ok:
            log.info("%s/%s: preStop hook failed: %s", self.key, runner.name, message)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict:
        return pod_status(self.pod, init=[r.record for r in self.init_runners],
                          main=[r.record for r in self.runners], init_done=self.init_done,
                          init_failed=self.init_failed, pod_ip=self.pod_ip, host_ip=self.agent.config.host_ip,
                          start_time=self.start_time, now=rfc3339(), message=self.message)

    async def _flush_status(self) -> bool:
        """Writes the status when it differs from what was last written; False if the pod is gone."""
        if self._terminal_before:
            return True
        status = self.status()
        if status == self._written:
            return True
        try:
            await self.agent.client.request(
                "PATCH", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
                body={"metadata": {"uid": self.uid}, "status": status},
                content_type="application/strategic-merge-patch+json")
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        self._written = status
        return True

    async def _status_loop(self) -> None:
        delay = 1.0
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0.05)  # let a burst of changes settle into one write
            self._dirty.clear()
            try:
                if not await self._flush_status():
                    return
                delay = 1.0
            except (TimeoutError, ApiError, aiohttp.ClientError) as e:
                if isinstance(e, ApiError) and e.status == 409:
                    return  # the uid precondition failed: the name now belongs to another pod
                log.warning("%s: status update failed (retrying in %.0fs): %s", self.key, delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                self._dirty.set()


# ---------------------------------------------------------------------------------------------------
# The node.
# ---------------------------------------------------------------------------------------------------


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


def node_status(config: NodeConfig, capacity: dict[str, str], kubelet_version: str, now: str,
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
        "addresses": [{"type": "InternalIP", "address": config.host_ip},
                      {"type": "Hostname", "address": config.node_name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": read("/etc/machine-id"), "systemUUID": read("/etc/machine-id"),
            "bootID": read("/proc/sys/kernel/random/boot_id"), "kernelVersion": uname.release,
            "osImage": read("/etc/debian_version") and f"Debian {read('/etc/debian_version')}" or uname.system,
            "containerRuntimeVersion": "devcluster://local-processes", "kubeletVersion": kubelet_version,
            "kubeProxyVersion": "", "operatingSystem": "linux",
            "architecture": node_labels(config.node_name)["kubernetes.io/arch"],
        },
    }


def container_runs(text: str) -> list[str]:
    """A container log split into its runs (the agent writes a marker line at every start)."""
    runs = re.split(r"^--- devcluster: .*\n", text, flags=re.M)
    return runs[1:] if len(runs) > 1 else runs


def log_slice(text: str, tail_lines: int | None, limit_bytes: int | None) -> str:
    if tail_lines is not None:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[-tail_lines:]) if tail_lines > 0 else ""
    if limit_bytes is not None:
        text = text.encode()[:limit_bytes].decode("utf-8", "ignore")
    return text


def self_signed_certificate(directory: Path, host_ip: str, node_name: str) -> tuple[Path, Path]:
    """A serving certificate for the log endpoint (the API server does not verify it unless told
    to with --kubelet-certificate-authority)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / "kubelet.crt", directory / "kubelet.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_name),
                                                        x509.IPAddress(ipaddress.ip_address(host_ip))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class LogServer:
    """The one kubelet API call the local node answers: `/containerLogs/<ns>/<pod>/<container>`, so
    that `kubectl logs [-f] [--previous] [--tail N]` works. HTTPS on the node's address; a client must
    present a certificate of the cluster CA (the API server's kubelet client certificate does)."""

    FOLLOW_POLL_SECONDS = 0.5

    def __init__(self, agent: NodeAgent):
        self.agent = agent
        self.port = 0
        self._runner: aiohttp.web.AppRunner | None = None

    async def start(self) -> None:
        from aiohttp import web

        config = self.agent.config
        cert, key = self_signed_certificate(config.state_dir, config.host_ip, config.node_name)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=config.ca_file)
        context.load_cert_chain(cert, key)
        context.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.container_logs)
        app.router.add_get("/healthz", lambda _: self._ok())
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, config.host_ip, 0, ssl_context=context).start()
        self.port = self._runner.addresses[0][1]

    async def _ok(self):
        from aiohttp import web

        return web.Response(text="ok")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _running(self, namespace: str, pod: str, container: str) -> bool:
        for worker in list(self.agent.workers.values()):
            if worker.namespace == namespace and worker.name == pod:
                return any(r.name == container and r.process is not None
                           for r in worker.runners + worker.init_runners)
        return False

    async def container_logs(self, request):
        from aiohttp import web

        namespace, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        path = self.agent.config.state_dir / "pods" / f"{namespace}_{pod}" / f"{container}.log"
        if "/" in f"{namespace}{pod}{container}" or not path.is_file():
            return web.Response(status=404, text=f"no log of container {container} in pod {namespace}/{pod}")
        query = request.query

        def number(key: str) -> int | None:
            return int(query[key]) if query.get(key, "").isdigit() else None

        runs = container_runs(path.read_bytes().decode("utf-8", "replace"))
        previous = query.get("previous") in ("true", "1")
        if previous and len(runs) < 2:
            return web.Response(status=400, text=f"previous terminated container {container!r} not found")
        text = runs[-2] if previous else runs[-1]
        body = log_slice(text, number("tailLines"), number("limitBytes"))
        if previous or query.get("follow") not in ("true", "1"):
            return web.Response(text=body, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(body.encode())
        offset = path.stat().st_size
        while True:  # follow while the container runs; a poll of the file, bounded by the process
            running = self._running(namespace, pod, container)
            try:
                if path.stat().st_size < offset:
                    offset = 0  # rotated (copytruncate)
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(1 << 20)
            except OSError:
                break
            if chunk:
                offset += len(chunk)
                if b"--- devcluster: " in chunk:  # the container restarted: this stream ends
                    await response.write(chunk.split(b"--- devcluster: ", 1)[0])
                    break
                await response.write(chunk)
            elif not running:
                break
            else:
                await asyncio.sleep(self.FOLLOW_POLL_SECONDS)
        return response


class NodeAgent:
    def __init__(self, config: NodeConfig, client: ApiClient):
        self.config, self.client = config, client
        self.ips = IpAllocator(config.pod_cidr)
        self.processes = ProcessTable(config.state_dir / "processes.json")
        self.capacity = node_capacity(config.gpus, config.state_dir)
        self.allocatable = self.capacity
        self.base_env = base_environment(dict(os.environ), os.path.dirname(sys.executable))
        setpriv = shutil.which("setpriv")
        # Pod processes die with the agent (SIGKILL on the parent's death) if setpriv is at hand.
        self.setpriv_prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        self.workers: dict[str, PodWorker] = {}
        self._worker_tasks: dict[str, asyncio.Task] = {}
        self._stopping_tasks: set[asyncio.Task] = set()
        self.events = EventRecorder(config.node_name)
        self.logs = LogServer(self)
        self.http: aiohttp.ClientSession | None = None
        self.node_uid = ""
        self.kubelet_version = "v0.0.0-devcluster"
        self.ready_since = rfc3339()

    async def run(self, stop: asyncio.Event) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, force_close=True))
        try:
            try:
                await self.logs.start()
            except (OSError, ssl.SSLError, ValueError) as e:
                log.warning("no kubelet log endpoint (kubectl logs will not work): %s", e)
            if not await self._register(stop):
                return
            informer = Informer(self.client, "/api/v1/pods", self._on_pod,
                                params={"fieldSelector": f"spec.nodeName={self.config.node_name}"},
                                name="pods")
            background = [asyncio.create_task(c) for c in
                          (self._lease_loop(), self._node_status_loop(), informer.run(),
                           self.events.run(self.client), self._collect_pod_dirs(informer))]
            await stop.wait()
            for task in background:
                task.cancel()
            await self.shutdown()
        finally:
            await self.logs.stop()
            await self.http.close()

    async def _register(self, stop: asyncio.Event) -> bool:
        delay = 0.5
        while not stop.is_set():
            try:
                version = await self.client.get("/version")
                self.kubelet_version = version.get("gitVersion", self.kubelet_version)
                node = {"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": self.config.node_name, "labels": node_labels(self.config.node_name)},
                        "spec": {"podCIDR": self.config.pod_cidr, "podCIDRs": [self.config.pod_cidr]}}
                try:
                    created = await self.client.post("/api/v1/nodes", node)
                except ApiError as e:
                    if e.status != 409:
                        raise
                    created = await self.client.patch(f"/api/v1/nodes/{self.config.node_name}",
                                                      {"metadata": {"labels": node["metadata"]["labels"]}})
                self.node_uid = created["metadata"]["uid"]
                await self._post_node_status()
                await self._renew_lease()
                log.info("node %s registered (%s CPUs, %s memory, %s GPUs)", self.config.node_name,
                         self.capacity["cpu"], self.capacity["memory"], self.config.gpus)
                return True
            except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as e:
                log.info("waiting for the API server: %s", e)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5)
        return False

    async def _post_node_status(self) -> None:
        status = node_status(self.config, self.capacity, self.kubelet_version, rfc3339(), self.ready_since,
                             self.logs.port)
        await self.client.patch(f"/api/v1/nodes/{self.config.node_name}/status", {"status": status})

    async def _collect_pod_dirs(self, informer: Informer) -> None:
        """Every ten minutes: removes the directories (logs included) of pods gone for over an hour,
        so that test runs do not pile them up, and rotates logs over LOG_ROTATE_BYTES."""
        await informer.synced.wait()
        pods_dir = self.config.state_dir / "pods"
        while True:
            live = {pod["metadata"]["uid"] for pod in informer.objects.values()}
            with contextlib.suppress(OSError):
                for pod_dir in pods_dir.iterdir():
                    marker = pod_dir / ".uid"
                    with contextlib.suppress(OSError):
                        uid = marker.read_text() if marker.exists() else ""
                        if uid not in live and time.time() - pod_dir.stat().st_mtime > 3600:
                            shutil.rmtree(pod_dir, ignore_errors=True)
                            continue
                        for log_file in pod_dir.glob("*.log"):
                            if log_file.stat().st_size > LOG_ROTATE_BYTES:
                                rotate_log(log_file)
            await asyncio.sleep(600)

    async def _renew_lease(self) -> None:
        name, path = self.config.node_name, f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS, "renewTime": micro_time()}
        try:
            await self.client.patch(f"{path}/{name}", {"spec": spec}, kind="merge-patch")
        except ApiError as e:
            if e.status != 404:
                raise
            await self.client.post(path, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": name, "uid": self.node_uid}]},
                "spec": spec})

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            try:
                await self._renew_lease()
            except (TimeoutError, ApiError, aiohttp.ClientError) as e:
                log.warning("lease renewal failed: %s", e)

    async def _node_status_loop(self) -> None:
        while True:
            await asyncio.sleep(NODE_STATUS_SECONDS)
            try:
                await self._post_node_status()
            except ApiError as e:
                if e.status == 404:  # someone deleted the Node: register it again
                    await self._register(asyncio.Event())
                else:
                    log.warning("node status update failed: %s", e)
            except (TimeoutError, aiohttp.ClientError) as e:
                log.warning("node status update failed: %s", e)

    def _on_pod(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                # The object is gone (force deletion): stop the processes, write nothing.
                self._forget(worker, worker.stop(min(worker.grace_seconds(), DEFAULT_GRACE_SECONDS),
                                                 delete_object=False))
            return
        if worker is None:
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            task = asyncio.create_task(self._run_worker(worker))
            self._worker_tasks[uid] = task
        else:
            worker.update(pod)

    async def _run_worker(self, worker: PodWorker) -> None:
        try:
            await worker.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: pod worker failed", worker.key)

    def _forget(self, worker: PodWorker, stopping) -> None:
        async def stop_and_forget():
            try:
                await stopping
                worker.remove_files()
            finally:
                self.workers.pop(worker.uid, None)
                task = self._worker_tasks.pop(worker.uid, None)
                if task is not None:
                    task.cancel()
        task = asyncio.create_task(stop_and_forget())
        self._stopping_tasks.add(task)
        task.add_done_callback(self._stopping_tasks.discard)

    async def shutdown(self) -> None:
        """Stops every pod process (bounded grace), leaving pod objects as they are."""
        workers = list(self.workers.values())
        log.info("stopping %d pods", len(workers))
        await asyncio.gather(*(w.stop(min(w.grace_seconds(), self.config.shutdown_grace), delete_object=False)
                               for w in workers), return_exceptions=True)
        for task in list(self._worker_tasks.values()) + list(self._stopping_tasks):
            task.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devcluster.node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default="devcluster-local")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--pod-cidr", default="127.100.0.0/16")
    parser.add_argument("--api-host", default="127.0.0.1")
    parser.add_argument("--api-port", type=int, default=None,
                        help="the API server's port (default: the kubeconfig server's port)")
    parser.add_argument("--ca-file", default=None,
                        help="the API server's CA certificate (default: the kubeconfig's)")
    parser.add_argument("--backoff-base-seconds", type=float, default=BACKOFF_BASE_SECONDS,
                        help="first crash-loop back-off (doubles up to 300 s)")
    parser.add_argument("--shutdown-grace-seconds", type=float, default=10.0,
                        help="longest a pod gets to exit when the agent itself stops")
    parser.add_argument("--cleanup", action="store_true",
                        help="only kill the pod processes a previous run left behind, then exit")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    access = ClusterAccess.from_kubeconfig(args.kubeconfig, state_dir / "credentials")
    port = args.api_port or int(access.server.rsplit(":", 1)[1].split("/")[0])
    ca_file = args.ca_file or access.ca_file
    if not ca_file:
        raise SystemExit("--ca-file is needed: the kubeconfig names no certificate authority")
    config = NodeConfig(node_name=args.node_name, state_dir=state_dir, gpus=args.gpus, pod_cidr=args.pod_cidr,
                        api_host=args.api_host, api_port=port, ca_file=str(Path(ca_file).resolve()),
                        backoff_base=args.backoff_base_seconds, shutdown_grace=args.shutdown_grace_seconds)
    agent_processes = ProcessTable(state_dir / "processes.json")
    agent_processes.kill_leftovers()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = ApiClient(access, user_agent=f"devcluster-node/{args.node_name}")
    try:
        await NodeAgent(config, client).run(stop)
    finally:
        await client.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if args.cleanup:
        killed = ProcessTable(state_dir.resolve() / "processes.json").kill_leftovers()
        log.info("cleanup: %d recorded processes handled", killed)
        return 0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
