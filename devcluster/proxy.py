"""The devcluster's service proxy: a local port per Service port, spread over its endpoints as kube-proxy would.

    python -m devcluster.proxy --kubeconfig K --state-file .devcluster/services.json

kube-proxy's job, for a cluster whose pods all live on loopback addresses (EndpointSlices cannot hold
those, so the endpoint controllers are off and this proxy computes endpoints itself):

- It watches Services and Pods in all namespaces. Every Service with a selector gets, for each TCP
  port, a listener on 127.0.0.1:<free port>, kept for the Service's lifetime (and, when the proxy
  restarts, the port it had before if that is still free).
- Endpoints are what the EndpointSlice controller would publish: every pod in the Service's namespace
  whose labels match its selector, that has a pod IP and has not finished (phase Succeeded or Failed),
  with the port its targetPort names (a number, or a name looked up in the pod's containerPorts), and
  the three conditions of an EndpointSlice endpoint: `serving` (the pod's Ready condition is True),
  `terminating` (the pod has a deletionTimestamp) and `ready` (serving and not terminating; always true
  for a Service with `publishNotReadyAddresses`). Only pod IPs in 127.0.0.0/8 are ever connected to.
- Which endpoints take new connections is kube-proxy's choice: the ready ones; when a Service has no
  ready endpoint, those that are serving and terminating (its terminating-endpoint fallback, KEP-1669);
  never one that is neither. Endpoints are computed from the watch cache when a connection arrives, so
  readiness and deletions count as soon as the watch delivers them (well under a second).
- Each connection goes to one endpoint, round-robin (IPVS's default scheduler). It is not retried on
  another: when that endpoint refuses, or there is no endpoint, the client's connection is reset at
  once, as a client of iptables or IPVS kube-proxy sees a refused or reset connection. Established
  connections are left alone when their endpoint stops being ready or goes (kube-proxy keeps their
  conntrack entries); bytes are forwarded as they are (HTTP/1.1, HTTP/2, gRPC, anything over TCP).
- The state file `{"<namespace>/<name>": {"<port name or number>": local_port}}` is rewritten
  atomically whenever a listener is opened or closed; `python -m devcluster services` prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from devcluster import processes
from devcluster.files import write_atomic
from devcluster.kubeapi import ApiClient, ClusterAccess, Informer, condition_true
from devcluster.loopback import is_loopback

log = logging.getLogger("devcluster.proxy")

LISTEN_HOST = "127.0.0.1"
CONNECT_TIMEOUT_SECONDS = 2.0
MAX_CONNECTIONS_PER_PORT = 1024
CHUNK = 64 * 1024
TERMINAL_PHASES = ("Succeeded", "Failed")


# --- pure: a Service port's endpoints, and those that take new connections ------------------------


@dataclass(frozen=True)
class Endpoint:
    """One pod behind a Service port, with the conditions an EndpointSlice endpoint carries."""

    pod: str
    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool


def port_key(port: dict) -> str:
    """How the state file names a Service port: its name, else its number."""
    return port.get("name") or str(port["port"])


def selects(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_is_serving(pod: dict) -> bool:
    """The pod's Ready condition is True (whether or not it is being deleted)."""
    return condition_true(pod, "Ready")


def in_endpoints(pod: dict) -> bool:
    """Whether the pod is an endpoint at all, ready or not: it has a loopback pod IP and has not finished
    (the EndpointSlice controller keeps terminating and unready pods, with their conditions)."""
    status = pod.get("status") or {}
    return status.get("phase") not in TERMINAL_PHASES and is_loopback(status.get("podIP"))


def target_port(service_port: dict, pod: dict) -> int | None:
    """The pod port a Service port forwards to: targetPort as a number, or a named containerPort of
    the pod (None when the pod has no port of that name)."""
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    protocol = service_port.get("protocol", "TCP")
    for container in (pod.get("spec") or {}).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == target and declared.get("protocol", "TCP") == protocol:
                return int(declared["containerPort"])
    return None


def endpoint_conditions(pod: dict, publish_not_ready: bool) -> tuple[bool, bool, bool]:
    """(ready, serving, terminating) of the pod's endpoint, as the EndpointSlice controller sets them
    (its podToEndpoint): ready is never true for a terminating pod, unless the Service publishes
    not-ready addresses."""
    serving = pod_is_serving(pod)
    terminating = bool(pod["metadata"].get("deletionTimestamp"))
    return publish_not_ready or (serving and not terminating), serving, terminating


