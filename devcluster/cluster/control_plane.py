"""The devcluster: bring a real control plane up on loopback, report on it, take it down.

`DevCluster` is the Python API behind `python -m devcluster` and the test fixtures. Everything it
starts is recorded in `<state_dir>/state.json` (pid + start time per process), so `down` stops
exactly those processes and nothing else. Layout of the state dir (default `<repo>/.devcluster`):

    kubeconfig            admin kubeconfig (system:masters)
    kubeconfigs/          one per component identity
    pki/                  CA, serving and client certificates, service-account key pair
    etcd/                 etcd's data
    kwok/kwok.yaml        kwok's stages
    node/                 the local node agent's state (pods/<ns>_<name>/resolv.conf among it);
                          services.json: the service proxy's ports
    monitoring/           prometheus.yml, alertmanager.yml, rules/*.yml, data
    gitops/               (`up --gitops`) repos/*.git served by the Git server, the Flux
                          controllers' kubeconfigs and source-controller's artifact storage
    logs/<name>.log       every process's output
    state.json            ports, processes, options of the running cluster
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from devcluster import kubeapi, processes
from devcluster.cluster import build, certs, commands, gitops, kwok, monitoring, versions
from devcluster.cluster.state import DEFAULT_GPU_NODES, ClusterState
from devcluster.files import write_atomic
from devcluster.kubeapi import CONNECTION_ERRORS, ApiClient, ApiError, ClusterAccess, condition_true
from devcluster.loopback import free_port, urlopen
from devcluster.wait import DevClusterError, poll, wait_until

T = TypeVar("T")

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # devcluster/
REPO_ROOT = PACKAGE_DIR.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".devcluster"
STATE_DIR_ENV = "DEVCLUSTER_STATE_DIR"  # overrides DEFAULT_STATE_DIR (e.g. a second cluster)
LOCAL_NODE_NAME = "devcluster-local"
LOCAL_NODE_GPUS = 4
LOCAL_POD_CIDRS = 48  # local pods of a cluster get 127.(100..147).0.0/16, one /16 per state dir
UP_TIMEOUT = 120.0
PROMETHEUS_TOKEN_SECONDS = 30 * 24 * 3600
GITOPS_PROCESSES = ("git-server", "source-controller", "kustomize-controller")

# Stop order: what depends on the API server first (the node agent stops its pods on SIGTERM and
# needs the API to report it), etcd last.
STOP_ORDER = (("kustomize-controller", "source-controller", "git-server"),
              ("prometheus", "alertmanager", "pod-discovery", "proxy", "node"),
              ("kwok", "kube-scheduler", "kube-controller-manager", "dns"),
              ("kube-apiserver",),
              ("etcd",))


def node_ready(node: dict | None) -> bool:
    """Ready=True and no longer tainted not-ready (so the scheduler will place pods on it)."""
    taints = ((node or {}).get("spec") or {}).get("taints") or []
    not_ready_taint = any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints)
    return condition_true(node, "Ready") and not not_ready_taint


def local_pod_cidr(state_dir: Path) -> str:
    """The local node's pod range, a /16 in 127.100.0.0-127.147.255.255 picked by the state dir, so two
    clusters on one machine (the shared one, a test's own) rarely hand out the same pod IP, and pods
    of both, binding the same ports on their own IPs, do not collide."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).digest()
    return f"127.{100 + digest[0] % LOCAL_POD_CIDRS}.0.0/16"


def cluster_dns_candidates(state_dir: Path) -> list[str]:
    """Addresses for the cluster DNS server, in the order `up` tries them: 127.53.N.10, N picked by the
    state dir first (as local_pod_cidr picks the pod range), so two clusters on one machine get two
    servers. 127.53.0.0/16 is outside every pod range (local 127.100-147.x.x, kwok 127.200.x.x) and
    away from 127.0.0.1 and systemd-resolved's 127.0.0.53."""
    first = hashlib.sha256(str(Path(state_dir).resolve()).encode()).digest()[0]
    return [f"127.53.{(first + i) % 256}.10" for i in range(256)]


def dns_port_free(ip: str, port: int = 53) -> bool | None:
    """Whether UDP and TCP `port` are free on ip: True, False (taken), or None when this user may not
    bind a port below 1024 at all (not root)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except PermissionError:
                return None
            except OSError as e:
                if e.errno == errno.EACCES:
                    return None
                return False
    return True


@dataclass
class ComponentStatus:
    name: str
    healthy: bool
    detail: str


def _http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> tuple[bool, str]:
    try:
        with urlopen(url, context=context, timeout=timeout) as response:
            body = response.read(200).decode(errors="replace")
            return 200 <= response.status < 300, body.strip()
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return False, str(getattr(e, "reason", e))


def _insecure_context() -> ssl.SSLContext:
    # kube-controller-manager and kube-scheduler serve with self-signed certs made at start; the
    # health check only asks whether they answer on their loopback port.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class DevCluster:
    """A devcluster rooted at state_dir. Cheap to construct; nothing runs until `up`."""

    state_dir: Path | None = None  # None: $DEVCLUSTER_STATE_DIR, else <repo>/.devcluster
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr), repr=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).resolve()

    # ---- paths and derived values -------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pki(self) -> certs.Pki:
        return certs.Pki(self.state_dir / "pki")

    @property
    def monitoring_dir(self) -> Path:
        return self.state_dir / "monitoring"

    @property
    def rules_dir(self) -> Path:
        """Prometheus loads every *.yml here; call reload_prometheus() after changing them."""
        return self.monitoring_dir / "rules"

    @property
    def targets_dir(self) -> Path:
        """Static scrape targets: [{"targets": ["127.0.0.1:PORT"], "labels": {...}}] in NAME.json."""
        return self.monitoring_dir / "targets"

    @property
    def gitops_dir(self) -> Path:
        return self.state_dir / "gitops"

    @property
    def gitops_repos_dir(self) -> Path:
        """Bare repositories the Git server serves as http://127.0.0.1:PORT/<name>.git."""
        return self.gitops_dir / "repos"

    @property
    def gitops_repo_url(self) -> str | None:
        """The repository Flux syncs into the cluster (its deploy/ folder), when `--gitops` runs."""
        state = self.read_state()
        return gitops.repository_url(state.ports["git-server"]) if state and state.gitops else None

    @property
    def services_file(self) -> Path:
        return self.state_dir / "services.json"

    def read_state(self) -> ClusterState | None:
        try:
            return ClusterState.from_json(json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _write_state(self, state: ClusterState) -> None:
        write_atomic(self.state_file, json.dumps(state.to_json(), indent=2) + "\n")

    @property
    def api_server_url(self) -> str | None:
        state = self.read_state()
        return f"https://127.0.0.1:{state.ports['apiserver']}" if state else None

    @property
    def prometheus_url(self) -> str | None:
        state = self.read_state()
        return f"http://127.0.0.1:{state.ports['prometheus']}" if state and state.monitoring else None

    @property
    def alertmanager_url(self) -> str | None:
        state = self.read_state()
        return f"http://127.0.0.1:{state.ports['alertmanager']}" if state and state.monitoring else None

    def api(self, work: Callable[[ApiClient], Awaitable[T]], state: ClusterState | None = None) -> T:
        """Run `work` with an admin API client (system:masters), in an event loop of its own."""
        state = state or self.read_state()
        if state is None:
            raise DevClusterError(f"no devcluster in {self.state_dir}: run `python -m devcluster up`")
        pki = self.pki
        access = ClusterAccess.from_certificates(f"https://127.0.0.1:{state.ports['apiserver']}", pki.ca_cert,
                                                 pki.client_cert("admin"), pki.client_key("admin"))
        return kubeapi.call(access, work)

    def _apply(self, state: ClusterState, objects: list[dict]) -> None:
        async def apply_each(api: ApiClient) -> None:
            for obj in objects:
                await api.apply(obj)

        self.api(apply_each, state)

    def env(self) -> dict[str, str]:
        """KUBECONFIG, PATH (cluster binaries and this Python's scripts first) and monitoring URLs."""
        path = os.pathsep.join([str(build.bin_dir()), str(Path(sys.executable).parent),
                                os.environ.get("PATH", "")])
        env = {"KUBECONFIG": str(self.kubeconfig), "PATH": path}
        if self.prometheus_url:
            env["PROMETHEUS_URL"] = self.prometheus_url
            env["ALERTMANAGER_URL"] = self.alertmanager_url
        if self.gitops_repo_url:
            env["GITOPS_REPO_URL"] = self.gitops_repo_url
        return env

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; output captured as text."""
        env = dict(os.environ, **self.env())
        result = subprocess.run([str(build.binary_path("kubectl")), *args], env=env, input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise DevClusterError(f"kubectl {' '.join(args)} failed (exit {result.returncode}):\n"
                                  f"{result.stderr.strip()}")
        return result

    # ---- locking --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One up/down at a time per state dir (parallel test runs share it)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---- status ---------------------------------------------------------------------------------

    def status(self) -> list[ComponentStatus]:
        """Health of every recorded component (empty when nothing is recorded)."""
        state = self.read_state()
        if state is None:
            return []
        result = []
        for record in state.processes:
            alive = processes.is_alive(record)
            ok, detail = (self._probe(record.name, state) if alive
                          else (False, f"not running (pid {record.pid}); log {record.log}"))
            result.append(ComponentStatus(record.name, alive and ok, detail if not ok else f"pid {record.pid} {detail}".strip()))
        return result

    def healthy(self) -> bool:
        statuses = self.status()
        return bool(statuses) and all(s.healthy for s in statuses)

    def _healthy_soon(self, state: ClusterState, grace: float = 20.0) -> bool:
        """Healthy now or within `grace` seconds while every process runs: a busy machine can make
        one probe fail, and restarting a shared cluster for that would wipe everyone's objects."""
        healthy = False

        def settled() -> bool:
            nonlocal healthy
            healthy = self.healthy()
            return healthy or not all(processes.is_alive(p) for p in state.processes)

        wait_until(settled, grace, interval=0.5)
        return healthy

    def _probe(self, name: str, state: ClusterState) -> tuple[bool, str]:
        """One health check of a running component: (ok, detail)."""
        ports = state.ports
        if name == "etcd":
            ok, body = _http_ok(f"http://127.0.0.1:{ports['etcd']}/health")
            return ok and '"true"' in body, f"http://127.0.0.1:{ports['etcd']}"
        if name == "kube-apiserver":
            context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
            context.load_cert_chain(str(self.pki.client_cert("admin")), str(self.pki.client_key("admin")))
            ok, body = _http_ok(f"https://127.0.0.1:{ports['apiserver']}/readyz", context)
            return ok, f"https://127.0.0.1:{ports['apiserver']}" if ok else body
        if name in ("kube-controller-manager", "kube-scheduler"):
            port = ports["controller-manager" if name == "kube-controller-manager" else "scheduler"]
            ok, body = _http_ok(f"https://127.0.0.1:{port}/healthz", _insecure_context())
            return ok, "" if ok else body
        if name == "kwok":
            ok, body = _http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz")
            return ok, f"{state.gpu_nodes} simulated GPU nodes" if ok else body
        if name == "node":
            try:
                node = self.api(lambda api: api.get_optional(f"/api/v1/nodes/{LOCAL_NODE_NAME}"), state)
            except (ApiError, *CONNECTION_ERRORS) as e:
                return False, str(e)
            ready = node_ready(node)
            return ready, f"node {LOCAL_NODE_NAME} " + ("Ready" if ready else "not Ready")
        if name == "proxy":
            return True, str(self.services_file)
        if name == "dns":
            from devcluster import dns  # not at import: `python -m devcluster.dns` runs it as __main__

            return dns.query_zone(state.cluster_dns or "")
        if name == "pod-discovery":
            ok, body = _http_ok(f"http://127.0.0.1:{ports[name]}/healthz")
            return ok, "" if ok else body
        if name in ("prometheus", "alertmanager"):
            url = f"http://127.0.0.1:{ports[name]}"
            ok, body = _http_ok(f"{url}/-/ready")
            return ok, url if ok else body
        if name in gitops.CONTROLLERS:
            ok, body = _http_ok(f"http://127.0.0.1:{ports[name + '-health']}/readyz")
            return ok, f"Flux {versions.FLUX_VERSION}" if ok else body
        if name == "git-server":
            ok, body = _http_ok(f"http://127.0.0.1:{ports[name]}/healthz")
            return ok, gitops.repository_url(ports[name]) if ok else body
        return True, ""

    # ---- up -------------------------------------------------------------------------------------

    def up(self, gpu_nodes: int = DEFAULT_GPU_NODES, monitoring_enabled: bool = False,
           alert_webhook: str | None = None, alert_webhook_token_file: str | None = None,
           timeout: float = UP_TIMEOUT, gitops_enabled: bool = False) -> bool:
        """Bring the cluster up, or complete a running one. Returns True when it started the
        control plane, False when one was already running (then it only adds what was asked for:
        monitoring, GitOps, more simulated nodes, a new webhook URL)."""
        if gitops_enabled:
            self._build_flux()  # before the lock: the first build takes minutes
        with self._locked():
            state = self.read_state()
            if state is not None and self._healthy_soon(state):
                self._complete(state, gpu_nodes, monitoring_enabled, alert_webhook, alert_webhook_token_file,
                               timeout)
                if gitops_enabled and not state.gitops:
                    self._start_gitops(state, time.monotonic() + timeout)
                return False
            if state is not None:
                self.log("devcluster: the recorded cluster is not healthy; restarting it")
                self._stop_all(state)
                self.state_file.unlink(missing_ok=True)
            started = time.monotonic()
            state = ClusterState(gpu_nodes=gpu_nodes)
            try:
                self._start(state, monitoring_enabled, alert_webhook, alert_webhook_token_file, timeout)
                if gitops_enabled:
                    self._start_gitops(state, time.monotonic() + timeout)
            except BaseException:
                self._stop_all(state)
                self.state_file.unlink(missing_ok=True)
                raise
            self.log(f"devcluster: up in {time.monotonic() - started:.1f}s "
                     f"(Kubernetes {versions.KUBERNETES_VERSION}, {gpu_nodes} simulated GPU nodes"
                     f"{', monitoring' if monitoring_enabled else ''}{', GitOps (Flux)' if gitops_enabled else ''}); "
                     f"export KUBECONFIG={self.kubeconfig}")
            return True

    def _fresh_state_dir(self) -> None:
        """Remove what a previous cluster left (keeps logs, which are appended to)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for child in self.state_dir.iterdir():
            if child.name in ("logs", ".lock", "users"):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _spawn(self, state: ClusterState, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        record = processes.start(name, argv, self.logs_dir / f"{name}.log", env=env, cwd=self.state_dir)
        state.processes.append(record)
        self._write_state(state)

    def _wait_healthy(self, state: ClusterState, names: tuple[str, ...], deadline: float) -> None:
        pending = list(names)

        def check() -> bool:
            for name in list(pending):
                record = state.process(name)
                if not processes.is_alive(record):
                    raise DevClusterError(f"{name} exited during start-up; last lines of {record.log}:\n"
                                          f"{processes.log_tail(record.log)}")
                if self._probe(name, state)[0]:
                    pending.remove(name)
            return not pending

        def hint() -> str:
            return "".join(f"\n--- {n}: {self._probe(n, state)[1]}; last lines of {state.process(n).log}:\n"
                           f"{processes.log_tail(state.process(n).log)}" for n in pending)

        poll(" and ".join(names) + " to be healthy", check, max(deadline - time.monotonic(), 1.0),
             on_timeout=hint)

    def _start(self, state: ClusterState, monitoring_enabled: bool, alert_webhook: str | None,
               alert_webhook_token_file: str | None, timeout: float) -> None:
        needed = tuple(c for c in versions.COMPONENTS if c.name in ("kubernetes", "etcd", "kwok"))
        if build.missing_components(needed):
            self.log("devcluster: building the cluster binaries first (once; cached in "
                     f"{build.cache_root()})")
            build.ensure_built(needed)
        deadline = time.monotonic() + timeout  # for starting, not building
        self._fresh_state_dir()
        bin_path = build.binary_path
        ports = state.ports
        for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"):
            ports[name] = free_port()
        server = f"https://127.0.0.1:{ports['apiserver']}"

        pki = certs.write_pki(self.state_dir / "pki", commands.SERVICE_CLUSTER_IP)
        certs.write_kubeconfig(self.kubeconfig, server, pki, "admin")
        kubeconfigs = {name: certs.write_kubeconfig(self.state_dir / "kubeconfigs" / f"{name}.kubeconfig",
                                                    server, pki, name)
                       for name in ("controller-manager", "scheduler", "kwok")}

        generated = self.state_dir / "pki"  # where each component keeps the certificates it makes
        self._spawn(state, "etcd", commands.etcd(bin_path("etcd"), self.state_dir / "etcd", ports["etcd"],
                                                 ports["etcd-peer"]))
        self._spawn(state, "kube-apiserver", commands.kube_apiserver(
            bin_path("kube-apiserver"), pki, port=ports["apiserver"], etcd_port=ports["etcd"],
            cert_dir=generated / "apiserver-generated"))
        self._wait_healthy(state, ("etcd", "kube-apiserver"), deadline)
        self._spawn(state, "kube-controller-manager", commands.kube_controller_manager(
            bin_path("kube-controller-manager"), pki, port=ports["controller-manager"],
            kubeconfig=kubeconfigs["controller-manager"],
            cert_dir=generated / "controller-manager-generated"))
        self._spawn(state, "kube-scheduler", commands.kube_scheduler(
            bin_path("kube-scheduler"), port=ports["scheduler"], kubeconfig=kubeconfigs["scheduler"],
            cert_dir=generated / "scheduler-generated"))
        kwok_config = self.state_dir / "kwok" / "kwok.yaml"
        kwok_config.parent.mkdir(parents=True, exist_ok=True)
        kwok_component = next(c for c in versions.COMPONENTS if c.name == "kwok")
        kwok_config.write_text(kwok.kwok_config(build.data_dir(kwok_component) / "stages"))
        self._spawn(state, "kwok", [str(bin_path("kwok")),
                                    *kwok.kwok_args(kubeconfigs["kwok"], kwok_config, ports["kwok"])])

        self._apply(state, kwok.simulated_nodes(state.gpu_nodes))
        self._start_dns(state)
        self._start_node_and_proxy(state)
        if monitoring_enabled:
            self._start_monitoring(state, alert_webhook, alert_webhook_token_file)
        self._wait_healthy(state, tuple(p.name for p in state.processes), deadline)
        self._wait_nodes(state, deadline)
        # ServiceAccount admission rejects pods until the namespace's `default` account exists.
        poll("the default ServiceAccount", lambda: self.api(lambda api: api.get_optional(
            "/api/v1/namespaces/default/serviceaccounts/default"), state) is not None,
            max(deadline - time.monotonic(), 1.0))

    def _start_dns(self, state: ClusterState) -> None:
        """The cluster DNS (devcluster/dns.py) on port 53 of a loopback address of its own, where this
        user may bind port 53 (root); the node agent then points each pod's resolv.conf at it."""
        from devcluster import dns  # not at import: `python -m devcluster.dns` runs it as __main__

        for ip in cluster_dns_candidates(self.state_dir):
            free = dns_port_free(ip, dns.DNS_PORT)
            if free is None:
                self.log("devcluster: WARNING no cluster DNS (binding port 53 needs root): cluster names "
                         "(<svc>.<ns>.svc.cluster.local) do not resolve in pods")
                return
            if free:
                break
        else:
            self.log("devcluster: WARNING no cluster DNS: port 53 is taken on every 127.53.N.10")
            return
        self._spawn(state, "dns", [
            sys.executable, "-m", "devcluster.dns", "--kubeconfig", str(self.kubeconfig), "--listen", ip,
            "--port", str(dns.DNS_PORT), "--cluster-domain", dns.CLUSTER_DOMAIN,
        ], env=dict(os.environ, KUBECONFIG=str(self.kubeconfig)))
        state.cluster_dns = ip
        self._write_state(state)

    def _start_node_and_proxy(self, state: ClusterState) -> None:
        """The local node agent and service proxy (devcluster/node/, proxy.py), where present."""
        here = PACKAGE_DIR
        env = dict(os.environ, PATH=self.env()["PATH"], KUBECONFIG=str(self.kubeconfig))
        if (here / "node" / "__main__.py").exists():
            self._spawn(state, "node", [
                sys.executable, "-m", "devcluster.node", "--kubeconfig", str(self.kubeconfig),
                "--node-name", LOCAL_NODE_NAME, "--state-dir", str(self.state_dir / "node"),
                "--gpus", str(LOCAL_NODE_GPUS), "--pod-cidr", local_pod_cidr(self.state_dir),
                "--api-host", "127.0.0.1", "--api-port", str(state.ports["apiserver"]),
                "--ca-file", str(self.pki.ca_cert),
                *(["--cluster-dns", state.cluster_dns] if state.cluster_dns else []),
            ], env=env)
            state.local_node = True
        else:
            self.log("devcluster: WARNING devcluster/node/ is missing: no local node (pods can only "
                     "run on simulated nodes)")
        if (here / "proxy.py").exists():
            self._spawn(state, "proxy", [
                sys.executable, "-m", "devcluster.proxy", "--kubeconfig", str(self.kubeconfig),
                "--state-file", str(self.services_file),
            ], env=env)
            state.proxy = True
        else:
            self.log("devcluster: WARNING devcluster/proxy.py is missing: no service proxy")
        self._write_state(state)

    def _wait_nodes(self, state: ClusterState, deadline: float) -> None:
        names = [kwok.node_name(i) for i in range(state.gpu_nodes)]
        if state.local_node:
            names.append(LOCAL_NODE_NAME)
        pending = list(names)

        def check() -> bool:
            nodes = self.api(lambda api: api.get("/api/v1/nodes"), state)["items"]
            ready = {node["metadata"]["name"] for node in nodes if node_ready(node)}
            pending[:] = [name for name in pending if name not in ready]
            return not pending

        poll(f"nodes {', '.join(names)} to be Ready", check, max(deadline - time.monotonic(), 1.0),
             interval=0.2, on_timeout=lambda: f" (not Ready: {', '.join(pending)})")

    # ---- monitoring -----------------------------------------------------------------------------

    def _write_alertmanager_config(self, state: ClusterState) -> Path:
        token = Path(state.alert_webhook_token_file).resolve() if state.alert_webhook_token_file else None
        return monitoring.write_yaml(self.monitoring_dir / "alertmanager.yml",
                                     monitoring.alertmanager_config(state.alert_webhook, token))

    def _start_monitoring(self, state: ClusterState, alert_webhook: str | None,
                          alert_webhook_token_file: str | None) -> None:
        monitoring.ensure_installed()

        async def bootstrap(api: ApiClient) -> str:
            for obj in monitoring.rbac_objects():
                await api.apply(obj)
            # The token controller is not needed for a TokenRequest; the ServiceAccount is.
            answer = await api.request_token(monitoring.SERVICE_ACCOUNT_NAMESPACE, monitoring.SERVICE_ACCOUNT,
                                             PROMETHEUS_TOKEN_SECONDS)
            return answer["token"]

        token = self.api(bootstrap, state)
        token_file = self.monitoring_dir / "prometheus.token"
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(token_file, token, 0o600)
        ports = state.ports
        ports["prometheus"] = free_port(monitoring.PROMETHEUS_PORT)
        ports["alertmanager"] = free_port(monitoring.ALERTMANAGER_PORT)
        ports["pod-discovery"] = free_port()
        self._spawn(state, "pod-discovery", monitoring.pod_discovery_args(
            f"https://127.0.0.1:{ports['apiserver']}", self.pki.ca_cert, token_file, ports["pod-discovery"]))
        prometheus_yml = monitoring.write_yaml(self.monitoring_dir / "prometheus.yml", monitoring.prometheus_config(
            discovery_url=f"http://127.0.0.1:{ports['pod-discovery']}/", rules_dir=self.rules_dir,
            targets_dir=self.targets_dir, alertmanager_address=f"127.0.0.1:{ports['alertmanager']}"))
        state.alert_webhook, state.alert_webhook_token_file = alert_webhook, alert_webhook_token_file
        alertmanager_yml = self._write_alertmanager_config(state)
        self._spawn(state, "alertmanager", [monitoring.ALERTMANAGER_BINARY, *monitoring.alertmanager_args(
            alertmanager_yml, self.monitoring_dir / "alertmanager-data", ports["alertmanager"])])
        self._spawn(state, "prometheus", [monitoring.PROMETHEUS_BINARY, *monitoring.prometheus_args(
            prometheus_yml, self.monitoring_dir / "prometheus-data", ports["prometheus"])])
        state.monitoring = True
        self._write_state(state)

    # ---- GitOps (Flux) ---------------------------------------------------------------------------

    def _build_flux(self) -> None:
        if build.missing_components(versions.FLUX_COMPONENTS):
            self.log(f"devcluster: building Flux {versions.FLUX_VERSION} (source-controller, kustomize-controller) "
                     f"first: once, about 13 minutes on 2 cores; cached in {build.cache_root()}")
        build.ensure_built(versions.FLUX_COMPONENTS, quiet=True)

    def _start_gitops(self, state: ClusterState, deadline: float) -> None:
        """Flux's CRDs, its controllers' ServiceAccounts and tokens, the Git server with the
        `devcluster` repository, the two controllers, and the GitRepository + Kustomization that
        sync the repository's deploy/ folder (see gitops.py)."""
        from devcluster import gitserver  # not at import: `-m devcluster.gitserver` runs it as __main__

        self._build_flux()
        crds = sorted(path for component in versions.FLUX_COMPONENTS
                      for path in (build.data_dir(component) / "crds").glob("*.yaml"))
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=devcluster",
                     *(f"--filename={p}" for p in crds))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                     *(f"crd/{p.name.split('_', 1)[1].removesuffix('.yaml')}."
                       f"{p.name.split('_', 1)[0]}" for p in crds))
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=devcluster", "-f", "-",
                     input="\n---\n".join(json.dumps(o) for o in gitops.rbac_objects()))
        server = f"https://127.0.0.1:{state.ports['apiserver']}"
        kubeconfigs = {}
        for name in gitops.CONTROLLERS:
            token = self.api(lambda api, n=name: api.request_token(gitops.NAMESPACE, n, gitops.TOKEN_SECONDS),
                             state)["token"]
            kubeconfigs[name] = write_atomic(
                self.gitops_dir / f"{name}.kubeconfig",
                json.dumps(gitops.token_kubeconfig(server, self.pki.ca_cert,
                                                   f"system:serviceaccount:{gitops.NAMESPACE}:{name}", token)), 0o600)
        gitserver.init_repository(gitops.repository_path(self.gitops_repos_dir, gitops.DEFAULT_REPOSITORY),
                                  gitops.INITIAL_FILES)
        ports = state.ports
        ports["git-server"] = free_port()
        for name in gitops.CONTROLLERS:
            ports[f"{name}-health"], ports[f"{name}-metrics"] = free_port(), free_port()
        ports["source-controller-storage"] = free_port()
        self._spawn(state, "git-server", [sys.executable, "-m", "devcluster.gitserver", "--root",
                                          str(self.gitops_repos_dir), "--port", str(ports["git-server"])])
        storage = self.gitops_dir / "artifacts"
        storage.mkdir(parents=True, exist_ok=True)
        self._spawn(state, "source-controller", gitops.source_controller_args(
            build.binary_path("source-controller"), metrics_port=ports["source-controller-metrics"],
            health_port=ports["source-controller-health"], storage_port=ports["source-controller-storage"],
            storage_path=storage), env=gitops.controller_env(dict(os.environ), kubeconfigs["source-controller"]))
        self._spawn(state, "kustomize-controller", gitops.kustomize_controller_args(
            build.binary_path("kustomize-controller"), metrics_port=ports["kustomize-controller-metrics"],
            health_port=ports["kustomize-controller-health"]),
            env=gitops.controller_env(dict(os.environ), kubeconfigs["kustomize-controller"]))
        state.gitops = True
        self._write_state(state)
        self._wait_healthy(state, GITOPS_PROCESSES, deadline)
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=devcluster", "-f", "-",
                     input="\n---\n".join(json.dumps(o) for o in gitops.repository_objects(
                         gitops.DEFAULT_REPOSITORY, gitops.repository_url(ports["git-server"]))))

    def add_gitops_repository(self, name: str, **options) -> str:
        """A bare repository `<name>.git` (one commit with a README and an empty deploy/) and the
        GitRepository + Kustomization `flux-system/<name>` that sync its deploy/ folder; `options`
        go to gitops.repository_objects (wait, health_check_exprs, ignore, timeout). Returns its URL."""
        from devcluster import gitserver

        state = self.read_state()
        if state is None or not state.gitops:
            raise DevClusterError("GitOps is not running: `python -m devcluster up --gitops`")
        gitserver.init_repository(gitops.repository_path(self.gitops_repos_dir, name), gitops.INITIAL_FILES)
        url = gitops.repository_url(state.ports["git-server"], name)
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=devcluster", "-f", "-",
                     input="\n---\n".join(json.dumps(o) for o in gitops.repository_objects(name, url, **options)))
        return url

    def remove_gitops_repository(self, name: str) -> None:
        """Delete the Kustomization (pruning what it applied), the GitRepository and the repository."""
        for kind in ("kustomizations.kustomize.toolkit.fluxcd.io", "gitrepositories.source.toolkit.fluxcd.io"):
            self.kubectl("delete", kind, name, "-n", gitops.NAMESPACE, "--ignore-not-found", "--wait=true",
                         "--timeout=60s", check=False)
        shutil.rmtree(gitops.repository_path(self.gitops_repos_dir, name), ignore_errors=True)

    def set_alert_webhook(self, url: str | None, token_file: str | None = None) -> None:
        """Point Alertmanager's webhook receiver at url (None: no receiver) and reload it."""
        with self._locked():
            state = self.read_state()
            if state is None or not state.monitoring:
                raise DevClusterError("monitoring is not running: `python -m devcluster up --monitoring`")
            state.alert_webhook, state.alert_webhook_token_file = url, token_file
            self._write_alertmanager_config(state)
            monitoring.reload(self.alertmanager_url)
            self._write_state(state)

    def reload_prometheus(self) -> None:
        """Make Prometheus re-read its configuration and the rule files in rules_dir."""
        if not self.prometheus_url:
            raise DevClusterError("monitoring is not running: `python -m devcluster up --monitoring`")
        monitoring.reload(self.prometheus_url)

    def _complete(self, state: ClusterState, gpu_nodes: int, monitoring_enabled: bool,
                  alert_webhook: str | None, alert_webhook_token_file: str | None, timeout: float) -> None:
        """Add to a healthy running cluster what this `up` asks for and it lacks."""
        deadline = time.monotonic() + timeout
        if state.cluster_dns is None and state.local_node and os.geteuid() == 0:
            self.log("devcluster: WARNING this cluster was started without the cluster DNS, so names such "
                     "as <svc>.<ns>.svc.cluster.local do not resolve in its pods; "
                     "`python -m devcluster down && python -m devcluster up` restarts it with one")
        if gpu_nodes > state.gpu_nodes:
            self._apply(state, kwok.simulated_nodes(gpu_nodes)[state.gpu_nodes:])
            state.gpu_nodes = gpu_nodes
            self._write_state(state)
            self._wait_nodes(state, deadline)
        if monitoring_enabled and not state.monitoring:
            self._start_monitoring(state, alert_webhook, alert_webhook_token_file)
            self._wait_healthy(state, ("pod-discovery", "prometheus", "alertmanager"), deadline)
        elif alert_webhook and state.monitoring and (alert_webhook, alert_webhook_token_file) != (
                state.alert_webhook, state.alert_webhook_token_file):
            state.alert_webhook, state.alert_webhook_token_file = alert_webhook, alert_webhook_token_file
            self._write_alertmanager_config(state)
            monitoring.reload(f"http://127.0.0.1:{state.ports['alertmanager']}")
            self._write_state(state)

    # ---- down -----------------------------------------------------------------------------------

    def _stop_all(self, state: ClusterState) -> list[str]:
        killed = []
        recorded = {p.name: p for p in state.processes}
        node_exited_early = "node" in recorded and not processes.is_alive(recorded["node"])
        for group in STOP_ORDER:
            records = [recorded.pop(n) for n in group if n in recorded]
            killed += processes.stop(records, timeout=15.0 if "node" in group else 10.0)
        killed += processes.stop(list(recorded.values()))  # anything not in STOP_ORDER
        if state.local_node and ("node" in killed or node_exited_early):
            # The agent did not stop its pods itself: its --cleanup kills the ones it recorded.
            subprocess.run([sys.executable, "-m", "devcluster.node", "--cleanup", "--kubeconfig",
                            str(self.kubeconfig), "--state-dir", str(self.state_dir / "node")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)
        return killed

    def update_state(self, **changes) -> None:
        """Change fields of the recorded state (no-op when nothing is recorded)."""
        with self._locked():
            state = self.read_state()
            if state is not None:
                for key, value in changes.items():
                    setattr(state, key, value)
                self._write_state(state)

    def stop_components(self, names: tuple[str, ...]) -> None:
        """Stop some recorded processes (e.g. the monitoring a test session added) and forget them."""
        with self._locked():
            state = self.read_state()
            if state is None:
                return
            processes.stop([p for p in state.processes if p.name in names])
            state.processes = [p for p in state.processes if p.name not in names]
            if "prometheus" in names or "alertmanager" in names:
                state.monitoring = state.monitoring_added_by_test = False
            if set(names) & set(GITOPS_PROCESSES):
                state.gitops = state.gitops_added_by_test = False
            self._write_state(state)

    def down(self) -> bool:
        """Stop every process `up` recorded (SIGTERM, then SIGKILL after a deadline) and forget
        them. Returns False when nothing was recorded."""
        with self._locked():
            state = self.read_state()
            if state is None:
                return False
            killed = self._stop_all(state)
            if killed:
                self.log(f"devcluster: killed (SIGKILL) after the deadline: {', '.join(killed)}")
            self.state_file.unlink(missing_ok=True)
            return True
