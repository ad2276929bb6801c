"""Pure builder of a replica group's PodGroup: Kubernetes' own gang scheduling (KEP-4671).

Where the cluster serves `scheduling.k8s.io/v1alpha2` (the GenericWorkload and GangScheduling
feature gates, alpha in 1.35-1.36), every multi-pod replica group gets a PodGroup named like its
headless Service, with a gang policy of all its pods (`minCount` = pods per replica), and each of its
pods names it in `spec.schedulingGroup.podGroupName`. The scheduler then binds the group's pods all
together or none: a group that does not fit holds no GPU, and two deployments that each fit alone
cannot deadlock each other half-scheduled. `topology.groupDomain` becomes the PodGroup's topology
constraint as well (the scheduler's topology-aware workload scheduling), beside the pods' affinity.

Where the API is not served, pods are created without a scheduling group (docs/operator.md says how
Kueue or Volcano gang-schedule them instead).
"""

from __future__ import annotations

from typing import Any

from ..api import names
from ..api.spec import ModelDeployment
from .pods import common_labels, owner_reference

API_VERSION = "scheduling.k8s.io/v1alpha2"
KIND = "PodGroup"
PLURAL = "podgroups"


def desired_pod_group(md: ModelDeployment, revision: str, replica: int) -> dict[str, Any]:
    """The PodGroup of one multi-pod replica group (`md` carries the revision's template)."""
    spec: dict[str, Any] = {"schedulingPolicy": {"gang": {"minCount": md.pods_per_replica}}}
    if md.group_domain:
        spec["schedulingConstraints"] = {"topology": [{"key": md.group_domain}]}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": pod_group_name(md, revision, replica),
            "namespace": md.namespace,
            "labels": {**common_labels(md), names.LABEL_REVISION: revision, names.LABEL_REPLICA: str(replica)},
            "ownerReferences": [owner_reference(md)],
        },
        "spec": spec,
    }


def pod_group_name(md: ModelDeployment, revision: str, replica: int) -> str:
    return names.group_service_name(md.name, revision, replica)
