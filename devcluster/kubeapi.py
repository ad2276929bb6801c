"""The few API calls `up` makes, over HTTPS with the admin client certificate (no client library).

Bringing the cluster up must not wait on importing a large client, and needs only: read an
object, server-side apply a handful of bootstrap objects, request a token.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from devcluster.loopback import urlopen

FIELD_MANAGER = "devcluster"

# kind -> (API prefix, plural, namespaced) for the kinds `up` applies.
KINDS = {
    "Node": ("/api/v1", "nodes", False),
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
}


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class KubeApi:
    server: str  # https://127.0.0.1:PORT
    ca_file: Path
    cert_file: Path
    key_file: Path

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context

    def request(self, method: str, path: str, body: dict | None = None,
                content_type: str = "application/json", timeout: float = 10.0) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method,
                                         headers={"Content-Type": content_type, "Accept": "application/json"})
        try:
            with urlopen(request, context=self._context(), timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")[:500]) from None
        return json.loads(raw) if raw.strip().startswith(b"{") else {"raw": raw.decode(errors="replace")}

    def get(self, path: str) -> dict | None:
        """The object at path, or None when it does not exist (404)."""
        try:
            return self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def apply(self, obj: dict) -> dict:
        """Server-side apply obj (create or update) with the devcluster's field manager."""
        prefix, plural, namespaced = KINDS[obj["kind"]]
        meta = obj["metadata"]
        ns = f"/namespaces/{meta['namespace']}" if namespaced else ""
        path = f"{prefix}{ns}/{plural}/{meta['name']}?fieldManager={FIELD_MANAGER}&force=true"
        return self.request("PATCH", path, obj, content_type="application/apply-patch+yaml")

    def create_token(self, namespace: str, service_account: str, seconds: int) -> str:
        """A bound token for the service account (TokenRequest API)."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds}}
        result = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token", body)
        return result["status"]["token"]


def node_ready(node: dict | None) -> bool:
    """Ready=True and no longer tainted not-ready (so the scheduler will place pods on it)."""
    if not node:
        return False
    conditions = node.get("status", {}).get("conditions", [])
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    tainted = any(t.get("key") == "node.kubernetes.io/not-ready" for t in node.get("spec", {}).get("taints", []))
    return ready and not tainted
