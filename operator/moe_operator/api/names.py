"""The contract's names in one place: API group, labels, Service names, ports.

Everything that reads or writes a label or derives a name imports it from here (one source of truth).
"""

from __future__ import annotations

import hashlib

GROUP = "serving.moe.dev"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"
KIND = "ModelDeployment"
API_VERSION = f"{GROUP}/{VERSION}"

FIELD_MANAGER = "moe-operator"
RULE_API_VERSION = "monitoring.coreos.com/v1"   # prometheus-operator's PrometheusRule, where its CRD exists
RULE_KIND = "PrometheusRule"
AUTOSCALER_FIELD_MANAGER = "moe-operator-autoscaler"   # spec.replicas, through the scale subresource
PREFIX = GROUP  # annotations, finalizer and kopf bookkeeping live under this prefix

# Pod labels (the contract's, plus the one the operator flips to put a group in or out of rotation).
LABEL_DEPLOYMENT = f"{GROUP}/deployment"
LABEL_REVISION = f"{GROUP}/revision"
LABEL_TRACK = f"{GROUP}/track"
LABEL_REPLICA = f"{GROUP}/replica"
LABEL_RANK = f"{GROUP}/rank"
GANG_GATE = f"{GROUP}/gang"   # scheduling gate of a group waiting for room (app/gates.py)
LABEL_IN_ROTATION = f"{GROUP}/in-rotation"
LABEL_GROUP = f"{GROUP}/group"   # pods of a multi-pod replica group: the group's Service name
# When the operator took a pod out of rotation (RFC 3339, its own clock): deleted after the drain.
ANNOTATION_OUT_OF_ROTATION = f"{GROUP}/out-of-rotation-since"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
APP_NAME = "moe-model-server"
MANAGED_BY = "moe-operator"

TRACK_STABLE = "stable"
TRACK_CANARY = "canary"
TRACK_PREVIEW = "preview"
TRACKS = (TRACK_STABLE, TRACK_CANARY, TRACK_PREVIEW)

HTTP_PORT = 8000
GRPC_PORT = 8001
DIST_PORT_BASE, DIST_PORT_SPAN = 20000, 10000   # a replica group's rendezvous port: see dist_port()
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"

# The longest Service suffix the operator derives ("-preview") bounds ModelDeployment names:
# a Service name is a DNS-1035 label of at most 63 characters.
SERVICE_SUFFIXES = ("-stable", "-canary", "-preview")
MAX_NAME_LENGTH = 63 - max(len(s) for s in SERVICE_SUFFIXES)  # 55


def dns_label(*parts: object) -> str:
    """`parts` joined by `-`, as one DNS label (at most 63 characters): a long first part is cut
    and a hash of it keeps the label unique."""
    label = "-".join(str(p) for p in parts)
    if len(label) <= 63:
        return label
    first, rest = str(parts[0]), "-".join(str(p) for p in parts[1:])
    digest = hashlib.sha256(first.encode()).hexdigest()[:6]
    keep = 63 - len(rest) - len(digest) - 2
    return f"{first[:keep].rstrip('-')}-{digest}-{rest}"


def group_service_name(deployment: str, revision: str, replica: int) -> str:
    """The headless Service of one replica group (its pods' subdomain): `<name>-<revision>-<replica>`."""
    return dns_label(deployment, revision, replica)


def rank_hostname(rank: int) -> str:
    """A group pod's hostname within its group's subdomain (stable across re-creations)."""
    return f"rank-{rank}"


def dist_port(deployment: str, revision: str, replica: int) -> int:
    """The port rank 0 of a group listens on for its ranks to meet (torch.distributed's store). One
    per group, from a hash: pods sharing one network stack (the devcluster's local node, pods with
    hostNetwork) never collide, and in a cluster any port is as good as 29500."""
    digest = hashlib.sha256(f"{deployment}/{revision}/{replica}".encode()).digest()
    return DIST_PORT_BASE + int.from_bytes(digest[:4], "big") % DIST_PORT_SPAN


def service_name(deployment: str, track: str | None = None) -> str:
    """`<name>` for the traffic Service, `<name>-<track>` for a track's own Service."""
    return deployment if track is None else f"{deployment}-{track}"


def owned_selector(deployment: str) -> dict[str, str]:
    """Labels that select every pod of one ModelDeployment (what observe lists by)."""
    return {LABEL_DEPLOYMENT: deployment, LABEL_MANAGED_BY: MANAGED_BY}


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
