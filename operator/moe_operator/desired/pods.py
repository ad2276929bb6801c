"""Pure builders for the pods of a replica group, and the revision they belong to.

A replica group is `pods_per_replica` pods of one revision, ranks 0..n-1. Everything a pod is made
of comes from `pod_template_inputs(md)`; its hash is the revision, so changing `replicas`, rollout or
autoscaling settings makes no new revision, and a pod's spec never needs an update in place (pod
specs are immutable): a new revision means new pods.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from ..api import names
from ..api.spec import ModelDeployment

MODEL_MOUNT = "/models"
MODEL_CACHE_MOUNT = "/model-cache"
STARTUP_PERIOD_SECONDS = 5
RUNTIME_CONTAINER = "runtime"
RUN_AS_USER = 10001   # the runtime image's user (model_runtime/Dockerfile)


@dataclass(frozen=True)
class PodSlot:
    """Identity of one pod the plan wants: which group, which rank, which track, in rotation or not."""

    revision: str
    replica: int
    rank: int
    track: str
    in_rotation: bool
    name: str


def pod_template_inputs(md: ModelDeployment) -> dict[str, Any]:
    """What goes into the pod template (and nothing else): the revision is the hash of this."""
    rt, res = md.runtime, md.resources
    return {
        "model": {"source": md.model.source.uri, "servedName": md.model.served_name, "dtype": md.model.dtype},
        "runtime": {
            "image": rt.image,
            "imagePullPolicy": rt.image_pull_policy,
            "args": list(rt.args),
            "env": [dict(e) for e in rt.env],
            "startupTimeoutSeconds": rt.startup_timeout_seconds,
            "terminationGracePeriodSeconds": rt.termination_grace_period_seconds,
        },
        "resources": {"gpus": res.gpus, "gpuResource": res.gpu_resource, "cpu": res.cpu, "memory": res.memory},
        "podsPerReplica": md.pods_per_replica,
        "scheduling": {
            "nodeSelector": dict(md.scheduling.node_selector),
            "tolerations": [dict(t) for t in md.scheduling.tolerations],
            "priorityClassName": md.scheduling.priority_class_name,
        },
    }


def revision_of(md: ModelDeployment) -> str:
    """A short, stable hash of the pod template's inputs (10 hex digits)."""
    text = json.dumps(pod_template_inputs(md), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def pod_name(md_name: str, revision: str, replica: int, rank: int, incarnation: int = 0) -> str:
    """`<name>-<revision>-<replica>-<rank>`; a replacement made while the old pod still terminates
    gets `-<incarnation>` appended (pod names must be unique while both exist)."""
    base = f"{md_name}-{revision}-{replica}-{rank}"
    return base if incarnation == 0 else f"{base}-{incarnation}"


def startup_allowance_seconds(md: ModelDeployment) -> int:
    """How long a pod may take to load weights and warm up before its startup probe gives up."""
    if md.runtime.startup_timeout_seconds is not None:
        return md.runtime.startup_timeout_seconds
    return 300 if md.model.source.scheme == "builtin" else 1200


def owner_reference(md: ModelDeployment) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": md.name,
        "uid": md.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def common_labels(md: ModelDeployment) -> dict[str, str]:
    return {
        names.LABEL_NAME: names.APP_NAME,
        names.LABEL_INSTANCE: md.name,
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
        names.LABEL_DEPLOYMENT: md.name,
    }


def pod_labels(md: ModelDeployment, slot: PodSlot) -> dict[str, str]:
    return {
        **common_labels(md),
        names.LABEL_REVISION: slot.revision,
        names.LABEL_TRACK: slot.track,
        names.LABEL_REPLICA: str(slot.replica),
        names.LABEL_RANK: str(slot.rank),
        names.LABEL_IN_ROTATION: "true" if slot.in_rotation else "false",
    }


def _model_volume(md: ModelDeployment) -> tuple[str, list[dict], list[dict], list[dict]]:
    """(--model argument, volumes, runtime volume mounts, init containers) for the model source."""
    src = md.model.source
    if src.scheme == "builtin":
        return src.uri, [], [], []
    if src.scheme == "pvc":
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": src.claim, "readOnly": True}}
        mount = {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}
        path = f"{MODEL_MOUNT}/{src.path}".rstrip("/")
        return path, [volume], [mount], []
    if src.scheme == "hostpath":
        # Mounted at the same path as on the node, so the --model path reads the same inside a
        # container and in a devcluster local pod (a process on the node).
        volume = {"name": "model", "hostPath": {"path": src.path, "type": "Directory"}}
        mount = {"name": "model", "mountPath": src.path, "readOnly": True}
        return src.path, [volume], [mount], []
    # hf://ORG/NAME[@REV]: an init container downloads into a cache volume shared with the runtime.
    target = f"{MODEL_CACHE_MOUNT}/{src.repo}"
    volume = {"name": "model-cache", "emptyDir": {}}
    init = {
        "name": "fetch-model",
        "image": md.runtime.image,
        "imagePullPolicy": md.runtime.image_pull_policy,
        "command": ["python", "-c",
                    "import sys, huggingface_hub as h; "
                    "h.snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2] or None, local_dir=sys.argv[3])",
                    src.repo, src.revision or "", target],
        "env": [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}, *(dict(e) for e in md.runtime.env)],
        "volumeMounts": [{"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT}],
        "securityContext": container_security_context(),
    }
    mount = {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT, "readOnly": True}
    return target, [volume], [mount], [init]


def container_security_context() -> dict[str, Any]:
    """The restricted Pod Security Standard, per container."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def runtime_args(md: ModelDeployment, model_arg: str) -> list[str]:
    return [
        "serve",
        "--model", model_arg,
        "--served-model-name", md.model.served_name,
        "--http-port", str(names.HTTP_PORT),
        "--grpc-port", str(names.GRPC_PORT),
        "--dtype", md.model.dtype,
        "--drain-timeout", str(md.runtime.drain_timeout_seconds),
        *md.runtime.args,
    ]


def _resources(md: ModelDeployment) -> dict[str, Any]:
    res = md.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu is not None:
        requests["cpu"] = res.cpu            # no CPU limit: throttling hurts token latency
    if res.memory is not None:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus:
        requests[res.gpu_resource] = limits[res.gpu_resource] = str(res.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _env(md: ModelDeployment, revision: str, rank: int) -> list[dict[str, Any]]:
    def field_ref(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    return [
        {"name": "POD_IP", **field_ref("status.podIP")},
        {"name": "POD_NAME", **field_ref("metadata.name")},
        {"name": "POD_NAMESPACE", **field_ref("metadata.namespace")},
        {"name": "MOE_RANK", "value": str(rank)},
        {"name": "MOE_WORLD_SIZE", "value": str(md.pods_per_replica)},
        {"name": "MOE_REVISION", "value": revision},
        *(dict(e) for e in md.runtime.env),
    ]


def desired_pod(md: ModelDeployment, slot: PodSlot) -> dict[str, Any]:
    """The full pod for one slot of the plan (pure). `md` must carry the template of the slot's
    revision (`ModelDeployment.with_template`), not necessarily the current spec's."""
    model_arg, volumes, mounts, inits = _model_volume(md)
    allowance = startup_allowance_seconds(md)
    http_probe = {"path": names.READY_PATH, "port": names.HTTP_PORT}
    container = {
        "name": RUNTIME_CONTAINER,
        "image": md.runtime.image,
        "imagePullPolicy": md.runtime.image_pull_policy,
        "command": ["moe-runtime"],
        "args": runtime_args(md, model_arg),
        "env": _env(md, slot.revision, slot.rank),
        "ports": [
            {"name": "http", "containerPort": names.HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": names.GRPC_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(md),
        "startupProbe": {
            "httpGet": http_probe,
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "timeoutSeconds": 2,
            "failureThreshold": max(1, math.ceil(allowance / STARTUP_PERIOD_SECONDS)),
        },
        "readinessProbe": {"httpGet": http_probe, "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {
            "httpGet": {"path": names.LIVE_PATH, "port": names.HTTP_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "securityContext": container_security_context(),
    }
    if not container["resources"]:
        del container["resources"]
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": md.runtime.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    }
    if inits:
        spec["initContainers"] = inits
    if volumes:
        spec["volumes"] = volumes
    if md.scheduling.node_selector:
        spec["nodeSelector"] = dict(md.scheduling.node_selector)
    if md.scheduling.tolerations:
        spec["tolerations"] = [dict(t) for t in md.scheduling.tolerations]
    if md.scheduling.priority_class_name:
        spec["priorityClassName"] = md.scheduling.priority_class_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": slot.name,
            "namespace": md.namespace,
            "labels": pod_labels(md, slot),
            "ownerReferences": [owner_reference(md)],
        },
        "spec": spec,
    }


def _container_identity(c: Any) -> dict[str, Any]:
    return {k: c.get(k) for k in ("name", "image", "command", "args", "env")}


def template_fingerprint(pod: Any) -> str:
    """A hash of what makes a pod run a given model: its containers' images, commands, arguments and
    environment, node selector and priority class. These are stored as written (the API server
    defaults none of them), so a pod built from a revision's template has the same fingerprint as
    the pod the template builds now, and one built from another template does not."""
    spec = pod.get("spec") or {}
    text = json.dumps({
        "containers": [_container_identity(c) for c in spec.get("containers") or ()],
        "initContainers": [_container_identity(c) for c in spec.get("initContainers") or ()],
        "nodeSelector": spec.get("nodeSelector") or {},
        "priorityClassName": spec.get("priorityClassName"),
    }, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