def endpoint_of(pod: dict, port: int, publish_not_ready: bool) -> Endpoint:
    """The pod as the EndpointSlice controller publishes it."""
    ready, serving, terminating = endpoint_conditions(pod, publish_not_ready)
    return Endpoint(pod=pod["metadata"]["name"], ip=pod["status"]["podIP"], port=port,
                    ready=ready, serving=serving, terminating=terminating)


def service_endpoints(service: dict, service_port: dict, pods: list[dict]) -> list[Endpoint]:
    """Every endpoint of a Service port, ready or not, in a stable order (by pod name)."""
    spec = service.get("spec") or {}
    selector = spec.get("selector") or {}
    namespace = service["metadata"].get("namespace")
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    endpoints = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if pod["metadata"].get("namespace") != namespace or not selects(selector, pod["metadata"].get("labels")):
            continue
        port = target_port(service_port, pod) if in_endpoints(pod) else None
        if port is not None:
            endpoints.append(endpoint_of(pod, port, publish_not_ready))
    return endpoints


def routable(endpoints: list[Endpoint]) -> list[Endpoint]:
    """The endpoints new connections go to, as kube-proxy chooses them: the ready ones; with none ready,
    the serving terminating ones (so a Service whose pods are all being replaced keeps answering)."""
    ready = [e for e in endpoints if e.ready]
    return ready or [e for e in endpoints if e.serving and e.terminating]


def proxied_ports(service: dict) -> dict[str, dict]:
    """The ports this proxy serves for a Service: TCP ports of a Service with a selector."""
    spec = service.get("spec") or {}
    if not spec.get("selector") or spec.get("type") == "ExternalName":
        return {}
    return {port_key(p): p for p in spec.get("ports") or [] if p.get("protocol", "TCP") == "TCP"}


# --- I/O: listeners and forwarding ----------------------------------------------------------------


