"""The devcluster's cluster DNS without a cluster: which names have which loopback addresses (what the
EndpointSlice controller would publish and CoreDNS would answer), the wire answers (NXDOMAIN, no data,
truncation), the UDP and TCP servers, and the resolv.conf a pod gets (the kubelet's rules)."""

import asyncio
import ipaddress
import struct

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from devcluster.cluster.control_plane import cluster_dns_candidates, local_pod_cidr
from devcluster.cluster.kwok import POD_CIDR as KWOK_POD_CIDR
from devcluster.dns import ClusterRecords, dashed_ip, respond, start_servers
from devcluster.loopback import free_port
from devcluster.node.resolv import namespace_prefix, parse_resolv_conf, resolv_conf

pytestmark = pytest.mark.unit

HOST_RESOLV = "nameserver 10.255.255.53\nsearch corp.example\noptions timeout:2\n"


def pod(name, ip, *, ready=True, labels=None, namespace="ns", hostname=None, subdomain=None,
        deleting=False, phase="Running"):
    meta = {"name": name, "namespace": namespace, "uid": f"{namespace}-{name}", "labels": labels or {"app": "g"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec = {k: v for k, v in (("hostname", hostname), ("subdomain", subdomain)) if v}
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "spec": spec, "status": status}


def service(name, *, headless=True, publish=False, selector=None, namespace="ns"):
    spec = {"clusterIP": "None" if headless else "10.96.0.42", "selector": selector or {"app": "g"}}
    if publish:
        spec["publishNotReadyAddresses"] = True
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"{namespace}-{name}-svc"}, "spec": spec}


def records(*objects):
    r = ClusterRecords()
    for obj in objects:
        (r.on_service if "clusterIP" in obj["spec"] else r.on_pod)("ADDED", obj)
    return r


def group(publish=True):
    """A replica group: a headless Service, a Ready leader and a worker that is not Ready yet."""
    return records(service("grp", publish=publish),
                   pod("grp-0", "127.100.0.10", hostname="leader", subdomain="grp"),
                   pod("grp-1", "127.100.0.11", hostname="worker", subdomain="grp", ready=False))


def test_pod_hostnames_under_their_headless_service():
    r = group()
    assert r.addresses("leader.grp.ns.svc.cluster.local") == ["127.100.0.10"]
    assert r.addresses("LEADER.grp.ns.svc.cluster.local.") == ["127.100.0.10"]  # case, final dot
    assert r.addresses("worker.grp.ns.svc.cluster.local") == ["127.100.0.11"]  # publishNotReadyAddresses
    assert r.addresses("grp.ns.svc.cluster.local") == ["127.100.0.10", "127.100.0.11"]
    assert r.addresses("leader.grp.other.svc.cluster.local") == []


def test_not_ready_pods_only_with_publish_not_ready_addresses():
    r = group(publish=False)
    assert r.addresses("leader.grp.ns.svc.cluster.local") == ["127.100.0.10"]
    assert r.addresses("worker.grp.ns.svc.cluster.local") == []
    assert r.addresses("grp.ns.svc.cluster.local") == ["127.100.0.10"]


def test_terminating_finished_and_unselected_pods_are_not_endpoints():
    r = records(service("grp"),
                pod("a", "127.100.0.2", hostname="a", subdomain="grp", deleting=True),
                pod("b", "127.100.0.3", hostname="b", subdomain="grp", phase="Failed"),
                pod("c", "127.100.0.4", hostname="c", subdomain="grp", labels={"app": "other"}),
                pod("d", None, hostname="d", subdomain="grp"),
                pod("e", "127.100.0.6", hostname="e", subdomain="grp"))
    assert r.addresses("grp.ns.svc.cluster.local") == ["127.100.0.6"]
    for host in "abcd":
        assert r.addresses(f"{host}.grp.ns.svc.cluster.local") == []
    # A terminating pod stays published with publishNotReadyAddresses (the EndpointSlice rule).
    r.on_service("MODIFIED", service("grp", publish=True))
    assert r.addresses("a.grp.ns.svc.cluster.local") == ["127.100.0.2"]


def test_hostname_needs_the_subdomain_to_name_the_service():
    r = records(service("grp"), pod("p", "127.100.0.7", hostname="leader", subdomain="elsewhere"))
    assert r.addresses("leader.grp.ns.svc.cluster.local") == []
    # Without a hostname, the endpoint is named by its IP with dashes, as CoreDNS does.
    assert r.addresses("127-100-0-7.grp.ns.svc.cluster.local") == ["127.100.0.7"]
    assert r.addresses("grp.ns.svc.cluster.local") == ["127.100.0.7"]


