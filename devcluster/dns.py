"""The devcluster's cluster DNS: the names Kubernetes' DNS gives pods and headless Services, answered
with the pods' loopback IPs.

    python -m devcluster.dns --kubeconfig K --listen 127.53.N.10 [--port 53] [--cluster-domain cluster.local]

Why not CoreDNS: its kubernetes plugin reads EndpointSlices, which cannot hold loopback addresses, so
the endpoint controllers are off here and CoreDNS could not answer a headless Service or a pod's
hostname (docs/devcluster-node.md, docs/decisions.md). Like the service proxy (proxy.py) stands in for
kube-proxy, this server computes what the EndpointSlice controller would publish, from Pods and
Services it watches through the API (one client), and answers as CoreDNS answers from that:

- `<service>.<ns>.svc.<domain>`, a headless Service (`clusterIP: None`) with a selector: A records of
  its ready endpoints (every pod its selector matches that has a loopback pod IP and has not
  finished; ready means Ready and not terminating, or anything at all with
  `publishNotReadyAddresses: true`, the EndpointSlice controller's rule, proxy.endpoint_conditions).
- `<hostname>.<service>.<ns>.svc.<domain>`: such an endpoint whose pod has `spec.hostname` and
  `spec.subdomain: <service>` (the EndpointSlice controller gives only those a hostname), or, for an
  endpoint without one, its IP with dashes (`127-100-0-5.<service>.<ns>.svc.<domain>`), as CoreDNS.
- `<a-b-c-d>.<ns>.pod.<domain>`: the address itself (CoreDNS's `pods insecure`, kubeadm's default),
  for loopback addresses only.

A name with no address is NXDOMAIN (so is a headless Service with no ready endpoint, as in CoreDNS); a
name that has addresses answers other query types (AAAA, ...) with no data. ClusterIP Services do not
resolve: their ClusterIP is not on loopback and nothing here may connect to one (the service proxy's
ports are `python -m devcluster services`). Nothing outside `<domain>` is ever answered: never
forwarded, never looked up upstream, NXDOMAIN. Only 127.0.0.0/8 addresses are ever put in an answer.
UDP (answers larger than the client's buffer are truncated, so it retries over TCP) and TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, SOA, A, DNSError, DNSRecord

from devcluster import processes
from devcluster.kubeapi import ApiClient, ClusterAccess, Informer
from devcluster.loopback import is_loopback
from devcluster.proxy import endpoint_conditions, in_endpoints, selects

log = logging.getLogger("devcluster.dns")

CLUSTER_DOMAIN = "cluster.local"
DNS_PORT = 53
TTL_SECONDS = 5  # CoreDNS's kubernetes plugin default: readiness changes show within seconds
UDP_PAYLOAD = 512  # without EDNS(0)
TCP_IDLE_SECONDS = 10.0
MAX_TCP_CONNECTIONS = 256


# --- pure: which addresses a name has --------------------------------------------------------------


def dashed_ip(label: str) -> str | None:
    """`127-100-0-5` -> "127.100.0.5"; None for anything that is not an IPv4 address with dashes."""
    parts = label.split("-")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    try:
        return str(ipaddress.IPv4Address(".".join(parts)))
    except ValueError:
        return None


def is_headless(service: dict) -> bool:
    return (service.get("spec") or {}).get("clusterIP") == "None"


@dataclass(frozen=True)
class DnsEndpoint:
    """An endpoint of a headless Service, as DNS sees it."""

    ip: str
    hostname: str | None  # set only for a pod with spec.hostname and spec.subdomain == the Service
    ready: bool


def dns_endpoints(service: dict, pods: list[dict]) -> list[DnsEndpoint]:
    """Every endpoint of a Service, ready or not (by pod name, for stable answers)."""
    spec = service.get("spec") or {}
    meta = service["metadata"]
    selector = spec.get("selector") or {}
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    endpoints = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if (pod["metadata"].get("namespace") != meta.get("namespace") or not in_endpoints(pod)
                or not selects(selector, pod["metadata"].get("labels"))):
            continue
        pod_spec = pod.get("spec") or {}
        hostname = pod_spec.get("hostname") if pod_spec.get("subdomain") == meta["name"] else None
        ready, _, _ = endpoint_conditions(pod, publish_not_ready)
        endpoints.append(DnsEndpoint(ip=pod["status"]["podIP"], hostname=hostname or None, ready=ready))
    return endpoints


def endpoint_name(endpoint: DnsEndpoint) -> str:
    """The first label of an endpoint's own name: its hostname, else its IP with dashes (CoreDNS)."""
    return endpoint.hostname or endpoint.ip.replace(".", "-")