@dataclass
class PortListener:
    """One Service port's local listener; its `port` never changes while the Service exists."""

    service_key: str
    key: str
    service_port: dict
    server: asyncio.base_events.Server | None = None
    port: int = 0
    next_index: int = 0
    connections: set[asyncio.Task] = field(default_factory=set)

    def pick(self, endpoints: list[Endpoint]) -> Endpoint | None:
        """The next endpoint, round-robin; None when there is none."""
        if not endpoints:
            return None
        chosen = endpoints[self.next_index % len(endpoints)]
        self.next_index += 1
        return chosen


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()  # half-close: the other direction may still be talking
    except (ConnectionError, OSError):
        with contextlib.suppress(Exception):
            writer.transport.abort()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes the client's connection with a TCP reset (SO_LINGER 0): what a client of kube-proxy sees
    when its endpoint refuses, and as near as a proxy that has already accepted can come to a refusal."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ServiceProxy:
    def __init__(self, state_file: Path, remembered: dict[str, dict[str, int]] | None = None):
        self.state_file = state_file
        self.remembered = remembered or {}
        self.services: dict[str, dict] = {}       # "ns/name" -> Service
        self.pods: dict[str, dict[str, dict]] = {}  # namespace -> uid -> Pod
        self.listeners: dict[str, dict[str, PortListener]] = {}
        self._changes = asyncio.Event()
        self._written: dict | None = None

    # Watch handlers: they only record; `sync()` opens and closes listeners.
    def on_service(self, kind: str, service: dict) -> None:
        key = f"{service['metadata']['namespace']}/{service['metadata']['name']}"
        if kind == "DELETED":
            if self.services.get(key, {}).get("metadata", {}).get("uid") == service["metadata"]["uid"]:
                del self.services[key]
        else:
            self.services[key] = service
        self._changes.set()

    def on_pod(self, kind: str, pod: dict) -> None:
        namespace = pod["metadata"].get("namespace", "default")
        pods = self.pods.setdefault(namespace, {})
        if kind == "DELETED":
            pods.pop(pod["metadata"]["uid"], None)
        else:
            pods[pod["metadata"]["uid"]] = pod

    def endpoints(self, listener: PortListener) -> list[Endpoint]:
        """Every endpoint of the listener's Service port now (ready or not)."""
        service = self.services.get(listener.service_key)
        if service is None:
            return []
        namespace = service["metadata"]["namespace"]
        service_port = proxied_ports(service).get(listener.key, listener.service_port)
        return service_endpoints(service, service_port, list(self.pods.get(namespace, {}).values()))

    async def run_sync(self) -> None:
        while True:
            await self._changes.wait()
            self._changes.clear()
            await self.sync()

    async def sync(self) -> None:
        """Opens listeners for new Service ports, closes those of vanished ones, writes the state."""
        for service_key in list(self.listeners):
            wanted = proxied_ports(self.services[service_key]) if service_key in self.services else {}
            for key in list(self.listeners[service_key]):
                if key not in wanted:
                    await self._close(self.listeners[service_key].pop(key))
            if not self.listeners[service_key]:
                del self.listeners[service_key]
        for service_key, service in list(self.services.items()):
            for key, service_port in proxied_ports(service).items():
                existing = self.listeners.setdefault(service_key, {}).get(key)
                if existing is not None:
                    existing.service_port = service_port
                    continue
                listener = PortListener(service_key, key, service_port)
                try:
                    await self._open(listener)
                except OSError as e:
                    log.error("%s port %s: cannot listen: %s", service_key, key, e)
                    continue
                self.listeners[service_key][key] = listener
            if not self.listeners.get(service_key):
                self.listeners.pop(service_key, None)
        self.write_state()

    def state(self) -> dict[str, dict[str, int]]:
        return {service_key: {key: listener.port for key, listener in sorted(ports.items())}
                for service_key, ports in sorted(self.listeners.items())}

    def write_state(self) -> None:
        state = self.state()
        if state != self._written:
            write_atomic(self.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")
            self._written = state

    async def _open(self, listener: PortListener) -> None:
        async def handle(reader, writer):
            task = asyncio.current_task()
            listener.connections.add(task)
            try:
                await self._forward(listener, reader, writer)
            except asyncio.CancelledError:
                pass  # the proxy is stopping (Python 3.11's stream callback would log a cancelled task)
            finally:
                listener.connections.discard(task)

        preferred = self.remembered.get(listener.service_key, {}).get(listener.key, 0)
        try:
            server = await asyncio.start_server(handle, LISTEN_HOST, preferred, reuse_address=True)
        except OSError:
            if not preferred:
                raise
            server = await asyncio.start_server(handle, LISTEN_HOST, 0, reuse_address=True)
        listener.server = server
        listener.port = server.sockets[0].getsockname()[1]
        log.info("%s port %s -> 127.0.0.1:%d", listener.service_key, listener.key, listener.port)

    async def _close(self, listener: PortListener) -> None:
        # Only the listening socket: established connections go on (kube-proxy keeps conntrack entries).
        if listener.server is not None:
            listener.server.close()
        log.info("%s port %s closed", listener.service_key, listener.key)

    async def _connect(self, listener: PortListener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """One endpoint for a new connection, connected; None (nothing tried after it) when there is none
        or it does not accept."""
        endpoint = listener.pick(routable(self.endpoints(listener)))
        if endpoint is None:
            log.debug("%s port %s: no endpoint", listener.service_key, listener.key)
            return None
        if not is_loopback(endpoint.ip):  # never leave the machine
            return None
        try:
            return await asyncio.wait_for(asyncio.open_connection(endpoint.ip, endpoint.port),
                                          CONNECT_TIMEOUT_SECONDS)
        except (OSError, TimeoutError) as e:
            log.debug("%s port %s: endpoint %s (%s:%d) did not accept: %s", listener.service_key, listener.key,
                      endpoint.pod, endpoint.ip, endpoint.port, e)
            return None

    async def _forward(self, listener: PortListener, client_reader: asyncio.StreamReader,
                       client_writer: asyncio.StreamWriter) -> None:
        upstream = None
        try:
            if len(listener.connections) > MAX_CONNECTIONS_PER_PORT:
                _reset(client_writer)
                return
            upstream = await self._connect(listener)
            if upstream is None:
                _reset(client_writer)
                return
            upstream_reader, upstream_writer = upstream
            await asyncio.gather(_pump(client_reader, upstream_writer), _pump(upstream_reader, client_writer))
        finally:
            for writer in (client_writer, upstream[1] if upstream else None):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()

    async def close(self) -> None:
        for ports in self.listeners.values():
            for listener in ports.values():
                await self._close(listener)
                for task in list(listener.connections):
                    task.cancel()


def read_state(path: Path) -> dict[str, dict[str, int]]:
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


async def amain(args: argparse.Namespace) -> int:
    state_file = Path(args.state_file).resolve()
    access = ClusterAccess.from_kubeconfig(args.kubeconfig, state_file.parent / "proxy-credentials")
    client = ApiClient(access, user_agent="devcluster-proxy")
    proxy = ServiceProxy(state_file, remembered=read_state(state_file))
    stop = processes.stop_event()
    pods = Informer(client, "/api/v1/pods", proxy.on_pod, name="pods")
    services = Informer(client, "/api/v1/services", proxy.on_service, name="services")
    tasks = [asyncio.create_task(t) for t in (pods.run(), services.run(), proxy.run_sync())]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await proxy.close()
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-file", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
