"""The service proxy's pure parts: which pods serve a Service port, and on which port."""

import pytest

from devcluster.proxy import pod_is_ready, port_key, proxied_ports, ready_endpoints, target_port

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