@dataclass
class ClusterRecords:
    """What the server knows: Services and Pods from the watch, and the cluster domain."""

    domain: str = CLUSTER_DOMAIN
    services: dict[str, dict] = field(default_factory=dict)       # "ns/name" -> Service
    pods: dict[str, dict[str, dict]] = field(default_factory=dict)  # namespace -> uid -> Pod

    # Watch handlers (kubeapi.Informer's on_event).
    def on_service(self, kind: str, service: dict) -> None:
        key = f"{service['metadata'].get('namespace', 'default')}/{service['metadata']['name']}"
        if kind == "DELETED":
            if self.services.get(key, {}).get("metadata", {}).get("uid") == service["metadata"].get("uid"):
                del self.services[key]
        else:
            self.services[key] = service

    def on_pod(self, kind: str, pod: dict) -> None:
        pods = self.pods.setdefault(pod["metadata"].get("namespace", "default"), {})
        if kind == "DELETED":
            pods.pop(pod["metadata"]["uid"], None)
        else:
            pods[pod["metadata"]["uid"]] = pod

    def in_zone(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        return name == self.domain or name.endswith("." + self.domain)

    def addresses(self, name: str) -> list[str]:
        """The A records of a name (lower case, with or without the final dot); [] when it has none."""
        name = name.lower().rstrip(".")
        if not name.endswith("." + self.domain):
            return []
        labels = name[: -len(self.domain) - 1].split(".")
        if len(labels) == 3 and labels[2] == "pod":
            ip = dashed_ip(labels[0])
            found = [ip] if ip else []
        elif len(labels) in (3, 4) and labels[-1] == "svc":
            service = self.services.get(f"{labels[-2]}/{labels[-3]}")
            if service is None or not is_headless(service):
                return []
            ready = [e for e in dns_endpoints(service, list(self.pods.get(labels[-2], {}).values())) if e.ready]
            if len(labels) == 4:
                ready = [e for e in ready if endpoint_name(e) == labels[0]]
            found = [e.ip for e in ready]
        else:
            return []
        # Only loopback, ever, and each address once.
        return list(dict.fromkeys(ip for ip in found if is_loopback(ip)))


def soa_record(domain: str) -> RR:
    """The zone's SOA, for the authority section of negative answers (negative caching: TTL_SECONDS)."""
    return RR(domain, QTYPE.SOA, ttl=TTL_SECONDS,
              rdata=SOA(f"ns.dns.{domain}", f"hostmaster.{domain}", (1, 7200, 1800, 86400, TTL_SECONDS)))


def answer(request: DNSRecord, records: ClusterRecords) -> DNSRecord:
    """The reply to one query (its first question), as an authoritative server for the cluster domain
    that knows nothing else."""
    reply = request.reply(ra=1, aa=1)
    if request.header.opcode != 0 or not request.questions:
        reply.header.rcode = RCODE.NOTIMP if request.header.opcode != 0 else RCODE.FORMERR
        return reply
    question = request.questions[0]
    name = str(question.qname).lower().rstrip(".")
    if not records.in_zone(name):
        reply.header.aa = 0
        reply.header.rcode = RCODE.NXDOMAIN
        return reply
    addresses = records.addresses(name)
    if name == records.domain:  # the apex exists: its SOA, no data otherwise
        if question.qtype in (QTYPE.SOA, QTYPE.ANY):
            reply.add_answer(soa_record(records.domain))
        else:
            reply.add_auth(soa_record(records.domain))
    elif not addresses:
        reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(soa_record(records.domain))
    elif question.qtype in (QTYPE.A, QTYPE.ANY):
        for ip in addresses:
            reply.add_answer(RR(question.qname, QTYPE.A, ttl=TTL_SECONDS, rdata=A(ip)))
    else:  # the name exists, with no record of this type (AAAA, say): NOERROR, no data
        reply.add_auth(soa_record(records.domain))
    return reply


def respond(data: bytes, records: ClusterRecords, limit: int | None) -> bytes | None:
    """The wire answer to a wire query; None for a packet that is not a query (dropped). `limit`: the
    largest UDP answer (the client's EDNS buffer, else 512); a longer one is sent truncated (TC)."""
    try:
        request = DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, struct.error):
        return None
    if request.header.qr:  # an answer, not a query
        return None
    reply = answer(request, records)
    packed = reply.pack()
    if limit is not None:
        edns = next((r for r in request.ar if r.rtype == QTYPE.OPT), None)
        size = max(UDP_PAYLOAD, min(edns.rclass, 4096)) if edns is not None else UDP_PAYLOAD
        if len(packed) > size:
            truncated = reply.truncate()
            truncated.questions = reply.questions
            packed = truncated.pack()
    return packed