def test_cluster_ip_services_and_missing_services_do_not_resolve():
    r = records(service("web", headless=False), pod("p", "127.100.0.8", hostname="h", subdomain="web"),
                service("empty", selector={"app": "nothing"}))
    assert r.addresses("web.ns.svc.cluster.local") == []
    assert r.addresses("h.web.ns.svc.cluster.local") == []
    assert r.addresses("empty.ns.svc.cluster.local") == []
    assert r.addresses("missing.ns.svc.cluster.local") == []


def test_pod_names_by_address_only_on_loopback():
    r = ClusterRecords()
    assert r.addresses("127-100-3-4.any.pod.cluster.local") == ["127.100.3.4"]
    assert r.addresses("10-0-0-1.any.pod.cluster.local") == []
    assert r.addresses("127-100-3-999.any.pod.cluster.local") == []
    assert dashed_ip("127-0-0-1") == "127.0.0.1" and dashed_ip("a-b-c-d") is None


def test_never_answers_off_loopback_even_when_a_pod_claims_it():
    r = records(service("grp"), pod("p", "10.1.2.3", hostname="h", subdomain="grp"))
    assert r.addresses("h.grp.ns.svc.cluster.local") == []
    assert r.addresses("grp.ns.svc.cluster.local") == []


def test_deleted_objects_leave_the_answers():
    r = group()
    r.on_pod("DELETED", pod("grp-0", "127.100.0.10", hostname="leader", subdomain="grp"))
    assert r.addresses("leader.grp.ns.svc.cluster.local") == []
    r.on_service("DELETED", service("grp"))
    assert r.addresses("worker.grp.ns.svc.cluster.local") == []


def ask(r, name, qtype="A", limit=512):
    query = DNSRecord.question(name, qtype)
    reply = DNSRecord.parse(respond(query.pack(), r, limit))
    assert reply.header.id == query.header.id and reply.header.qr == 1
    return reply


