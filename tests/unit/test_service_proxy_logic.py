"""The service proxy: which pods serve a Service port, on which port, and the forwarding itself."""

import json

import aiohttp
import pytest
from aiohttp import web

from devcluster.proxy import ServiceProxy, pod_is_ready, port_key, proxied_ports, ready_endpoints, target_port

pytestmark = pytest.mark.unit


def pod(name, ip, ready=True, labels=None, namespace="ns", deleting=False, ports=None):
    meta = {"name": name, "namespace": namespace, "uid": name, "labels": labels or {"app": "web"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"containers": [{"name": "c", "ports": ports or [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


SERVICE = {"metadata": {"name": "web", "namespace": "ns"},
           "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                                          {"port": 9000, "targetPort": 9001},
                                                          {"name": "dns", "port": 53, "protocol": "UDP"}]}}


def test_proxied_ports_are_tcp_ports_of_selecting_services():
    assert set(proxied_ports(SERVICE)) == {"http", "9000"}
    assert proxied_ports({"metadata": {}, "spec": {"ports": [{"port": 1}]}}) == {}
    assert port_key({"port": 5}) == "5"


def test_ready_endpoints_select_ready_loopback_pods_in_order():
    pods = [pod("b", "127.100.0.3"), pod("a", "127.100.0.2"), pod("c", "127.100.0.4", ready=False),
            pod("d", "10.1.2.3"), pod("e", "127.100.0.5", deleting=True),
            pod("f", "127.100.0.6", labels={"app": "other"}), pod("g", "127.100.0.7", namespace="elsewhere")]
    http = SERVICE["spec"]["ports"][0]
    assert ready_endpoints(SERVICE, http, pods) == [("127.100.0.2", 8080), ("127.100.0.3", 8080)]
    assert ready_endpoints(SERVICE, SERVICE["spec"]["ports"][1], pods[:1]) == [("127.100.0.3", 9001)]


def test_named_target_port_needs_a_matching_container_port():
    unnamed = pod("x", "127.100.0.2", ports=[{"containerPort": 1}])
    assert target_port({"port": 80, "targetPort": "http"}, unnamed) is None
    assert target_port({"port": 80}, unnamed) == 80


def test_pod_readiness():
    assert pod_is_ready(pod("a", "127.0.0.5"))
    assert not pod_is_ready(pod("a", "127.0.0.5", ready=False))
    assert not pod_is_ready(pod("a", "192.168.0.5"))
    assert not pod_is_ready(pod("a", "127.0.0.5", deleting=True))


async def _serve(ip, port, name):
    async def answer(_):
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, ip, port).start()
    return runner, runner.addresses[0][1]


async def test_forwarding_round_robin_follows_readiness(tmp_path):
    """The proxy's listener end to end, fed watch events by hand (no API server)."""
    first, port = await _serve("127.150.9.1", 0, "a")
    second, _ = await _serve("127.150.9.2", port, "b")
    proxy = ServiceProxy(tmp_path / "services.json")
    proxy.on_service("ADDED", {"metadata": {"name": "web", "namespace": "ns", "uid": "s"},
                               "spec": {"selector": {"app": "web"},
                                        "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    http_port = [{"name": "http", "containerPort": port}]
    proxy.on_pod("ADDED", pod("a", "127.150.9.1", ports=http_port))
    proxy.on_pod("ADDED", pod("b", "127.150.9.2", ports=http_port))
    proxy.on_pod("ADDED", pod("k", "127.150.9.3", ports=http_port))  # "Ready", nothing listens: skipped
    await proxy.sync()
    local = json.loads((tmp_path / "services.json").read_text())["ns/web"]["http"]

    async def ask(count):
        seen = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(count):
                try:
                    async with session.get(f"http://127.0.0.1:{local}/") as response:
                        seen.append(await response.text())
                except aiohttp.ClientError:
                    seen.append("refused")
        return seen

    try:
        assert set(await ask(6)) == {"a", "b"}
        proxy.on_pod("MODIFIED", pod("b", "127.150.9.2", ready=False, ports=http_port))
        assert await ask(4) == ["a"] * 4
        proxy.on_pod("MODIFIED", pod("a", "127.150.9.1", ready=False, ports=http_port))
        assert await ask(1) == ["refused"]
        proxy.on_service("DELETED", {"metadata": {"name": "web", "namespace": "ns", "uid": "s"}})
        await proxy.sync()
        assert json.loads((tmp_path / "services.json").read_text()) == {}
    finally:
        await proxy.close()
        await first.cleanup()
        await second.cleanup()
