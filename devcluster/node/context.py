"""What every pod worker of the node shares: the node's settings, its pod addresses, its process
table, API access and event recorder."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
from pathlib import Path

import aiohttp

from devcluster import processes
from devcluster.dns import CLUSTER_DOMAIN
from devcluster.files import write_atomic
from devcluster.kubeapi import ApiClient
from devcluster.node.status import EventRecorder

log = logging.getLogger("devcluster.node")

BACKOFF_BASE_SECONDS = 10.0  # the first crash-loop back-off; it doubles up to containers.BACKOFF_MAX_SECONDS


@dataclasses.dataclass
class NodeConfig:
    node_name: str
    state_dir: Path
    gpus: int
    pod_cidr: str
    api_host: str
    api_port: int
    ca_file: str
    host_ip: str = "127.0.0.1"
    cluster_dns: str | None = None  # the cluster DNS server's address (the kubelet's --cluster-dns)
    cluster_domain: str = CLUSTER_DOMAIN
    backoff_base: float = BACKOFF_BASE_SECONDS
    shutdown_grace: float = 10.0

    def pod_dir(self, namespace: str, name: str) -> Path:
        """Where a pod's logs, volumes and service-account files are."""
        return self.state_dir / "pods" / f"{namespace}_{name}"


class IpAllocator:
    """Hands out pod IPs from a CIDR round-robin, so a freed address is not reused soon, and never
    an address that is still held."""

    def __init__(self, cidr: str):
        self.network = ipaddress.ip_network(cidr)
        self.size = self.network.num_addresses
        self.held: dict[str, str] = {}  # ip -> owner (pod uid)
        self._next = 2  # skip .0 (network) and .1

    def hold(self, ip: str, owner: str) -> bool:
        """Records an address a pod already has; False if it is outside the CIDR or taken."""
        if ip in self.held and self.held[ip] != owner:
            return False
        if ipaddress.ip_address(ip) not in self.network:
            return False
        self.held[ip] = owner
        return True

    def allocate(self, owner: str) -> str:
        for ip, held_by in self.held.items():
            if held_by == owner:
                return ip
        for _ in range(self.size):
            offset, self._next = self._next, self._next + 1
            if self._next >= self.size - 1:
                self._next = 1
            ip = str(self.network.network_address + offset)
            if offset in (0, self.size - 1) or ip in self.held:
                continue
            self.held[ip] = owner
            return ip
        raise RuntimeError(f"pod CIDR {self.network} is exhausted")

    def release(self, owner: str) -> None:
        for ip in [ip for ip, held_by in self.held.items() if held_by == owner]:
            del self.held[ip]


class ProcessTable:
    """The pids this agent started, kept in a file so a later run (or --cleanup) can kill the ones a
    crashed agent left behind."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}

    def add(self, pid: int, pod: str, container: str) -> None:
        self.entries[str(pid)] = {"start": processes.proc_start_time(pid), "pod": pod, "container": container}
        self._save()

    def remove(self, pid: int) -> None:
        if self.entries.pop(str(pid), None) is not None:
            self._save()

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.entries))

    def kill_leftovers(self, grace: float = 3.0) -> int:
        """Kills the process groups recorded by an earlier run that are still alive; returns how many."""
        try:
            recorded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            recorded = {}
        leftovers = [processes.ProcessRecord(entry.get("pod", ""), int(pid), entry["start"], [], "")
                     for pid, entry in recorded.items() if entry.get("start") is not None]
        for record in filter(processes.is_alive, leftovers):
            log.info("killing leftover process group %s (%s)", record.pid, record.name)
        processes.stop(leftovers, timeout=grace, group=True)
        self.entries = {}
        self._save()
        return len(recorded)


@dataclasses.dataclass
class NodeContext:
    """The node's shared pieces, as the agent made them."""

    config: NodeConfig
    client: ApiClient
    ips: IpAllocator
    processes: ProcessTable
    allocatable: dict[str, str]
    base_env: dict[str, str]  # what every pod process inherits (env.base_environment)
    setpriv_prefix: list[str]  # argv prefix that makes a pod process die with the agent, if available
    events: EventRecorder
    # Pod processes can get their own mount namespace (resolv.py): needs root and util-linux.
    mount_namespaces: bool = False
    http: aiohttp.ClientSession | None = None  # for probes; made once the event loop runs