def test_wire_answers():
    r = group()
    reply = ask(r, "leader.grp.ns.svc.cluster.local")
    assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == 1
    assert [(str(a.rdata), a.ttl) for a in reply.rr] == [("127.100.0.10", 5)]
    # The name exists without IPv6: no data (NOERROR, SOA), so getaddrinfo keeps the A record.
    reply = ask(r, "leader.grp.ns.svc.cluster.local", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr and reply.auth[0].rtype == QTYPE.SOA
    reply = ask(r, "nobody.grp.ns.svc.cluster.local")
    assert reply.header.rcode == RCODE.NXDOMAIN and not reply.rr
    reply = ask(r, "cluster.local", "SOA")
    assert reply.rr[0].rtype == QTYPE.SOA


@pytest.mark.parametrize("name", ["example.com", "leader.grp", "grp.ns.svc.cluster.local.example.com",
                                  "kubernetes.default.svc"])
def test_names_outside_the_cluster_domain_are_nxdomain_never_forwarded(name):
    reply = ask(group(), name)
    assert reply.header.rcode == RCODE.NXDOMAIN and not reply.rr


def test_garbage_and_answers_are_dropped():
    r = group()
    assert respond(b"\x00\x01garbage", r, 512) is None
    answer_packet = respond(DNSRecord.question("grp.ns.svc.cluster.local").pack(), r, 512)
    assert respond(answer_packet, r, 512) is None


def big_group(n=60):
    return records(service("big"), *(pod(f"p{i}", f"127.100.1.{i + 2}", labels={"app": "g"}) for i in range(n)))


def test_a_udp_answer_too_large_is_truncated_for_a_retry_over_tcp():
    r = big_group()
    udp = ask(r, "big.ns.svc.cluster.local")
    assert udp.header.tc == 1 and not udp.rr
    full = ask(r, "big.ns.svc.cluster.local", limit=None)  # TCP
    assert full.header.tc == 0 and len(full.rr) == 60


async def test_udp_and_tcp_servers_answer_on_loopback():
    r = big_group()
    port = free_port()
    udp, tcp = await start_servers(r, "127.0.0.1", port)
    loop = asyncio.get_running_loop()
    try:
        query = DNSRecord.question("p5.big.ns.svc.cluster.local")  # no hostname: not a name
        received = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                received.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
        transport.sendto(query.pack())
        reply = DNSRecord.parse(await asyncio.wait_for(received, 5))
        transport.close()
        assert reply.header.rcode == RCODE.NXDOMAIN

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for name in ("big.ns.svc.cluster.local", "127-100-1-9.big.ns.svc.cluster.local"):
            packet = DNSRecord.question(name).pack()
            writer.write(struct.pack("!H", len(packet)) + packet)
            length = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = DNSRecord.parse(await reader.readexactly(length))
            assert reply.header.rcode == RCODE.NOERROR and reply.rr
        writer.close()
    finally:
        udp.close()
        tcp.close()


async def test_servers_refuse_an_address_off_loopback():
    with pytest.raises(ValueError, match="loopback"):
        await start_servers(ClusterRecords(), "0.0.0.0", free_port())


def local_pod_spec(**spec):
    return {"metadata": {"name": "p", "namespace": "team-a"}, "spec": spec}


def test_resolv_conf_cluster_first_is_what_the_kubelet_writes():
    text = resolv_conf(local_pod_spec(), "127.53.7.10", "cluster.local", HOST_RESOLV)
    assert text == ("nameserver 127.53.7.10\n"
                    "search team-a.svc.cluster.local svc.cluster.local cluster.local\n"
                    "options ndots:5\n")
    assert resolv_conf(local_pod_spec(dnsPolicy="ClusterFirstWithHostNet", hostNetwork=True), "127.53.7.10",
                       "cluster.local", HOST_RESOLV).startswith("nameserver 127.53.7.10\n")


def test_resolv_conf_default_and_host_network_keep_the_machines_file():
    for spec in ({"dnsPolicy": "Default"}, {"hostNetwork": True}, {"hostNetwork": True, "dnsPolicy": "ClusterFirst"}):
        assert resolv_conf(local_pod_spec(**spec), "127.53.7.10", "cluster.local", HOST_RESOLV) is None
    # No cluster DNS (not root): ClusterFirst falls back to the machine's file, as the kubelet does.
    assert resolv_conf(local_pod_spec(), None, "cluster.local", HOST_RESOLV) is None


def test_resolv_conf_dns_config_is_merged_and_stays_on_loopback():
    spec = {"dnsConfig": {"nameservers": ["127.0.0.9", "8.8.8.8"], "searches": ["extra.local"],
                          "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}
    text = resolv_conf(local_pod_spec(**spec), "127.53.7.10", "cluster.local", HOST_RESOLV)
    nameservers, searches, options = parse_resolv_conf(text)
    assert nameservers == ["127.53.7.10", "127.0.0.9"]
    assert searches == ["team-a.svc.cluster.local", "svc.cluster.local", "cluster.local", "extra.local"]
    assert options == ["ndots:2", "edns0"]
    text = resolv_conf(local_pod_spec(dnsPolicy="None", **spec), "127.53.7.10", "cluster.local", HOST_RESOLV)
    assert parse_resolv_conf(text) == (["127.0.0.9"], ["extra.local"], ["ndots:2", "edns0"])
    text = resolv_conf(local_pod_spec(dnsPolicy="Default", **spec), "127.53.7.10", "cluster.local", HOST_RESOLV)
    assert parse_resolv_conf(text) == (["10.255.255.53", "127.0.0.9"], ["corp.example", "extra.local"],
                                       ["timeout:2", "ndots:2", "edns0"])


def test_namespace_prefix_binds_the_pods_file_then_execs():
    prefix = namespace_prefix("/state/pods/ns_p/resolv.conf")
    assert prefix[1:5] == ["--mount", "--propagation", "slave", "--"]
    assert prefix[-1] == "/state/pods/ns_p/resolv.conf" and "exec" in prefix[-2]


def test_dns_addresses_are_outside_every_pod_range(tmp_path):
    candidates = cluster_dns_candidates(tmp_path)
    assert len(set(candidates)) == 256
    pod_ranges = [ipaddress.ip_network(local_pod_cidr(tmp_path)), ipaddress.ip_network(KWOK_POD_CIDR),
                  ipaddress.ip_network("127.100.0.0/14"), ipaddress.ip_network("127.144.0.0/14")]
    for ip in candidates:
        address = ipaddress.ip_address(ip)
        assert address in ipaddress.ip_network("127.53.0.0/16")
        assert not any(address in r for r in pod_ranges)
    assert cluster_dns_candidates(tmp_path)[0] == candidates[0]  # stable per state dir
