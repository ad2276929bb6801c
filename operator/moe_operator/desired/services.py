"""Pure builders for the Services of a ModelDeployment.

`<name>` is what clients call: it selects the pods the operator has put in rotation (the
`in-rotation` label, which the operator flips per replica group). `<name>-stable` selects the stable
track, `<name>-canary` / `<name>-preview` the new revision while a rollout runs. Each selects the
group leader (rank 0): one endpoint per replica group, so traffic splits by groups.

A replica group of several pods also gets a headless Service of its own, `<name>-<revision>-<replica>`
(`publishNotReadyAddresses`: its ranks must find each other before any is ready), which gives each
of its pods the DNS name `rank-<r>.<that Service>.<namespace>`: the leader's is where the ranks meet.
"""

from __future__ import annotations

from typing import Any

from ..api import names
from ..api.spec import ModelDeployment
from .pods import common_labels, group_labels, owner_reference


def service_selector(md: ModelDeployment, track: str | None) -> dict[str, str]:
    selector = {names.LABEL_DEPLOYMENT: md.name, names.LABEL_RANK: "0"}
    if track is None:
        selector[names.LABEL_IN_ROTATION] = "true"
    else:
        selector[names.LABEL_TRACK] = track
    return selector


def desired_service(md: ModelDeployment, track: str | None = None) -> dict[str, Any]:
    """The traffic Service (`track=None`) or one track's Service."""
    labels = dict(common_labels(md))
    if track is not None:
        labels[names.LABEL_TRACK] = track
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.service_name(md.name, track),
            "namespace": md.namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": service_selector(md, track),
            "ports": [
                {"name": "http", "port": names.HTTP_PORT, "targetPort": names.HTTP_PORT, "protocol": "TCP"},
                {"name": "grpc", "port": names.GRPC_PORT, "targetPort": names.GRPC_PORT, "protocol": "TCP",
                 "appProtocol": "grpc"},
            ],
        },
    }


def desired_group_service(md: ModelDeployment, revision: str, replica: int) -> dict[str, Any]:
    """The headless Service of one multi-pod replica group (`md` carries the revision's template)."""
    port = names.dist_port(md.name, revision, replica)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.group_service_name(md.name, revision, replica),
            "namespace": md.namespace,
            "labels": {**common_labels(md), names.LABEL_REVISION: revision, names.LABEL_REPLICA: str(replica)},
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": group_labels(md, revision, replica),
            "ports": [{"name": "dist", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def pods_selector(md: ModelDeployment) -> str:
    """`.status.selector` for the scale subresource: one pod per replica group (the rank-0 leader),
    so an HPA's pod count equals the replica count."""
    return names.selector_string({names.LABEL_DEPLOYMENT: md.name, names.LABEL_RANK: "0"})
