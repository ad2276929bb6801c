"""Pure builders for the pods of a replica group, and the revision they belong to.

A replica group is `pods_per_replica` pods of one revision, ranks 0..n-1. Everything a pod is made
of comes from `pod_template_inputs(md)`; its hash is the revision, so changing `replicas`, rollout or
autoscaling settings makes no new revision, and a pod's spec never needs an update in place (pod
specs are immutable): a new revision means new pods.

A replica of several ranks (pods x GPUs per pod, or several pods) is one runtime server: each pod
runs `moe-runtime serve --tensor-parallel-size N --nnodes K --node-rank R --master-addr ADDR
--master-port P`, as LeaderWorkerSet's pods run vLLM. Across pods the ranks meet at the leader's
stable name, `rank-0.<group Service>.<namespace>`: every pod of the group has `hostname`
`rank-<rank>` and `subdomain` its group's headless Service (services.desired_group_service), and
gets the name in `MOE_LEADER_ADDRESS` (LeaderWorkerSet's LWS_LEADER_ADDRESS), with `MOE_RANK`,
`MOE_WORLD_SIZE` and `MOE_MASTER_PORT`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from ..api import names
from ..api.spec import ModelDeployment

DSHM_SIZE = "16Gi"   # /dev/shm for NCCL between a pod's GPUs (containers get 64 MiB by default)
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
        "model": {"source": md.model.source.uri, "servedName": md.model.served_name, "dtype": md.model.dtype,
                  **({"cache": {"claimName": md.model.cache_claim}} if md.model.cache_claim else {})},
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
            # placement fields enter the hash only when set: revisions made before they existed keep theirs
            **({"affinity": dict(md.scheduling.affinity)} if md.scheduling.affinity else {}),
            **({"topologySpreadConstraints": [dict(c) for c in md.scheduling.topology_spread_constraints]}
               if md.scheduling.topology_spread_constraints else {}),
            **({"groupDomain": md.group_domain} if md.group_domain else {}),
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
    labels = {
        **common_labels(md),
        names.LABEL_REVISION: slot.revision,
        names.LABEL_TRACK: slot.track,
        names.LABEL_REPLICA: str(slot.replica),
        names.LABEL_RANK: str(slot.rank),
        names.LABEL_IN_ROTATION: "true" if slot.in_rotation else "false",
    }
    if md.pods_per_replica > 1:
        labels[names.LABEL_GROUP] = group_key(md, slot)
    return labels


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
    # hf://ORG/NAME[@REV]: an init container downloads into a cache volume shared with the runtime:
    # the pod's own emptyDir, or the model cache PVC (spec.model.cache), where one download per
    # model and revision serves every pod, restart, rank and revision after it (model_runtime.fetch).
    target = f"{MODEL_CACHE_MOUNT}/{src.repo}@{src.revision or 'main'}"
    if md.model.cache_claim:
        volume = {"name": "model-cache", "persistentVolumeClaim": {"claimName": md.model.cache_claim}}
    else:
        volume = {"name": "model-cache", "emptyDir": {}}
    init = {
        "name": "fetch-model",
        "image": md.runtime.image,
        "imagePullPolicy": md.runtime.image_pull_policy,
        "command": ["python", "-m", "model_runtime.fetch", src.repo, src.revision or "", target],
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


def runtime_args(md: ModelDeployment, model_arg: str, slot: PodSlot | None = None) -> list[str]:
    """The runtime's flags: the model and ports; for a replica of several ranks its layout and
    rendezvous (the user's `runtime.args` come last, so they may add to it, e.g.
    --enable-expert-parallel)."""
    args = [
        "serve",
        "--model", model_arg,
        "--served-model-name", md.model.served_name,
        "--http-port", str(names.HTTP_PORT),
        "--grpc-port", str(names.GRPC_PORT),
        "--dtype", md.model.dtype,
        "--drain-timeout", str(md.runtime.drain_timeout_seconds),
    ]
    if md.ranks_per_group > 1:
        args += ["--tensor-parallel-size", str(md.ranks_per_group)]
    if md.pods_per_replica > 1 and slot is not None:
        args += ["--nnodes", str(md.pods_per_replica), "--node-rank", str(slot.rank),
                 "--master-addr", "$(MOE_LEADER_ADDRESS)", "--master-port", "$(MOE_MASTER_PORT)"]
    return [*args, *md.runtime.args]


def leader_address(md: ModelDeployment, revision: str, replica: int) -> str:
    """The group leader's stable DNS name, relative to the cluster domain (as LeaderWorkerSet's)."""
    return f"{names.rank_hostname(0)}.{names.group_service_name(md.name, revision, replica)}.{md.namespace}"


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


def _env(md: ModelDeployment, slot: PodSlot) -> list[dict[str, Any]]:
    def field_ref(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    group = []
    if md.pods_per_replica > 1:
        group = [
            {"name": "MOE_LEADER_ADDRESS", "value": leader_address(md, slot.revision, slot.replica)},
            {"name": "MOE_MASTER_PORT", "value": str(names.dist_port(md.name, slot.revision, slot.replica))},
        ]
    return [
        {"name": "POD_IP", **field_ref("status.podIP")},
        {"name": "POD_NAME", **field_ref("metadata.name")},
        {"name": "POD_NAMESPACE", **field_ref("metadata.namespace")},
        {"name": "MOE_RANK", "value": str(slot.rank)},
        {"name": "MOE_WORLD_SIZE", "value": str(md.pods_per_replica)},
        {"name": "MOE_REVISION", "value": slot.revision},
        *group,
        *(dict(e) for e in md.runtime.env),
    ]


def group_labels(md: ModelDeployment, revision: str, replica: int) -> dict[str, str]:
    """The labels that pick out one replica group's pods."""
    return {names.LABEL_DEPLOYMENT: md.name, names.LABEL_REVISION: revision, names.LABEL_REPLICA: str(replica)}


