"""The devcluster's service proxy: a local port per Service port, spread over its ready pods.

    python -m devcluster.proxy --kubeconfig K --state-file .devcluster/services.json

kube-proxy's job, for a cluster whose pods all live on loopback addresses (EndpointSlices cannot hold
those, so the endpoint controllers are off and this proxy computes endpoints itself):

- It watches Services and Pods in all namespaces. Every Service with a selector gets, for each TCP
  port, a listener on 127.0.0.1:<free port>, kept for the Service's lifetime (and, when the proxy
  restarts, the port it had before if that is still free).
- A connection goes to the next endpoint round-robin. Endpoints are the pods in the Service's
  namespace whose labels match its selector, whose Ready condition is True, that are not being
  deleted and whose podIP is in 127.0.0.0/8 (nothing else is ever connected to); the port is the
  targetPort, a number or a name looked up in the pod's containerPorts. Endpoints are computed from
  the watch cache when a connection arrives, so readiness changes count as soon as the watch
  delivers them (well under a second).
- Bytes are forwarded as they are (HTTP/1.1, HTTP/2, gRPC, anything over TCP). A refused endpoint is
  skipped for the next one (a simulated kwok pod is "Ready" with no process behind it). When no
  endpoint is ready or none accepts, the client's connection is closed at once (kube-proxy rejects
  such connections), so callers see a fast failure rather than a hang.
- The state file `{"<namespace>/<name>": {"<port name or number>": local_port}}` is rewritten
  atomically whenever a listener is opened or closed; `python -m devcluster services` prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from devcluster.node import ApiClient, ClusterAccess, Informer, is_loopback, write_atomic

log = logging.getLogger("devcluster.proxy")

LISTEN_HOST = "127.0.0.1"
CONNECT_TIMEOUT_SECONDS = 2.0
MAX_CONNECTIONS_PER_PORT = 1024
CHUNK = 64 * 1024


# --- pure: which pods serve a Service port --------------------------------------------------------


def port_key(port: dict) -> str:
    """How the state file names a Service port: its name, else its number."""
    return port.get("name") or str(port["port"])


def selects(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_is_ready(pod: dict) -> bool:
    """Ready condition True, not being deleted, and on a loopback address."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Running") or not is_loopback(status.get("podIP")):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


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


def ready_endpoints(service: dict, service_port: dict, pods: list[dict]) -> list[tuple[str, int]]:
    """(podIP, port) of every ready pod the Service selects, in a stable order (by pod name)."""
    selector = (service.get("spec") or {}).get("selector") or {}
    namespace = service["metadata"].get("namespace")
    endpoints = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if pod["metadata"].get("namespace") != namespace or not selects(selector, pod["metadata"].get("labels")):
            continue
        if not pod_is_ready(pod):
            continue
        port = target_port(service_port, pod)
        if port is not None:
            endpoints.append((pod["status"]["podIP"], port))
    return endpoints


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

    def endpoints(self, listener: PortListener) -> list[tuple[str, int]]:
        service = self.services.get(listener.service_key)
        if service is None:
            return []
        namespace = service["metadata"]["namespace"]
        service_port = proxied_ports(service).get(listener.key, listener.service_port)
        return ready_endpoints(service, service_port, list(self.pods.get(namespace, {}).values()))

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
        if listener.server is not None:
            listener.server.close()
        log.info("%s port %s closed", listener.service_key, listener.key)

    async def _forward(self, listener: PortListener, client_reader: asyncio.StreamReader,
                       client_writer: asyncio.StreamWriter) -> None:
        upstream = None
        try:
            if len(listener.connections) > MAX_CONNECTIONS_PER_PORT:
                return
            endpoints = self.endpoints(listener)
            for _ in range(len(endpoints)):
                ip, port = endpoints[listener.next_index % len(endpoints)]
                listener.next_index += 1
                if not is_loopback(ip):  # never leave the machine
                    continue
                try:
                    upstream = await asyncio.wait_for(asyncio.open_connection(ip, port), CONNECT_TIMEOUT_SECONDS)
                    break
                except (OSError, TimeoutError) as e:
                    log.debug("%s: endpoint %s:%d refused: %s", listener.service_key, ip, port, e)
            if upstream is None:
                log.debug("%s port %s: no ready endpoint", listener.service_key, listener.key)
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