def query_zone(ip: str, port: int = DNS_PORT, domain: str = CLUSTER_DOMAIN,
               timeout: float = 2.0) -> tuple[bool, str]:
    """One query for the zone's SOA over UDP (the health check `up` and `status` make): (answered, detail)."""
    query = DNSRecord.question(domain, "SOA")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(query.pack(), (ip, port))
            reply = DNSRecord.parse(s.recv(4096))
    except (OSError, ValueError, DNSError) as e:
        return False, f"{ip}:{port}: {e}"
    ok = reply.header.id == query.header.id and any(r.rtype == QTYPE.SOA for r in reply.rr)
    return ok, f"{ip}:{port} ({domain})" if ok else f"{ip}:{port}: unexpected answer"


# --- I/O: UDP and TCP servers ---------------------------------------------------------------------


class UdpServer(asyncio.DatagramProtocol):
    def __init__(self, records: ClusterRecords):
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            packed = respond(data, self.records, UDP_PAYLOAD)
        except Exception:  # a bad query never stops the server
            log.exception("query from %s failed", addr)
            return
        if packed is not None and self.transport is not None:
            self.transport.sendto(packed, addr)


async def serve_tcp_client(records: ClusterRecords, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    """Queries on one TCP connection, each with its two-byte length, until the client closes or is idle."""
    try:
        while True:
            header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_SECONDS)
            data = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", header)[0]), TCP_IDLE_SECONDS)
            packed = respond(data, records, None)
            if packed is None:
                break
            writer.write(struct.pack("!H", len(packed)) + packed)
            await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
        pass
    except asyncio.CancelledError:
        pass  # the server is stopping
    except Exception:
        log.exception("TCP query failed")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def start_servers(records: ClusterRecords, host: str, port: int):
    """UDP and TCP listeners on host:port; returns (udp transport, tcp server)."""
    if not is_loopback(host):
        raise ValueError(f"--listen {host!r} is not a loopback address (the devcluster stays on 127.0.0.0/8)")
    loop = asyncio.get_running_loop()
    connections = set()

    async def handle(reader, writer):
        if len(connections) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        task = asyncio.current_task()
        connections.add(task)
        try:
            await serve_tcp_client(records, reader, writer)
        finally:
            connections.discard(task)

    udp, _ = await loop.create_datagram_endpoint(lambda: UdpServer(records), local_addr=(host, port))
    tcp = await asyncio.start_server(handle, host, port, reuse_address=True)
    return udp, tcp


async def amain(args: argparse.Namespace) -> int:
    records = ClusterRecords(domain=args.cluster_domain.lower().strip("."))
    scratch = Path(args.kubeconfig).resolve().parent / "dns-credentials"
    client = ApiClient(ClusterAccess.from_kubeconfig(args.kubeconfig, scratch), user_agent="devcluster-dns")
    stop = processes.stop_event()
    informers = [Informer(client, "/api/v1/pods", records.on_pod, name="pods"),
                 Informer(client, "/api/v1/services", records.on_service, name="services")]
    tasks = [asyncio.create_task(i.run()) for i in informers]
    udp = tcp = None
    try:
        # Listening only once both caches are filled: before that every name would be NXDOMAIN, and
        # `up` waits for an answer before it reports the cluster healthy.
        waiting = [asyncio.ensure_future(asyncio.gather(*(i.synced.wait() for i in informers))),
                   asyncio.ensure_future(stop.wait())]
        _, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            future.cancel()
        if stop.is_set():
            return 0
        udp, tcp = await start_servers(records, args.listen, args.port)
        log.info("answering %s on %s:%d (UDP and TCP)", records.domain, args.listen, args.port)
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        if udp is not None:
            udp.close()
        if tcp is not None:
            tcp.close()
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.dns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--listen", required=True, help="a loopback address of its own")
    parser.add_argument("--port", type=int, default=DNS_PORT)
    parser.add_argument("--cluster-domain", default=CLUSTER_DOMAIN)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
