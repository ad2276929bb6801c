"""The service proxy: a Service port's endpoints with their EndpointSlice conditions, those kube-proxy
sends new connections to, and the forwarding itself (one endpoint per connection, no retry, established
connections kept)."""

import asyncio
import json
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from devcluster.proxy import (
    Endpoint,
    ServiceProxy,
    in_endpoints,
    port_key,
    proxied_ports,
    routable,
    service_endpoints,
    target_port,
)

pytestmark = pytest.mark.unit


def pod(name, ip, ready=True, labels=None, namespace="ns", deleting=False, ports=None, phase="Running"):
    meta = {"name": name, "namespace": namespace, "uid": name, "labels": labels or {"app": "web"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"containers": [{"name": "c", "ports": ports or [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


SERVICE = {"metadata": {"name": "web", "namespace": "ns"},
           "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                                          {"port": 9000, "targetPort": 9001},
                                                          {"name": "dns", "port": 53, "protocol": "UDP"}]}}
HTTP = SERVICE["spec"]["ports"][0]


def test_proxied_ports_are_tcp_ports_of_selecting_services():
    assert set(proxied_ports(SERVICE)) == {"http", "9000"}
    assert proxied_ports({"metadata": {}, "spec": {"ports": [{"port": 1}]}}) == {}
    assert port_key({"port": 5}) == "5"


def test_named_target_port_needs_a_matching_container_port():
    unnamed = pod("x", "127.100.0.2", ports=[{"containerPort": 1}])
    assert target_port({"port": 80, "targetPort": "http"}, unnamed) is None
    assert target_port({"port": 80}, unnamed) == 80


def conditions(endpoints):
    return {e.pod: (e.ready, e.serving, e.terminating) for e in endpoints}


def test_endpoints_carry_the_endpointslice_conditions():
    """ready = serving and not terminating; serving = the Ready condition; terminating = being deleted."""
    pods = [pod("ready", "127.100.0.2"), pod("unready", "127.100.0.3", ready=False),
            pod("draining", "127.100.0.4", deleting=True),
            pod("stopping", "127.100.0.5", ready=False, deleting=True)]
    assert conditions(service_endpoints(SERVICE, HTTP, pods)) == {
        "ready": (True, True, False), "unready": (False, False, False),
        "draining": (False, True, True), "stopping": (False, False, True)}


def test_publish_not_ready_addresses_makes_every_endpoint_ready():
    service = {**SERVICE, "spec": {**SERVICE["spec"], "publishNotReadyAddresses": True}}
    pods = [pod("unready", "127.100.0.3", ready=False), pod("stopping", "127.100.0.5", ready=False, deleting=True)]
    endpoints = service_endpoints(service, HTTP, pods)
    assert conditions(endpoints) == {"unready": (True, False, False), "stopping": (True, False, True)}
    assert [e.pod for e in routable(endpoints)] == ["stopping", "unready"]


def test_endpoints_are_the_selected_loopback_pods_that_have_not_finished_in_name_order():
    pods = [pod("b", "127.100.0.3"), pod("a", "127.100.0.2"), pod("c", "127.100.0.4", ready=False),
            pod("d", "10.1.2.3"), pod("e", None), pod("f", "127.100.0.6", phase="Succeeded"),
            pod("g", "127.100.0.7", phase="Failed"), pod("h", "127.100.0.8", labels={"app": "other"}),
            pod("i", "127.100.0.9", namespace="elsewhere"), pod("j", "127.100.0.10", ports=[{"containerPort": 1}])]
    assert [(e.pod, e.ip, e.port) for e in service_endpoints(SERVICE, HTTP, pods)] == [
        ("a", "127.100.0.2", 8080), ("b", "127.100.0.3", 8080), ("c", "127.100.0.4", 8080)]
    assert [(e.ip, e.port) for e in service_endpoints(SERVICE, SERVICE["spec"]["ports"][1], pods[:1])] == [
        ("127.100.0.3", 9001)]
    assert not in_endpoints(pod("x", "192.168.0.5")) and in_endpoints(pod("x", "127.0.0.5", ready=False))


def endpoint(name, ready=False, serving=False, terminating=False):
    return Endpoint(name, "127.100.0.2", 80, ready, serving, terminating)


def test_new_connections_go_to_ready_endpoints_and_only_without_them_to_serving_terminating_ones():
    ready, draining = endpoint("ready", True, True), endpoint("draining", serving=True, terminating=True)
    unready, stopping = endpoint("unready"), endpoint("stopping", terminating=True)
    assert routable([draining, ready, unready, stopping]) == [ready]
    assert routable([draining, unready, stopping]) == [draining]      # kube-proxy's terminating fallback
    assert routable([unready, stopping]) == []                       # not Ready: nothing, ever
    assert routable([]) == []


# --- the proxy in this process, fed watch events by hand (no API server) ---------------------------

WEB = {"metadata": {"name": "web", "namespace": "ns", "uid": "s"},
       "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


async def _serve(ip, port, name):
    async def answer(_):
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, ip, port).start()
    return runner, runner.addresses[0][1]


async def _ask(local, count):
    """Who answers `count` requests, each on a new connection ("failed" where the client saw an error).
    A bare HTTP/1.0 client: aiohttp's would retry a GET once on a reset, hiding what the proxy did."""
    seen = []
    for _ in range(count):
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                try:
                    writer.write(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
                    answer = await reader.read()
                finally:
                    writer.close()
            seen.append(answer.split(b"\r\n\r\n", 1)[1].decode() if answer else "failed")
        except ConnectionError:
            seen.append("failed")
    return seen


@pytest.fixture
async def web_pair(tmp_path):
    """Two HTTP servers answering "a" and "b" on 127.150.9.1/2 (one port) and a proxy with Service web."""
    first, port = await _serve("127.150.9.1", 0, "a")
    second, _ = await _serve("127.150.9.2", port, "b")
    proxy = ServiceProxy(tmp_path / "services.json")
    proxy.on_service("ADDED", WEB)
    await proxy.sync()
    local = json.loads((tmp_path / "services.json").read_text())["ns/web"]["http"]
    http_port = [{"name": "http", "containerPort": port}]

    def set_pod(name, ip, **state):
        proxy.on_pod("MODIFIED", pod(name, ip, ports=http_port, **state))

    try:
        yield proxy, local, set_pod
    finally:
        await proxy.close()
        await first.cleanup()
        await second.cleanup()


async def test_connections_are_spread_round_robin_and_follow_readiness(web_pair, tmp_path):
    proxy, local, set_pod = web_pair
    set_pod("a", "127.150.9.1")
    set_pod("b", "127.150.9.2")
    assert Counter(await _ask(local, 8)) == {"a": 4, "b": 4}
    set_pod("b", "127.150.9.2", ready=False)
    assert await _ask(local, 4) == ["a"] * 4
    set_pod("a", "127.150.9.1", ready=False)
    assert await _ask(local, 2) == ["failed"] * 2            # no endpoint: reset at once, no hang
    proxy.on_service("DELETED", WEB)
    await proxy.sync()
    assert json.loads((tmp_path / "services.json").read_text()) == {}


async def test_a_terminating_pod_gets_new_connections_only_while_no_pod_is_ready(web_pair):
    _, local, set_pod = web_pair
    set_pod("a", "127.150.9.1")
    set_pod("b", "127.150.9.2", deleting=True)               # terminating, still Ready: serving
    assert await _ask(local, 6) == ["a"] * 6
    set_pod("a", "127.150.9.1", ready=False)                 # no ready endpoint left: the fallback
    assert await _ask(local, 4) == ["b"] * 4
    set_pod("a", "127.150.9.1")                              # a ready one again: the fallback ends
    assert await _ask(local, 4) == ["a"] * 4
    set_pod("a", "127.150.9.1", ready=False)
    set_pod("b", "127.150.9.2", ready=False, deleting=True)  # terminating and no longer serving
    assert await _ask(local, 2) == ["failed"] * 2


async def test_a_refused_endpoint_is_not_retried_on_another(web_pair):
    """A Ready pod where nothing listens: its share of the connections fails, the client sees it."""
    _, local, set_pod = web_pair
    set_pod("a", "127.150.9.1")
    set_pod("k", "127.150.9.3")                               # "Ready", nothing listens there
    seen = await _ask(local, 10)
    assert Counter(seen) == {"a": 5, "failed": 5}
    assert seen[0] != seen[1]                                 # one endpoint per connection, in turn


async def test_the_client_sees_a_reset_when_its_endpoint_refuses(web_pair):
    _, local, set_pod = web_pair
    set_pod("k", "127.150.9.3")
    reader, writer = await asyncio.open_connection("127.0.0.1", local)
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        with pytest.raises(ConnectionResetError):   # not a clean close (b""), not a hang
            async with asyncio.timeout(5):
                await reader.read()
    finally:
        writer.close()


async def test_an_established_connection_outlives_its_endpoint_leaving(web_pair):
    """kube-proxy keeps conntrack entries: a keep-alive connection to a goes on after a stops being
    ready, is deleted and its pod object goes; new connections go elsewhere."""
    proxy, local, set_pod = web_pair
    set_pod("a", "127.150.9.1")
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout) as session:
        async def on_the_same_connection():
            async with session.get(f"http://127.0.0.1:{local}/") as response:
                return await response.text()

        assert await on_the_same_connection() == "a"
        set_pod("b", "127.150.9.2")
        set_pod("a", "127.150.9.1", ready=False, deleting=True)
        proxy.on_pod("DELETED", pod("a", "127.150.9.1"))
        assert [await on_the_same_connection() for _ in range(3)] == ["a"] * 3
    assert await _ask(local, 2) == ["b"] * 2
