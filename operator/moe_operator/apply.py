"""The one writer: server-side apply of desired objects (field manager `moe-operator`), deletes of
what is no longer wanted, and merge patches of `.status`. Nothing else in the operator writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

from . import names
from .desired import Changes


class Writer:
    def __init__(self, dynamic_client):
        self.dyn = dynamic_client
        self._resources = {
            "Pod": dynamic_client.resources.get(api_version="v1", kind="Pod"),
            "Service": dynamic_client.resources.get(api_version="v1", kind="Service"),
        }
        self._md = dynamic_client.resources.get(api_version=names.API_VERSION, kind=names.KIND)

    def apply(self, body: Mapping[str, Any]) -> None:
        self.dyn.server_side_apply(
            self._resources[body["kind"]], body=dict(body), namespace=body["metadata"]["namespace"],
            field_manager=names.FIELD_MANAGER, force_conflicts=True,
        )

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Delete one object, only if it is still the one observed (uid precondition)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}} if uid else None
        try:
            self.dyn.delete(self._resources[kind], name=name, namespace=namespace, body=body)
        except (NotFoundError, ConflictError):
            pass   # already gone, or replaced by a newer object of the same name

    def write(self, namespace: str, changes: Changes) -> None:
        for body in changes.apply:
            self.apply(body)
        for kind, name, uid in changes.delete:
            self.delete(kind, namespace, name, uid)

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        """Merge-patch `.status` (the status subresource); returns the updated object."""
        result = self.dyn.request(
            "patch",
            self._md.path(name=name, namespace=namespace) + "/status",
            body={"status": dict(patch)},
            content_type="application/merge-patch+json",
        )
        return result.to_dict()
