"""Pod discovery for Prometheus over HTTP SD, standing in for `kubernetes_sd_configs` (role pod).

Debian's prometheus 2.42 is built without the Kubernetes service discovery (its client
libraries are not packaged), so this small server lists pods from the API server, with the
read-only `devcluster-prometheus` ServiceAccount's token, and answers Prometheus' `http_sd_configs`
with the target groups kubernetes_sd would produce: one target per declared container port
(`podIP:port`), or one port-less target for a container without ports, each carrying the same
`__meta_kubernetes_*` labels. The relabelling in monitoring.py is therefore the one a real cluster
would use with kubernetes_sd. Init containers are left out.

    python -m devcluster.cluster.pod_discovery --api-server URL --ca-file CA --token-file TOKEN --port PORT
"""

from __future__ import annotations

import argparse
import re
import ssl
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from devcluster.kubeapi import ApiClient, ApiError, ClusterAccess, condition_true

META = "__meta_kubernetes_"


def sanitize(name: str) -> str:
    """As Prometheus' strutil.SanitizeLabelName: every character outside [a-zA-Z0-9_] becomes _."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _pod_labels(pod: dict) -> dict[str, str]:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    labels = {
        f"{META}namespace": meta.get("namespace", ""),
        f"{META}pod_name": meta.get("name", ""),
        f"{META}pod_ip": status.get("podIP", ""),
        f"{META}pod_ready": str(condition_true(pod, "Ready")).lower(),
        f"{META}pod_phase": status.get("phase", ""),
        f"{META}pod_node_name": spec.get("nodeName", ""),
        f"{META}pod_host_ip": status.get("hostIP", ""),
        f"{META}pod_uid": meta.get("uid", ""),
    }
    for key, value in (meta.get("labels") or {}).items():
        labels[f"{META}pod_label_{sanitize(key)}"] = value
        labels[f"{META}pod_labelpresent_{sanitize(key)}"] = "true"
    for key, value in (meta.get("annotations") or {}).items():
        labels[f"{META}pod_annotation_{sanitize(key)}"] = value
        labels[f"{META}pod_annotationpresent_{sanitize(key)}"] = "true"
    controller = next((o for o in meta.get("ownerReferences", []) if o.get("controller")), None)
    if controller:
        labels[f"{META}pod_controller_kind"] = controller.get("kind", "")
        labels[f"{META}pod_controller_name"] = controller.get("name", "")
    return labels


def target_groups(pods: list[dict]) -> list[dict]:
    """Prometheus HTTP SD target groups for the pods (pure; pods without an IP yield none)."""
    groups = []
    for pod in pods:
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            continue
        pod_labels = _pod_labels(pod)
        for container in pod.get("spec", {}).get("containers", []):
            container_labels = {**pod_labels, f"{META}pod_container_name": container["name"],
                                f"{META}pod_container_image": container.get("image", ""),
                                f"{META}pod_container_init": "false"}
            ports = container.get("ports") or []
            if not ports:
                groups.append({"targets": [ip], "labels": container_labels})
            for port in ports:
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": {
                    **container_labels,
                    f"{META}pod_container_port_name": port.get("name", ""),
                    f"{META}pod_container_port_number": str(port["containerPort"]),
                    f"{META}pod_container_port_protocol": port.get("protocol", "TCP"),
                }})
    return groups


class PodLister:
    """Lists every pod with a bearer token (re-read each time: it may be rotated)."""

    def __init__(self, api_server: str, ca_file: Path, token_file: Path):
        self.api_server, self.token_file = api_server.rstrip("/"), token_file
        self.context = ssl.create_default_context(cafile=str(ca_file))

    async def list_pods(self) -> list[dict]:
        access = ClusterAccess(self.api_server, self.context, token=self.token_file.read_text().strip())
        async with ApiClient(access, user_agent="devcluster-pod-discovery", timeout=5) as client:
            # Only Running pods: the relabelling keeps no others, and kwok can hold many.
            return (await client.get("/api/v1/pods", fieldSelector="status.phase=Running"))["items"]


def serve(lister: PodLister, port: int) -> None:
    async def targets(request: web.Request) -> web.Response:
        if request.path == "/healthz":
            return web.Response(body=b"ok", content_type="application/json")
        try:
            return web.json_response(target_groups(await lister.list_pods()))
        except (ApiError, aiohttp.ClientError, OSError, ValueError) as e:
            # Prometheus keeps the last good targets when a refresh fails.
            return web.json_response({"error": str(e)}, status=503)

    app = web.Application()
    app.router.add_get("/{path:.*}", targets)
    print(f"pod discovery for Prometheus on http://127.0.0.1:{port}/ (API {lister.api_server})", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.cluster.pod_discovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-server", required=True)
    parser.add_argument("--ca-file", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        serve(PodLister(args.api_server, args.ca_file, args.token_file), args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