def _affinity(md: ModelDeployment, slot: PodSlot) -> dict[str, Any] | None:
    """The user's affinity, plus for `topology.groupDomain` LeaderWorkerSet's exclusive placement:
    every pod of a group in the domain of its peers (podAffinity on the group's labels; the first
    pod matches itself), and no two groups in one domain (podAntiAffinity on other groups)."""
    affinity = {k: dict(v) for k, v in (md.scheduling.affinity or {}).items()}
    if md.group_domain and md.pods_per_replica > 1:
        own = group_labels(md, slot.revision, slot.replica)
        same_group = {"labelSelector": {"matchLabels": own}, "topologyKey": md.group_domain}
        other_groups = {"labelSelector": {"matchExpressions": [
            {"key": names.LABEL_DEPLOYMENT, "operator": "Exists"},
            {"key": names.LABEL_RANK, "operator": "Exists"},
            {"key": names.LABEL_GROUP, "operator": "NotIn", "values": [group_key(md, slot)]},
        ]}, "topologyKey": md.group_domain}
        for kind, term in (("podAffinity", same_group), ("podAntiAffinity", other_groups)):
            section = affinity.setdefault(kind, {})
            required = list(section.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
            section["requiredDuringSchedulingIgnoredDuringExecution"] = [*required, term]
    return affinity or None


def group_key(md: ModelDeployment, slot: PodSlot) -> str:
    """One value per replica group in the cluster (the `group` label's value)."""
    return names.group_service_name(md.name, slot.revision, slot.replica)


def desired_pod(md: ModelDeployment, slot: PodSlot, gang: bool = False, gate: bool = False) -> dict[str, Any]:
    """The full pod for one slot of the plan (pure). `md` must carry the template of the slot's
    revision (`ModelDeployment.with_template`), not necessarily the current spec's. `gang`: the
    cluster gang-schedules PodGroups (desired/gang.py), so a multi-pod group's pods name theirs.
    `gate`: no PodGroups, the operator admits groups itself (app/gates.py): a multi-pod group's pods
    start behind a scheduling gate, lifted for all of them at once when the group fits."""
    model_arg, volumes, mounts, inits = _model_volume(md)
    allowance = startup_allowance_seconds(md)
    http_probe = {"path": names.READY_PATH, "port": names.HTTP_PORT}
    container = {
        "name": RUNTIME_CONTAINER,
        "image": md.runtime.image,
        "imagePullPolicy": md.runtime.image_pull_policy,
        "command": ["moe-runtime"],
        "args": runtime_args(md, model_arg, slot),
        "env": _env(md, slot),
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
    if md.pods_per_replica > 1:
        port = names.dist_port(md.name, slot.revision, slot.replica)
        container["ports"].append({"name": "dist", "containerPort": port, "protocol": "TCP"})
    if md.ranks_per_group > 1 and md.resources.gpus > 0:  # NCCL's shared memory between the pod's GPUs
        volumes = [*volumes, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": DSHM_SIZE}}]
        mounts = [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}]
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
    if (affinity := _affinity(md, slot)) is not None:
        spec["affinity"] = affinity
    if md.scheduling.topology_spread_constraints:
        spec["topologySpreadConstraints"] = [dict(c) for c in md.scheduling.topology_spread_constraints]
    if md.pods_per_replica > 1:   # a stable name per rank: rank-<r>.<group Service>.<namespace>
        spec["hostname"] = names.rank_hostname(slot.rank)
        spec["subdomain"] = names.group_service_name(md.name, slot.revision, slot.replica)
        if gang:   # the group's PodGroup (named as its Service): bound all together or not at all
            spec["schedulingGroup"] = {"podGroupName": spec["subdomain"]}
        elif gate:
            spec["schedulingGates"] = [{"name": names.GANG_GATE}]
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
