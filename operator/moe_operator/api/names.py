"""The contract's names in one place: API group, labels, Service names, ports.

Everything that reads or writes a label or derives a name imports it from here (one source of truth).
"""

from __future__ import annotations

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
LABEL_IN_ROTATION = f"{GROUP}/in-rotation"
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
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"

# The longest Service suffix the operator derives ("-preview") bounds ModelDeployment names:
# a Service name is a DNS-1035 label of at most 63 characters.
SERVICE_SUFFIXES = ("-stable", "-canary", "-preview")
MAX_NAME_LENGTH = 63 - max(len(s) for s in SERVICE_SUFFIXES)  # 55


def service_name(deployment: str, track: str | None = None) -> str:
    """`<name>` for the traffic Service, `<name>-<track>` for a track's own Service."""
    return deployment if track is None else f"{deployment}-{track}"


def owned_selector(deployment: str) -> dict[str, str]:
    """Labels that select every pod of one ModelDeployment (what observe lists by)."""
    return {LABEL_DEPLOYMENT: deployment, LABEL_MANAGED_BY: MANAGED_BY}


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
