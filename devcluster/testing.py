"""What test fixtures (tests/cluster, tests/e2e) use: a running devcluster as one handle.

    with running_cluster(monitoring=True) as cluster:
        cluster.kubectl("get", "nodes")

`running_cluster` brings the cluster up unless one is already running; the last test session to
leave stops what test sessions started (all of it, or just the monitoring they added), so several
people's sessions can share one cluster. DEVCLUSTER_KEEP=1 leaves it running for the next run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from devcluster import processes
from devcluster.cluster.control_plane import GITOPS_PROCESSES, DevCluster
from devcluster.loopback import urlopen
from devcluster.wait import poll


@dataclass
class RunningCluster:
    """A devcluster that is up: where its files are and how to talk to it."""

    devcluster: DevCluster
    kubeconfig: Path
    env: dict[str, str]  # KUBECONFIG, PATH with the cluster binaries (+ PROMETHEUS_URL, ALERTMANAGER_URL)
    state_dir: Path
    api_server_url: str
    prometheus_url: str | None
    alertmanager_url: str | None
    gitops_repo_url: str | None = None  # with `gitops=True`: the repository Flux syncs (deploy/)

    @classmethod
    def of(cls, devcluster: DevCluster) -> RunningCluster:
        return cls(devcluster, devcluster.kubeconfig, devcluster.env(), devcluster.state_dir,
                   devcluster.api_server_url, devcluster.prometheus_url, devcluster.alertmanager_url,
                   devcluster.gitops_repo_url)

    @property
    def rules_dir(self) -> Path:
        return self.devcluster.rules_dir

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60.0) -> subprocess.CompletedProcess:
        """kubectl against this cluster (text output captured); raises on failure when check."""
        return self.devcluster.kubectl(*args, check=check, input=input, timeout=timeout)

    def apply(self, *objects: dict) -> None:
        """kubectl apply the objects (server-side)."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     input=yaml.safe_dump_all(objects))

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def set_alert_webhook(self, url: str | None, token_file: str | None = None) -> None:
        self.devcluster.set_alert_webhook(url, token_file)

    def add_rules(self, name: str, groups: list[dict], timeout: float = 20.0) -> Path:
        """Write rules_dir/<name>.yml ({"groups": groups}), reload Prometheus, wait until loaded."""
        path = self.rules_dir / f"{name}.yml"
        path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        self.devcluster.reload_prometheus()
        wanted = {g["name"] for g in groups}
        poll(f"Prometheus to load rule groups {sorted(wanted)}",
             lambda: wanted <= {g["name"] for g in self.prometheus_api("rules")["groups"]}, timeout, 0.2)
        return path

    def remove_rules(self, name: str) -> None:
        (self.rules_dir / f"{name}.yml").unlink(missing_ok=True)
        self.devcluster.reload_prometheus()

    def prometheus_api(self, endpoint: str, **params: str) -> dict:
        """GET /api/v1/<endpoint> from Prometheus; returns its `data`."""
        query = urllib.parse.urlencode(params)
        url = f"{self.prometheus_url}/api/v1/{endpoint}" + (f"?{query}" if query else "")
        with urlopen(url, timeout=10) as response:
            return json.loads(response.read())["data"]


MONITORING_PROCESSES = ("prometheus", "alertmanager", "pod-discovery")


def _register_user(devcluster: DevCluster) -> Path:
    """Mark one use of the cluster (test sessions of several people may share it, and one session
    may hold it several times at once: a session fixture and a module's own fixture)."""
    users = devcluster.state_dir / "users"
    users.mkdir(parents=True, exist_ok=True)
    me = users / f"{os.getpid()}-{processes.proc_start_time(os.getpid())}-{uuid.uuid4().hex[:8]}"
    me.touch()
    return me


def _other_live_users(devcluster: DevCluster, me: Path) -> list[str]:
    others = []
    for entry in (devcluster.state_dir / "users").glob("*-*"):
        pid, _, rest = entry.name.partition("-")
        start = rest.split("-", 1)[0]
        alive = start.isdigit() and processes.is_alive(
            processes.ProcessRecord("user", int(pid), int(start), [], ""))
        if entry != me and alive:
            others.append(entry.name)
        elif not alive:
            entry.unlink(missing_ok=True)
    return others


@contextmanager
def running_cluster(*, monitoring: bool = True, gpu_nodes: int = 4, gitops: bool = False,
                    state_dir: Path | None = None) -> Iterator[RunningCluster]:
    """Yield a RunningCluster, bringing it up if needed (`gitops`: with Flux, built the first time).
    On exit, the last test session using the cluster stops what test sessions started (all of it, or
    the monitoring or GitOps they added); a cluster started with `python -m devcluster up` is left
    running. DEVCLUSTER_KEEP=1 leaves everything."""
    devcluster = DevCluster(state_dir)
    me = _register_user(devcluster)
    try:
        state = devcluster.read_state()
        healthy = bool(state and devcluster.healthy())
        had_monitoring = bool(state and state.monitoring and healthy)
        had_gitops = bool(state and state.gitops and healthy)
        started_at = time.monotonic()
        started = devcluster.up(gpu_nodes=gpu_nodes, monitoring_enabled=monitoring, gitops_enabled=gitops)
        devcluster.log(f"devcluster: {'started' if started else 'reused'} in {time.monotonic() - started_at:.1f}s")
        if started:
            devcluster.update_state(started_by_test=True)
        else:
            if monitoring and not had_monitoring:
                devcluster.update_state(monitoring_added_by_test=True)
            if gitops and not had_gitops:
                devcluster.update_state(gitops_added_by_test=True)
        yield RunningCluster.of(devcluster)
    finally:
        me.unlink(missing_ok=True)
        state = devcluster.read_state()
        if os.environ.get("DEVCLUSTER_KEEP") == "1" or state is None or _other_live_users(devcluster, me):
            pass
        elif state.started_by_test:
            devcluster.down()
        else:
            if state.monitoring_added_by_test:
                devcluster.stop_components(MONITORING_PROCESSES)
            if state.gitops_added_by_test:
                devcluster.stop_components(GITOPS_PROCESSES)
