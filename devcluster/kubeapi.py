"""The devcluster's one Kubernetes API client (no client library): who we are and where the API
server is (`ClusterAccess`, from a kubeconfig or certificate files), async requests and watches over
aiohttp (`ApiClient`), and a list+watch cache (`Informer`).

The node agent, the service proxy and pod discovery run on it inside their event loops; `up` and
`status`, which are synchronous, make their few calls (read a Node, server-side apply a handful of
bootstrap objects, request a token) through `call`, one short event loop each.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

log = logging.getLogger("devcluster.kubeapi")

T = TypeVar("T")

FIELD_MANAGER = "devcluster"
CLUSTER_NAME = "devcluster"  # the cluster's and the context's name in every kubeconfig written here
# Failing to reach the API server at all (refused, reset, timed out: TimeoutError is an OSError).
CONNECTION_ERRORS = (aiohttp.ClientError, OSError)

# kind -> (API prefix, plural, namespaced) for the kinds `up` applies.
KINDS = {
    "Node": ("/api/v1", "nodes", False),
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
}


class ApiError(RuntimeError):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body or {}


# --- who we are and where the API server is ------------------------------------------------------


@dataclass
class ClusterAccess:
    """Where the API server is and how to authenticate."""

    server: str
    ssl_context: ssl.SSLContext | bool
    token: str | None = None
    ca_file: str | None = None

    @classmethod
    def from_certificates(cls, server: str, ca_file: Path, cert_file: Path, key_file: Path) -> ClusterAccess:
        """A client certificate of the cluster CA (what the devcluster's own components use)."""
        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(str(cert_file), str(key_file))
        return cls(server=server.rstrip("/"), ssl_context=context, ca_file=str(ca_file))

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike, scratch_dir: str | os.PathLike) -> ClusterAccess:
        """Reads the current context; inline certificate data is written to private files in
        `scratch_dir` because `ssl` only loads client certificates from files."""
        path = Path(path)
        config = yaml.safe_load(path.read_text())
        contexts = {c["name"]: c["context"] for c in config.get("contexts") or []}
        clusters = {c["name"]: c["cluster"] for c in config.get("clusters") or []}
        users = {u["name"]: u.get("user") or {} for u in config.get("users") or []}
        context = contexts[config.get("current-context") or next(iter(contexts))]
        cluster, user = clusters[context["cluster"]], users.get(context.get("user"), {})
        base = path.parent

        def material(file_key: str, data_key: str, section: dict, name: str) -> str | None:
            if section.get(data_key):
                scratch = Path(scratch_dir)
                scratch.mkdir(parents=True, exist_ok=True)
                target = scratch / name
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(section[data_key]))
                return str(target)
            if section.get(file_key):
                return str(base / section[file_key])
            return None

        ca_file = material("certificate-authority", "certificate-authority-data", cluster, "ca.crt")
        if cluster.get("insecure-skip-tls-verify"):
            context_ssl: ssl.SSLContext | bool = False
        else:
            context_ssl = ssl.create_default_context(cafile=ca_file)
            cert = material("client-certificate", "client-certificate-data", user, "client.crt")
            key = material("client-key", "client-key-data", user, "client.key")
            if cert:
                context_ssl.load_cert_chain(cert, key)
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = (base / user["tokenFile"]).read_text().strip()
        return cls(server=cluster["server"].rstrip("/"), ssl_context=context_ssl, token=token, ca_file=ca_file)


def kubeconfig(server: str, cluster: dict, user_name: str, user: dict, namespace: str | None = None) -> dict:
    """A kubeconfig of one cluster, one user and their context. `cluster` says how to trust the
    server (certificate-authority or -data), `user` how to authenticate."""
    context = {"cluster": CLUSTER_NAME, "user": user_name}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {"server": server, **cluster}}],
        "users": [{"name": user_name, "user": user}],
        "contexts": [{"name": CLUSTER_NAME, "context": context}],
        "current-context": CLUSTER_NAME,
    }


# --- requests and watches -------------------------------------------------------------------------


