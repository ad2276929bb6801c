"""The devcluster's service proxy spreads a Service's connections over its endpoints as kube-proxy does:
ready pods only; serving terminating pods only while no pod is ready; one endpoint per connection, with
no retry of a refused one on another; established connections kept when their pod goes."""

import http.client
import json
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from devcluster.wait import poll

pytestmark = pytest.mark.cluster

LOCAL = {"devcluster.serving.moe.dev/local": "true"}

# A pod's process: answers its own name on $POD_IP:8080 (HTTP/1.1 keep-alive) unless told "silent"; it
# ignores SIGTERM, so a deleted pod goes on serving (terminating, still Ready) until `stop` exists.
SERVER = """
import http.server, os, signal, sys, threading, time
name, stop, mode = sys.argv[1:4]
signal.signal(signal.SIGTERM, signal.SIG_IGN)

class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

if mode == "listen":
    server = http.server.ThreadingHTTPServer((os.environ["POD_IP"], 8080), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
while not os.path.exists(stop):
    time.sleep(0.1)
"""


class Pods:
    """Local pods labelled app=echo, each Ready while the file `flags/<name>` exists; at the end they are
    deleted and told to stop, so none outlives the test by more than a moment."""

    def __init__(self, cluster, namespace, flags):
        self.cluster, self.namespace, self.flags, self.names = cluster, namespace, flags, []

    def create(self, name, listen=True):
        (self.flags / name).touch()
        self.names.append(name)
        self.cluster.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "labels": {"app": "echo"}},
            "spec": {"nodeSelector": LOCAL, "terminationGracePeriodSeconds": 60, "containers": [{
                "name": "web", "image": "x",
                "command": ["python", "-c", SERVER, name, str(self.flags / f"{name}.stop"),
                            "listen" if listen else "silent"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"exec": {"command": ["test", "-f", str(self.flags / name)]},
                                   "periodSeconds": 1, "failureThreshold": 1}}]}})

    def unready(self, name):
        (self.flags / name).unlink()   # its readiness probe fails from now on

    def state(self, name):
        """(Ready condition, terminating) as the API server has it."""
        pod = self.cluster.get_json("pod", "-n", self.namespace, name)
        ready = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}.get("Ready")
        return ready == "True", bool(pod["metadata"].get("deletionTimestamp"))

    def stop_all(self):
        self.cluster.kubectl("delete", "pods", "--all", "-n", self.namespace, "--wait=false", check=False)
        for name in self.names:
            (self.flags / f"{name}.stop").touch()


@pytest.fixture
def pods(cluster, namespace, tmp_path):
    made = Pods(cluster, namespace, tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


def echo_service(cluster, namespace):
    """Service `echo` (port http -> the pods' named port http); its local port once the proxy has it."""
    cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace},
                   "spec": {"selector": {"app": "echo"},
                            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    poll("the proxy port of Service echo", lambda: proxy_port(cluster, namespace, "echo", "http"), 20, 0.2)
    return proxy_port(cluster, namespace, "echo", "http")


def proxy_port(cluster, namespace, service, port_key):
    try:
        state = json.loads((cluster.state_dir / "services.json").read_text())
    except (OSError, ValueError):
        return None
    return state.get(f"{namespace}/{service}", {}).get(port_key)


def answers(port, count):
    """Who answers `count` requests, each on a new connection ("failed: ..." where the client saw an
    error: urllib retries nothing)."""
    seen = []
    for _ in range(count):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                seen.append(response.read().decode().strip())
        except (urllib.error.URLError, ConnectionError) as e:
            seen.append(f"failed: {e}")
    return seen


def failed(seen):
    return [s for s in seen if s.startswith("failed")]


def test_proxy_spreads_over_ready_pods_and_drops_an_unready_one(cluster, namespace, pods):
    pods.create("echo-a")
    pods.create("echo-b")
    port = echo_service(cluster, namespace)
    poll("both pods to answer through the proxy", lambda: set(answers(port, 6)) == {"echo-a", "echo-b"}, 60, 0.5)
    spread = Counter(answers(port, 20))
    assert set(spread) == {"echo-a", "echo-b"} and min(spread.values()) >= 5, spread

    pods.unready("echo-b")
    started = time.monotonic()
    poll("echo-b to be dropped", lambda: set(answers(port, 4)) == {"echo-a"}, 20, 0.2)
    assert time.monotonic() - started < 10
    assert set(answers(port, 10)) == {"echo-a"}
    assert pods.state("echo-b") == (False, False)

    # The local port stays the Service's own while it exists.
    assert proxy_port(cluster, namespace, "echo", "http") == port
    cluster.kubectl("delete", "service", "echo", "-n", namespace)
    poll("the port to be released", lambda: proxy_port(cluster, namespace, "echo", "http") is None, 10, 0.2)


def test_a_terminating_pod_gets_new_connections_only_when_no_pod_is_ready(cluster, namespace, pods):
    pods.create("echo-a")
    pods.create("echo-b")
    port = echo_service(cluster, namespace)
    poll("both pods to answer through the proxy", lambda: set(answers(port, 6)) == {"echo-a", "echo-b"}, 60, 0.5)
    # A keep-alive connection that landed on echo-b (round-robin: one of the first few does).
    for _ in range(4):
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        kept.request("GET", "/")
        if kept.getresponse().read() == b"echo-b":
            break
        kept.close()
    else:
        raise AssertionError("no connection reached echo-b")

    try:
        cluster.kubectl("delete", "pod", "echo-b", "-n", namespace, "--wait=false")
        poll("echo-b to be terminating", lambda: pods.state("echo-b")[1], 10, 0.2)
        poll("echo-b to get no new connections", lambda: set(answers(port, 4)) == {"echo-a"}, 10, 0.2)
        assert set(answers(port, 10)) == {"echo-a"}
        assert pods.state("echo-b") == (True, True), "echo-b should still be Ready (serving) while terminating"
        # The established connection is not cut (kube-proxy keeps its conntrack entry).
        kept.request("GET", "/")
        assert kept.getresponse().read() == b"echo-b"

        pods.unready("echo-a")        # no ready endpoint left: the serving terminating one takes over
        poll("the fallback to echo-b", lambda: set(answers(port, 4)) == {"echo-b"}, 10, 0.2)
        assert set(answers(port, 6)) == {"echo-b"}
        assert pods.state("echo-a") == (False, False) and pods.state("echo-b") == (True, True)

        pods.unready("echo-b")        # terminating and no longer serving: nothing takes connections
        poll("no endpoint at all", lambda: len(failed(answers(port, 4))) == 4, 10, 0.2)
    finally:
        kept.close()


def test_a_refused_endpoint_is_not_retried_on_another(cluster, namespace, pods):
    """echo-silent is Ready but nothing listens on it: the connections it is given fail, fast, and the
    client sees it; the proxy does not try echo-live instead."""
    pods.create("echo-live")
    pods.create("echo-silent", listen=False)
    port = echo_service(cluster, namespace)
    poll("both pods Ready", lambda: pods.state("echo-live") == pods.state("echo-silent") == (True, False), 60, 0.3)
    poll("echo-live to answer through the proxy", lambda: "echo-live" in answers(port, 4), 30, 0.3)
    started = time.monotonic()
    seen = answers(port, 40)
    took = time.monotonic() - started
    refused = failed(seen)
    assert 10 <= len(refused) <= 30, Counter(seen)            # round-robin: every other one
    assert set(seen) - set(refused) == {"echo-live"}
    assert took < 20, f"40 requests took {took:.1f}s: a refused endpoint should fail at once"
