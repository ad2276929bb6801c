"""What `<state_dir>/state.json` holds about a running cluster: its ports, the processes `up`
started (so that `down` stops exactly those), and the options it runs with."""

from __future__ import annotations

from dataclasses import dataclass, field

from devcluster.cluster import versions
from devcluster.processes import ProcessRecord

DEFAULT_GPU_NODES = 4


@dataclass
class ClusterState:
    """What state.json holds."""

    ports: dict[str, int] = field(default_factory=dict)
    processes: list[ProcessRecord] = field(default_factory=list)
    gpu_nodes: int = DEFAULT_GPU_NODES
    monitoring: bool = False
    gitops: bool = False  # Flux's controllers and the Git server (`up --gitops`)
    alert_webhook: str | None = None
    alert_webhook_token_file: str | None = None
    local_node: bool = False
    proxy: bool = False
    cluster_dns: str | None = None  # the DNS server's address (port 53), when it runs
    kubernetes_version: str = versions.KUBERNETES_VERSION
    # Set by devcluster.testing: a test session started the cluster / added its monitoring, so the
    # last test session to leave takes it down again.
    started_by_test: bool = False
    monitoring_added_by_test: bool = False
    gitops_added_by_test: bool = False

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["processes"] = [p.to_json() for p in self.processes]
        return data

    @classmethod
    def from_json(cls, data: dict) -> ClusterState:
        data = dict(data)
        data["processes"] = [ProcessRecord.from_json(p) for p in data.get("processes", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def process(self, name: str) -> ProcessRecord | None:
        return next((p for p in self.processes if p.name == name), None)
