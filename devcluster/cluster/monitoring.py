"""Prometheus and Alertmanager (Debian's packages) configured against the devcluster.

Which pods Prometheus scrapes. Pods are discovered through the local API server with a read-only
ServiceAccount token. Debian builds Prometheus without `kubernetes_sd_configs`, so
devcluster.cluster.pod_discovery serves the same targets and `__meta_kubernetes_pod_*` labels over
`http_sd_configs` (refreshed every second); the relabelling below is what a real cluster would use
with kubernetes_sd, role pod:

- only Running pods with a loopback pod IP (127.*), and none on a simulated (kwok) node, where
  nothing listens;
- a pod annotated `prometheus.io/scrape: "true"` is scraped on `prometheus.io/port` (or else on
  each declared container port) at `prometheus.io/path` (default `/metrics`);
- a pod without the annotation is scraped on each container port named `http` or `metrics`, at
  `/metrics`; `prometheus.io/scrape: "false"` opts a pod out;
- every series carries `namespace`, `pod`, `container`, `node` and the pod's labels (sanitised:
  `serving.moe.dev/revision` becomes `serving_moe_dev_revision`).

Processes outside the cluster (the operator under `make run`) are scraped through file discovery:
write `[{"targets": ["127.0.0.1:PORT"], "labels": {...}}]` to `.devcluster/monitoring/targets/NAME.json`
(job `static`; loopback targets only; picked up within seconds, no reload needed).

Scrapes every 2 s and evaluates rules every 1 s. Rule files are every `*.yml` in
`.devcluster/monitoring/rules/`; after changing them call `reload(prometheus_url)` (POST /-/reload).
Alertmanager sends every alert group (one per alert: `group_by: ['...']`) to the webhook given at
`up --alert-webhook URL` (bearer token from `--alert-webhook-token-file`), resolved ones too;
`set_alert_webhook` changes it on a running cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from devcluster.files import write_atomic
from devcluster.loopback import urlopen

PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
PROMETHEUS_BINARY = "prometheus"
ALERTMANAGER_BINARY = "prometheus-alertmanager"
DEBIAN_PACKAGES = ("prometheus", "prometheus-alertmanager")
SERVICE_ACCOUNT = "devcluster-prometheus"
SERVICE_ACCOUNT_NAMESPACE = "kube-system"
SCRAPE_INTERVAL = "2s"
EVALUATION_INTERVAL = "1s"


def prometheus_config(*, discovery_url: str, rules_dir: Path, targets_dir: Path,
                      alertmanager_address: str) -> dict:
    """prometheus.yml (see the module docstring for which pods it scrapes)."""
    meta = "__meta_kubernetes_pod_"
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": "1s",
                   "evaluation_interval": EVALUATION_INTERVAL},
        "rule_files": [str(rules_dir / "*.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_address]}]}]},
        "scrape_configs": [{
            "job_name": "pods",
            "http_sd_configs": [{"url": discovery_url, "refresh_interval": "1s"}],
            "relabel_configs": [
                {"source_labels": [f"{meta}phase"], "regex": "Running", "action": "keep"},
                {"source_labels": [f"{meta}ip"], "regex": r"127\..+", "action": "keep"},
                {"source_labels": [f"{meta}node_name"], "regex": "devcluster-gpu-.*", "action": "drop"},
                {"source_labels": [f"{meta}annotation_prometheus_io_scrape"], "regex": "false",
                 "action": "drop"},
                # Annotated pods, or else ports named http/metrics ("true;*" or ";http" / ";metrics").
                {"source_labels": [f"{meta}annotation_prometheus_io_scrape", f"{meta}container_port_name"],
                 "regex": "true;.*|;(http|metrics)", "action": "keep"},
                {"source_labels": [f"{meta}ip", f"{meta}annotation_prometheus_io_port"],
                 "regex": r"(.+);(\d+)", "replacement": "$1:$2", "target_label": "__address__"},
                # A container without declared ports yields a port-less target: drop it unless fixed above.
                {"source_labels": ["__address__"], "regex": r"127\.[\d.]+:\d+", "action": "keep"},
                {"source_labels": [f"{meta}annotation_prometheus_io_path"], "regex": "(.+)",
                 "target_label": "__metrics_path__"},
                {"action": "labelmap", "regex": f"{meta}label_(.+)"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": [f"{meta}name"], "target_label": "pod"},
                {"source_labels": [f"{meta}container_name"], "target_label": "container"},
                {"source_labels": [f"{meta}node_name"], "target_label": "node"},
            ],
        }, {
            "job_name": "static",
            "file_sd_configs": [{"files": [str(targets_dir / "*.json")], "refresh_interval": "5s"}],
            "relabel_configs": [{"source_labels": ["__address__"], "regex": r"127\.[\d.]+:\d+", "action": "keep"}],
        }],
    }


def alertmanager_config(webhook_url: str | None, token_file: Path | None = None) -> dict:
    """alertmanager.yml: every alert to the webhook at once, resolved ones too; none without a URL."""
    receiver: dict = {"name": "webhook"}
    if webhook_url:
        webhook: dict = {"url": webhook_url, "send_resolved": True, "max_alerts": 0}
        if token_file:
            webhook["http_config"] = {"authorization": {"type": "Bearer",
                                                        "credentials_file": str(token_file)}}
        receiver["webhook_configs"] = [webhook]
    return {
        "route": {"receiver": "webhook", "group_by": ["..."], "group_wait": "0s",
                  "group_interval": "1s", "repeat_interval": "1m"},
        "receivers": [receiver],
    }


def prometheus_args(config: Path, data_dir: Path, port: int) -> list[str]:
    return [
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        "--storage.tsdb.retention.time=1d",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url=http://127.0.0.1:{port}/",
        "--web.enable-lifecycle",
        "--rules.alert.resend-delay=1s",
    ]


def pod_discovery_args(api_server: str, ca_file: Path, token_file: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "devcluster.cluster.pod_discovery", f"--api-server={api_server}",
            f"--ca-file={ca_file}", f"--token-file={token_file}", f"--port={port}"]


def alertmanager_args(config: Path, data_dir: Path, port: int) -> list[str]:
    return [
        f"--config.file={config}",
        f"--storage.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url=http://127.0.0.1:{port}/",
        "--cluster.listen-address=",
    ]


def rbac_objects() -> list[dict]:
    """A ServiceAccount that may read pods, for Prometheus' service discovery."""
    name, ns = SERVICE_ACCOUNT, SERVICE_ACCOUNT_NAMESPACE
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": [{"apiGroups": [""], "resources": ["pods", "nodes", "services", "endpoints"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]},
    ]


def write_yaml(path: Path, data: dict) -> Path:
    return write_atomic(path, yaml.safe_dump(data, sort_keys=False))


def binaries_missing() -> list[str]:
    return [b for b in (PROMETHEUS_BINARY, ALERTMANAGER_BINARY) if shutil.which(b) is None]


def ensure_installed() -> None:
    """Install Debian's prometheus and prometheus-alertmanager when missing (apt-get update once)."""
    if not binaries_missing():
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{binaries_missing()} not found and no apt-get here: install Prometheus 2.x "
                           "and Alertmanager 0.25+ so that `prometheus` and `prometheus-alertmanager` are on PATH")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]
    print(f"[build monitoring] installing Debian packages {' '.join(DEBIAN_PACKAGES)}", file=sys.stderr)
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    if binaries_missing():
        raise RuntimeError(f"apt-get installed {DEBIAN_PACKAGES} but {binaries_missing()} is still not on PATH")


def reload(url: str, timeout: float = 10.0) -> None:
    """Ask Prometheus or Alertmanager at url to re-read its configuration (and rule files)."""
    request = urllib.request.Request(url.rstrip("/") + "/-/reload", method="POST", data=b"")
    with urlopen(request, timeout=timeout) as response:
        response.read()
