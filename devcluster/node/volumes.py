"""A pod's volumes on this machine, without mount namespaces: emptyDir is a per-pod directory,
hostPath the host path itself, configMap, secret, downwardAPI and projected volumes are files
written into a per-pod directory, and a PVC bound to a hostPath or local PV is that path. The
containers find them through env.mount_env's DEVCLUSTER_MOUNT_<PATH> variables."""

from __future__ import annotations

import logging
from pathlib import Path

from devcluster.files import write_atomic
from devcluster.kubeapi import ApiClient
from devcluster.node.env import (
    TOKEN_EXPIRATION_SECONDS,
    ConfigError,
    ServiceAccountTokens,
    config_object,
    field_ref_value,
    object_bytes,
    resource_field_value,
)

log = logging.getLogger("devcluster.node")


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


def downward_files(pod: dict, items: list[dict] | None, *, pod_ip: str, host_ip: str,
                   allocatable: dict[str, str]) -> dict[str, bytes]:
    """The files of a downwardAPI volume (or projected source)."""
    files = {}
    for item in items or []:
        if item.get("fieldRef"):
            value = field_ref_value(pod, item["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif item.get("resourceFieldRef"):
            ref = item["resourceFieldRef"]
            container = next((c for c in pod["spec"]["containers"]
                              if c["name"] == ref.get("containerName")), pod["spec"]["containers"][0])
            value = resource_field_value(container, ref, allocatable)
        else:
            continue
        files[item["path"]] = value.encode()
    return files


async def source_files(client: ApiClient, namespace: str, kind: str, ref: dict) -> dict[str, bytes]:
    """The files of a configMap or secret volume (or projected source)."""
    name = ref.get("name") or ref.get("secretName")
    obj = await config_object(client, namespace, kind, name)
    if obj is None:
        if ref.get("optional"):
            return {}
        raise ConfigError(f"{kind} {name!r} not found")
    return volume_files(object_bytes(obj), ref.get("items"), name, bool(ref.get("optional")))


async def claim_path(client: ApiClient, namespace: str, claim: str) -> str:
    """The host path of the PV a claim is bound to (hostPath or local PVs only)."""
    pvc = await client.get_optional(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
    if pvc is None or not (pvc.get("spec") or {}).get("volumeName"):
        raise ConfigError(f"persistentVolumeClaim {claim!r} is not bound")
    pv = await client.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
    source = pv["spec"].get("hostPath") or pv["spec"].get("local")
    if not source:
        raise ConfigError(f"persistentVolume {pv['metadata']['name']!r} is neither hostPath nor local")
    return source["path"]


async def make_volumes(pod: dict, volumes_dir: Path, *, client: ApiClient, tokens: ServiceAccountTokens,
                       pod_ip: str, host_ip: str, allocatable: dict[str, str]) -> dict[str, str]:
    """Makes the pod's volumes under volumes_dir (or finds their host paths); returns volume name ->
    host path. Raises ConfigError while something they need is missing."""
    namespace = pod["metadata"].get("namespace", "default")
    volume_dirs = {}
    for volume in pod["spec"].get("volumes") or []:
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
            volume_dirs[name] = str(path)
            continue
        elif "configMap" in volume:
            files = await source_files(client, namespace, "configmap", volume["configMap"])
        elif "secret" in volume:
            files = await source_files(client, namespace, "secret", volume["secret"])
        elif "downwardAPI" in volume:
            files = downward_files(pod, volume["downwardAPI"].get("items"), pod_ip=pod_ip, host_ip=host_ip,
                                   allocatable=allocatable)
        elif "projected" in volume:
            files = {}
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    token = source["serviceAccountToken"]
                    expiration = int(token.get("expirationSeconds") or TOKEN_EXPIRATION_SECONDS)
                    path = safe_join(target, token["path"])
                    await tokens.project(token.get("audience") or "", expiration, path)
                elif "configMap" in source:
                    files.update(await source_files(client, namespace, "configmap", source["configMap"]))
                elif "secret" in source:
                    files.update(await source_files(client, namespace, "secret", source["secret"]))
                elif "downwardAPI" in source:
                    files.update(downward_files(pod, source["downwardAPI"].get("items"), pod_ip=pod_ip,
                                                host_ip=host_ip, allocatable=allocatable))
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            volume_dirs[name] = await claim_path(client, namespace, claim)
            continue
        else:
            log.info("%s/%s: volume %s: type not supported on the local node; not exported", namespace,
                     pod["metadata"]["name"], name)
            continue
        target.mkdir(parents=True, exist_ok=True)
        for relative, content in (files or {}).items():
            write_atomic(safe_join(target, relative), content, 0o644)
        volume_dirs[name] = str(target)
    return volume_dirs