class ApiClient:
    """Just enough of the Kubernetes REST API, async. Paths are API paths (`/api/v1/...`)."""

    def __init__(self, access: ClusterAccess, user_agent: str = "devcluster", timeout: float = 30.0):
        self.access = access
        self.timeout = timeout
        headers = {"User-Agent": user_agent, "Accept": "application/json"}
        if access.token:
            headers["Authorization"] = f"Bearer {access.token}"
        self._session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(ssl=access.ssl_context, limit=64))

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    async def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                      content_type: str = "application/json", timeout: float | None = None) -> dict:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._session.request(
                method, self.access.server + path, params=params, data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout, sock_connect=5)) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else {}
            except ValueError:
                payload = {"message": text[:500]}
            if resp.status >= 400:
                raise ApiError(resp.status, payload.get("message") or resp.reason or "", payload)
            return payload

    async def get(self, path: str, **params) -> dict:
        return await self.request("GET", path, params=params or None)

    async def get_optional(self, path: str) -> dict | None:
        """The object at path, or None when it does not exist (404)."""
        try:
            return await self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def post(self, path: str, body: dict) -> dict:
        return await self.request("POST", path, body=body)

    async def patch(self, path: str, body: dict, kind: str = "strategic-merge-patch") -> dict:
        return await self.request("PATCH", path, body=body, content_type=f"application/{kind}+json")

    async def delete(self, path: str, body: dict | None = None) -> dict:
        return await self.request("DELETE", path, body=body)

    async def apply(self, obj: dict) -> dict:
        """Server-side apply obj (create or update) with the devcluster's field manager (the kinds
        of KINDS)."""
        prefix, plural, namespaced = KINDS[obj["kind"]]
        meta = obj["metadata"]
        ns = f"/namespaces/{meta['namespace']}" if namespaced else ""
        return await self.request("PATCH", f"{prefix}{ns}/{plural}/{meta['name']}",
                                  params={"fieldManager": FIELD_MANAGER, "force": "true"}, body=obj,
                                  content_type="application/apply-patch+yaml")

    async def request_token(self, namespace: str, service_account: str, seconds: int, *,
                            bound_to: dict | None = None, audience: str = "") -> dict:
        """A token for the service account (TokenRequest API), bound to an object (`bound_to`: a
        boundObjectRef) if given: the answer's status, {"token", "expirationTimestamp"}."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if bound_to:
            spec["boundObjectRef"] = bound_to
        if audience:
            spec["audiences"] = [audience]
        answer = await self.post(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return answer["status"]

    async def watch(self, path: str, params: dict, timeout_seconds: int = 290) -> AsyncIterator[dict]:
        """Yields watch events; raises ApiError(410) when the resourceVersion is too old."""
        query = {**params, "watch": "1", "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout_seconds)}
        async with self._session.get(
                self.access.server + path, params=query,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5,
                                              sock_read=timeout_seconds + 30)) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, (await resp.text())[:500])
            buffer = b""
            # Events can be longer than aiohttp's line limit, so lines are split here.
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            status = event.get("object") or {}
                            raise ApiError(status.get("code") or 500, status.get("message", ""))
                        yield event


def call(access: ClusterAccess, work: Callable[[ApiClient], Awaitable[T]], timeout: float = 10.0) -> T:
    """Run `work` with a client of its own in an event loop of its own: the API from synchronous
    code (`up`, `status`). Not from inside a running event loop."""

    async def run() -> T:
        async with ApiClient(access, timeout=timeout) as client:
            return await work(client)

    return asyncio.run(run())


class Informer:
    """A list+watch cache of one collection. `on_event(type, obj)` is called, synchronously and in
    order, with ADDED/MODIFIED/DELETED; a re-list after a broken watch reports what changed meanwhile
    (objects that vanished as DELETED)."""

    def __init__(self, client: ApiClient, path: str, on_event: Callable[[str, dict], None],
                 params: dict | None = None, name: str = ""):
        self.client, self.path, self.on_event = client, path, on_event
        self.params = params or {}
        self.name = name or path
        self.objects: dict[str, dict] = {}  # by uid
        self.synced = asyncio.Event()

    async def run(self) -> None:
        delay = 0.5
        while True:
            try:
                version = await self._relist()
                delay = 0.5
                while True:
                    async for event in self.client.watch(self.path, {**self.params,
                                                                     "resourceVersion": version}):
                        obj = event["object"]
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if event["type"] == "BOOKMARK":
                            continue
                        self._apply(event["type"], obj)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.status != 410:
                    log.warning("%s: watch failed: %s", self.name, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
                log.warning("%s: watch broken: %r; re-listing in %.1fs", self.name, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _relist(self) -> str:
        listing = await self.client.get(self.path, **self.params)
        fresh = {item["metadata"]["uid"]: item for item in listing.get("items") or []}
        for uid in list(self.objects):
            if uid not in fresh:
                self._apply("DELETED", self.objects[uid])
        for uid, obj in fresh.items():
            old = self.objects.get(uid)
            if old is None:
                self._apply("ADDED", obj)
            elif old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._apply("MODIFIED", obj)
        self.synced.set()
        return listing["metadata"]["resourceVersion"]

    def _apply(self, kind: str, obj: dict) -> None:
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            self.objects.pop(uid, None)
        else:
            self.objects[uid] = obj
        try:
            self.on_event(kind, obj)
        except Exception:  # a bug in one handler must not stop the watch
            log.exception("%s: handler failed for %s %s", self.name, kind, obj["metadata"].get("name"))


# --- reading objects --------------------------------------------------------------------------------


def rfc3339(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def micro_time(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def condition_true(obj: dict | None, ctype: str) -> bool:
    """The object's status carries condition `ctype` with status True."""
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == ctype and c.get("status") == "True" for c in conditions)
