"""The devcluster's service proxy spreads a Service's connections over its ready local pods."""

import json
import time
import urllib.error
import urllib.request

import pytest

from devcluster.control_plane import poll

pytestmark = pytest.mark.cluster

LOCAL = {"devcluster.serving.moe.dev/local": "true"}


def web_pod(name, namespace, flags_dir):
    """An HTTP server answering its own name, Ready while `flags_dir/<name>` exists."""
    serve = (f"mkdir -p site && echo {name} > site/index.html && "
             "exec python -m http.server --bind $POD_IP --directory site 8080")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "echo"}},
            "spec": {"nodeSelector": LOCAL, "terminationGracePeriodSeconds": 2, "containers": [{
                "name": "web", "image": "x", "command": ["sh", "-c", serve],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"exec": {"command": ["test", "-f", str(flags_dir / name)]},
                                   "periodSeconds": 1, "failureThreshold": 1}}]}}


def proxy_port(cluster, namespace, service, port_key):
    try:
        state = json.loads((cluster.state_dir / "services.json").read_text())
    except (OSError, ValueError):
        return None
    return state.get(f"{namespace}/{service}", {}).get(port_key)


def answers(port, count):
    """Who answers `count` requests, each on a new connection ("refused" when none does)."""
    seen = []
    for _ in range(count):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                seen.append(response.read().decode().strip())
        except (urllib.error.URLError, ConnectionError) as e:
            seen.append(f"refused: {e}")
    return seen


def test_proxy_spreads_over_ready_pods_and_drops_an_unready_one(cluster, namespace, tmp_path):
    for name in ("echo-a", "echo-b"):
        (tmp_path / name).touch()
        cluster.apply(web_pod(name, namespace, tmp_path))
    cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace},
                   "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    poll("the proxy port of Service echo", lambda: proxy_port(cluster, namespace, "echo", "http"), 20, 0.2)
    port = proxy_port(cluster, namespace, "echo", "http")
    poll("both pods to answer through the proxy", lambda: set(answers(port, 6)) == {"echo-a", "echo-b"}, 60, 0.5)

    (tmp_path / "echo-b").unlink()  # echo-b's readiness probe fails from now on
    started = time.monotonic()
    poll("echo-b to be dropped", lambda: set(answers(port, 4)) == {"echo-a"}, 20, 0.2)
    assert time.monotonic() - started < 10
    assert set(answers(port, 10)) == {"echo-a"}
    pod = cluster.get_json("pod", "-n", namespace, "echo-b")
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"

    # The local port stays the Service's own while it exists.
    assert proxy_port(cluster, namespace, "echo", "http") == port
    cluster.kubectl("delete", "service", "echo", "-n", namespace)
    poll("the port to be released", lambda: proxy_port(cluster, namespace, "echo", "http") is None, 10, 0.2)
