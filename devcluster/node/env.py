"""A container's environment as the kubelet builds it: what the node passes on, env and envFrom
(ConfigMap and Secret keys read from the API, the downward API's fieldRef and resourceFieldRef,
`$(VAR)` expansion), the variables that stand in for volumeMounts, and the pod's service account:
a bound token from the TokenRequest API and a kubeconfig that uses it."""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import aiohttp
import yaml

from devcluster.files import write_atomic
from devcluster.kubeapi import ApiClient, ApiError, kubeconfig, parse_time

log = logging.getLogger("devcluster.node")

TOKEN_EXPIRATION_SECONDS = 3607  # what the kubelet asks for

# Environment of this agent that pod processes inherit (names, or prefixes ending in "*").
PASS_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR", "XDG_CACHE_HOME",
            "HF_*", "HUGGINGFACE_*", "TRANSFORMERS_*", "TORCH_*", "OMP_NUM_THREADS")


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
    # Deferred: the kubernetes client package takes ~0.3 s to import, and few pods ask for this.
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


def object_bytes(obj: dict) -> dict[str, bytes]:
    """A ConfigMap's or Secret's data as bytes (what its volume files hold)."""
    if obj.get("kind") == "Secret":
        files = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        files.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        return files
    files = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    files.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return files


def object_data(obj: dict | None) -> dict[str, str] | None:
    """The string data of a ConfigMap or Secret (secrets decoded), None for a missing object."""
    if obj is None:
        return None
    return {k: v.decode("utf-8", "replace") for k, v in object_bytes(obj).items()}


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
    """The env variables that stand in for a container's volumeMounts: DEVCLUSTER_MOUNT_<PATH> is the
    host directory of the volume mounted at PATH (see devcluster.node's docstring)."""
    env = {}
    for mount in container.get("volumeMounts") or []:
        host_dir = volume_dirs.get(mount["name"])
        if host_dir is None:
            continue
        if mount.get("subPath"):
            host_dir = os.path.join(host_dir, mount["subPath"])
        env[mount_env_name(mount["mountPath"])] = host_dir
    return env


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


def kubernetes_service_env(api_host: str, api_port: int) -> dict[str, str]:
    """The `kubernetes` Service's variables, pointing at the API server on this machine."""
    port = str(api_port)
    return {"KUBERNETES_SERVICE_HOST": api_host, "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{api_host}:{port}"}


async def config_object(client: ApiClient, namespace: str, kind: str, name: str) -> dict | None:
    """ConfigMap (kind "configmap") or Secret ("secret") `name`, its `kind` set; None if missing."""
    plural = "configmaps" if kind == "configmap" else "secrets"
    obj = await client.get_optional(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
    if obj is not None:
        obj.setdefault("kind", "ConfigMap" if kind == "configmap" else "Secret")
    return obj


async def env_source_data(client: ApiClient, namespace: str,
                          container: dict) -> dict[tuple[str, str], dict[str, str] | None]:
    """The data of the ConfigMaps and Secrets a container's env reads (container_env's `sources`)."""
    return {(kind, name): object_data(await config_object(client, namespace, kind, name))
            for kind, name in env_sources(container)}


class ServiceAccountTokens:
    """A pod's service-account tokens, bound to the pod (TokenRequest): the one its kubeconfig reads
    and those its projected volumes ask for, each renewed at 80% of its lifetime."""

    def __init__(self, client: ApiClient, pod: dict):
        self.client, self.pod = client, pod
        meta = pod["metadata"]
        self.namespace = meta.get("namespace", "default")
        self.service_account = pod["spec"].get("serviceAccountName") or "default"
        self.tokens: list[tuple[str, int, list[Path]]] = []  # (audience, expirationSeconds, files)

    async def mount(self, sa_dir: Path, ca_file: str, server: str) -> dict[str, str]:
        """Unless automountServiceAccountToken is false (pod, else service account): token, ca.crt,
        namespace and a kubeconfig in sa_dir; returns the env that points at them."""
        automount = self.pod["spec"].get("automountServiceAccountToken")
        if automount is None:
            try:
                sa = await self.client.get(
                    f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{self.service_account}")
            except ApiError as e:
                if e.status != 404:
                    raise
                raise ConfigError(f"service account {self.service_account!r} not found") from e
            automount = sa.get("automountServiceAccountToken")
        if automount is False:
            return {}
        token_file = sa_dir / "token"
        self.tokens.append(("", TOKEN_EXPIRATION_SECONDS, [token_file]))
        await self._write("", TOKEN_EXPIRATION_SECONDS, [token_file])
        write_atomic(sa_dir / "ca.crt", Path(ca_file).read_bytes())
        write_atomic(sa_dir / "namespace", self.namespace)
        config = kubeconfig(server, {"certificate-authority": str(sa_dir / "ca.crt")}, "serviceaccount",
                            {"tokenFile": str(token_file)}, namespace=self.namespace)
        write_atomic(sa_dir / "kubeconfig", yaml.safe_dump(config), 0o600)
        return {"KUBECONFIG": str(sa_dir / "kubeconfig"), "DEVCLUSTER_SERVICEACCOUNT_DIR": str(sa_dir)}

    async def project(self, audience: str, expiration: int, path: Path) -> None:
        """A projected serviceAccountToken volume's file."""
        same = next((t for t in self.tokens if t[:2] == (audience, expiration)), None)
        if same is not None:  # the kube-api-access-* volume wants the pod's own token
            same[2].append(path)
            write_atomic(path, same[2][0].read_bytes(), 0o600)
        else:
            self.tokens.append((audience, expiration, [path]))
            await self._write(audience, expiration, [path])

    async def _write(self, audience: str, expiration: int, files: list[Path]) -> float:
        """Requests a token bound to this pod; returns its lifetime in seconds."""
        meta = self.pod["metadata"]
        answer = await self.client.request_token(
            self.namespace, self.service_account, expiration, audience=audience,
            bound_to={"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]})
        for path in files:
            write_atomic(path, answer["token"], 0o600)
        expires = parse_time(answer.get("expirationTimestamp"))
        return min(float(expiration), (expires - time.time()) if expires else float(expiration))

    async def refresh(self, wait_stopping: Callable[[float], Awaitable[bool]]) -> None:
        """Renews each token at 80% of its lifetime (as the kubelet does) until the pod stops."""
        key = f"{self.namespace}/{self.pod['metadata']['name']}"
        while True:
            lifetime = min(exp for _, exp, _ in self.tokens)
            if await wait_stopping(max(60.0, 0.8 * lifetime)):
                return
            for audience, expiration, files in self.tokens:
                try:
                    await self._write(audience, expiration, files)
                except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as e:
                    log.warning("%s: token refresh failed: %s", key, e)
