"""The one writer: server-side apply of revision records (ControllerRevisions), new pods, Services and
PrometheusRules (field manager `moe-operator`), label and annotation patches of existing pods (in and
out of rotation, track changes), deletes of what is no longer wanted, merge patches of `.status`, and
Events. Nothing else in the operator writes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes.dynamic.exceptions import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ResourceNotFoundError,
    UnprocessibleEntityError,
)

from .api import names
from .desired import gang
from .desired import rules as prometheus_rule
from .desired.diff import Changes
from .world import revisions


class WriteRefused(Exception):
    """The API server refused an object the operator built from the spec (invalid, or forbidden by
    admission such as Pod Security or a quota): nothing a retry fixes; the user must change something."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class StatusConflict(Exception):
    """The ModelDeployment changed after the status was computed (its resourceVersion moved on: a
    user's edit, an alert's abort annotation, or a second operator): the status was not written."""


def _refusal(error: Exception, what: str) -> WriteRefused:
    try:
        message = json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = str(error)
    reason = "Forbidden" if isinstance(error, ForbiddenError) else "InvalidSpec"
    return WriteRefused(reason, f"{what} was refused: {message}")


_DISCOVERY = threading.Lock()


class Writer:
    def __init__(self, dynamic_client, metrics=None):
        self.dyn = dynamic_client
        self.metrics = metrics
        self._resources = {
            "Pod": dynamic_client.resources.get(api_version="v1", kind="Pod"),
            "Service": dynamic_client.resources.get(api_version="v1", kind="Service"),
            "Event": dynamic_client.resources.get(api_version="v1", kind="Event"),
            revisions.KIND: dynamic_client.resources.get(api_version=revisions.API_VERSION, kind=revisions.KIND),
        }
        self._md = dynamic_client.resources.get(api_version=names.API_VERSION, kind=names.KIND)

    def _resource(self, kind: str):
        optional = {prometheus_rule.KIND: prometheus_rule.API_VERSION, gang.KIND: gang.API_VERSION}
        if kind in optional:   # looked up when first written: only where the CRD / API is served
            with _DISCOVERY:   # the client's discovery cache is not safe to refresh from many threads
                return self.dyn.resources.get(api_version=optional[kind], kind=kind)
        return self._resources[kind]

    def apply(self, body: Mapping[str, Any]) -> None:
        try:
            self.dyn.server_side_apply(
                self._resource(body["kind"]), body=dict(body), namespace=body["metadata"]["namespace"],
                field_manager=names.FIELD_MANAGER, force_conflicts=True,
            )
        except (NotFoundError, ResourceNotFoundError, ForbiddenError) as error:
            if body["kind"] != prometheus_rule.KIND:
                if isinstance(error, ForbiddenError):
                    raise _refusal(error, f"{body['kind']} {body['metadata']['name']}") from error
                raise
            # The PrometheusRule CRD went away (or its RBAC did) since it was observed: the alerts
            # are optional, the next observation renders none.
        except (BadRequestError, UnprocessibleEntityError) as error:
            raise _refusal(error, f"{body['kind']} {body['metadata']['name']}") from error

    def relabel(self, namespace: str, name: str, metadata: Mapping[str, Any]) -> None:
        """Merge-patch the labels (and annotations) of an existing pod: its spec is immutable and was
        built from its own revision's template, so it is never re-applied."""
        try:
            self.dyn.patch(self._resources["Pod"], name=name, namespace=namespace,
                           body={"metadata": dict(metadata)},
                           content_type="application/merge-patch+json", field_manager=names.FIELD_MANAGER)
        except NotFoundError:
            pass   # gone since it was observed (deleted, or collected): the next observation plans without it

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Delete one object, only if it is still the one observed (uid precondition)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}} if uid else None
        try:
            self.dyn.delete(self._resource(kind), name=name, namespace=namespace, body=body)
        except (NotFoundError, ConflictError, ResourceNotFoundError):
            pass   # already gone, or replaced by a newer object of the same name

    def write(self, namespace: str, changes: Changes) -> None:
        # Relabels first: they move traffic (in the plan's order: new groups into rotation before old
        # ones leave; an aborted canary out at once), and no new pod or Service is needed for that.
        for name, metadata in changes.relabels:
            self.relabel(namespace, name, metadata)
            self._count("Pod", "relabel")
        for body in changes.applies:
            self.apply(body)
            self._count(body["kind"], "apply")
        for kind, name, uid in changes.delete:
            self.delete(kind, namespace, name, uid)
            self._count(kind, "delete")

    def _count(self, kind: str, verb: str) -> None:
        if self.metrics is not None:
            self.metrics.writes.labels(kind, verb).inc()

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any],
                     resource_version: str | None = None) -> Mapping[str, Any] | None:
        """Merge-patch `.status` (the status subresource); returns the updated object, or None when
        the ModelDeployment is gone (deleted while it was being reconciled). With `resource_version`
        (the version the status was computed from) the API server refuses the patch if the object
        changed since: StatusConflict, so a stale pass never overwrites a newer one's status."""
        body: dict[str, Any] = {"status": dict(patch)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            result = self.dyn.request(
                "patch",
                self._md.path(name=name, namespace=namespace) + "/status",
                body=body,
                content_type="application/merge-patch+json",
            )
        except NotFoundError:
            return None
        except ConflictError as error:
            raise StatusConflict(f"{namespace}/{name} changed since resourceVersion {resource_version}") from error
        self._count(names.KIND, "status")
        return result.to_dict()

    def read(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The ModelDeployment as stored now (after a status conflict only), or None when gone."""
        try:
            return self.dyn.get(self._md, name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def scale(self, namespace: str, name: str, replicas: int) -> str | None:
        """Set the replica count through the scale subresource, the door `kubectl scale`, HPA and KEDA
        use (field manager `moe-operator-autoscaler`). Where the operator may not write it (RBAC
        without modeldeployments/scale), a merge patch of spec.replicas, the same field. Returns the
        object's new resourceVersion."""
        body = {"spec": {"replicas": int(replicas)}}
        path = self._md.path(name=name, namespace=namespace)
        try:
            result = self.dyn.request("patch", path + "/scale", body=body, content_type="application/merge-patch+json",
                                      field_manager=names.AUTOSCALER_FIELD_MANAGER)
        except ForbiddenError:
            result = self.dyn.request("patch", path, body=body, content_type="application/merge-patch+json",
                                      field_manager=names.AUTOSCALER_FIELD_MANAGER)
        self._count(names.KIND, "scale")
        # The Scale's resourceVersion is the ModelDeployment's: the version this pass now works from.
        return (result.to_dict().get("metadata") or {}).get("resourceVersion")

    def event(self, md: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the ModelDeployment (what `kubectl describe md` shows)."""
        meta = md["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.dyn.create(self._resources["Event"], namespace=meta["namespace"], body={
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": names.API_VERSION, "kind": names.KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": names.FIELD_MANAGER},
            "reportingComponent": names.FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        })
        self._count("Event", "create")
