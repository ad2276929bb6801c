"""Prometheus discovers a local pod through the API server, scrapes it, and an alert rule on it
reaches a webhook receiver through Alertmanager (firing, then resolved)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devcluster.wait import poll

pytestmark = pytest.mark.cluster

# A /metrics endpoint on the pod's own loopback address (the local node sets POD_IP).
METRICS_SERVER = """
import http.server, os
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"devcluster_test_up 1\\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
"""


def metrics_pod(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "metrics"}},
        "spec": {
            "nodeSelector": {"devcluster.serving.moe.dev/local": "true"},
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "server",
                "image": "python:3.11",
                "command": ["python", "-c", METRICS_SERVER],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/metrics", "port": "http"}, "periodSeconds": 1},
            }],
        },
    }


class Receiver:
    """An Alertmanager webhook receiver on 127.0.0.1 that records what it is sent."""

    def __init__(self):
        self.payloads: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.payloads.append({"auth": self.headers.get("Authorization"), **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, alertname: str, status: str) -> list[dict]:
        return [a for p in self.payloads for a in p["alerts"]
                if a["labels"].get("alertname") == alertname and a["status"] == status]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(cluster, tmp_path):
    receiver = Receiver()
    token = tmp_path / "token"
    token.write_text("s3cret")
    cluster.set_alert_webhook(receiver.url, str(token))
    yield receiver
    cluster.set_alert_webhook(None)
    receiver.close()


def test_prometheus_scrapes_a_local_pod_and_an_alert_reaches_the_webhook(cluster, namespace, receiver):
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(metrics_pod("exporter")))
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/exporter", "--timeout=60s")
    pod_ip = cluster.get_json("-n", namespace, "pod", "exporter")["status"]["podIP"]

    def scraped() -> bool:
        result = cluster.prometheus_api("query", query=f'devcluster_test_up{{namespace="{namespace}"}}')["result"]
        return bool(result)

    poll("Prometheus to scrape the pod", scraped, timeout=30, interval=0.5)
    series = cluster.prometheus_api("query", query=f'devcluster_test_up{{namespace="{namespace}"}}')["result"][0]
    assert series["metric"]["pod"] == "exporter"
    assert series["metric"]["instance"] == f"{pod_ip}:8080"
    assert series["metric"]["app"] == "metrics"  # pod labels become series labels

    alertname = f"ExporterUp_{namespace.replace('-', '_')}"
    rule = {"alert": alertname, "expr": f'devcluster_test_up{{namespace="{namespace}"}} == 1',
            "labels": {"severity": "test"}, "annotations": {"summary": "the test exporter is up"}}
    cluster.add_rules(namespace, [{"name": namespace, "rules": [rule]}])
    try:
        started = time.monotonic()
        poll("the firing alert at the webhook", lambda: receiver.alerts(alertname, "firing"), timeout=30,
             interval=0.2)
        fired_after = time.monotonic() - started
        alert = receiver.alerts(alertname, "firing")[0]
        assert alert["labels"]["namespace"] == namespace and alert["labels"]["pod"] == "exporter"
        assert receiver.payloads[0]["auth"] == "Bearer s3cret"
        assert fired_after < 15, f"the alert took {fired_after:.1f}s to reach the webhook"

        cluster.kubectl("delete", "-n", namespace, "pod/exporter", "--wait=false")
        poll("the resolved alert at the webhook", lambda: receiver.alerts(alertname, "resolved"), timeout=45,
             interval=0.5)
    finally:
        cluster.remove_rules(namespace)
