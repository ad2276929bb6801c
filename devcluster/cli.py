"""`python -m devcluster build|up|down|status|env|services`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from devcluster.cluster import build, monitoring
from devcluster.cluster.control_plane import (
    DEFAULT_GPU_NODES,
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    DevCluster,
    DevClusterError,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=None,
                        help=f"where the cluster keeps its state (default: ${STATE_DIR_ENV}, else {DEFAULT_STATE_DIR})")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build (or verify) the cluster binaries and install Prometheus")
    b.add_argument("components", nargs="*",
                   help="default: all but flux (built when `up --gitops` first needs it); "
                        "`flux` builds Flux's source-controller and kustomize-controller")
    b.add_argument("--no-monitoring", action="store_true", help="skip the Debian monitoring packages")
    up = commands.add_parser("up", help="start the cluster (idempotent)")
    up.add_argument("--gpu-nodes", type=int, default=DEFAULT_GPU_NODES, help="simulated 8-GPU nodes")
    up.add_argument("--monitoring", action="store_true", help="also start Prometheus and Alertmanager")
    up.add_argument("--alert-webhook", metavar="URL", help="Alertmanager's webhook receiver (implies --monitoring)")
    up.add_argument("--alert-webhook-token-file", metavar="FILE", help="bearer token for the webhook")
    up.add_argument("--gitops", action="store_true",
                    help="also run Flux (source-controller, kustomize-controller; built the first time) "
                         "and a Git server whose repository's deploy/ folder Flux keeps applied")
    commands.add_parser("down", help="stop every process `up` started")
    commands.add_parser("status", help="health of each component; exit 0 only when all are healthy")
    commands.add_parser("env", help="shell exports: eval \"$(python -m devcluster env)\"")
    services = commands.add_parser("services", help="each Service's local port (from the service proxy)")
    services.add_argument("--json", action="store_true")
    return parser


def _services(cluster: DevCluster, as_json: bool) -> int:
    try:
        table = json.loads(cluster.services_file.read_text())
    except (OSError, ValueError):
        print(f"no service ports yet ({cluster.services_file}): is the cluster up with its proxy?",
              file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(table, indent=2, sort_keys=True))
        return 0
    rows = [(service, str(port_name), str(local_port))
            for service, ports in sorted(table.items()) for port_name, local_port in sorted(ports.items())]
    header = ("SERVICE", "PORT", "LOCAL ADDRESS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    for service, port_name, local_port in [header, *rows]:
        address = local_port if local_port == "LOCAL ADDRESS" else f"127.0.0.1:{local_port}"
        print(f"{service:<{widths[0]}}  {port_name:<{widths[1]}}  {address}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cluster = DevCluster(args.state_dir)
    try:
        if args.command == "build":
            flux = build.versions.FLUX_COMPONENTS
            known = {c.name for c in build.versions.COMPONENTS + flux} | {"flux"}
            unknown = set(args.components) - known
            if unknown:
                print(f"unknown components: {sorted(unknown)} (known: {', '.join(sorted(known))})", file=sys.stderr)
                return 2
            wanted = set(args.components) | ({c.name for c in flux} if "flux" in args.components else set())
            build.ensure_built(tuple(c for c in build.versions.COMPONENTS + flux
                                     if c.name in wanted or (not args.components and c not in flux)))
            if not args.no_monitoring and not args.components:
                monitoring.ensure_installed()
            return 0
        if args.command == "up":
            monitoring_wanted = args.monitoring or bool(args.alert_webhook)  # a webhook needs Alertmanager
            cluster.up(args.gpu_nodes, monitoring_wanted, args.alert_webhook, args.alert_webhook_token_file,
                       gitops_enabled=args.gitops)
            if not cluster.healthy():
                raise DevClusterError("the cluster is up but not healthy: see `python -m devcluster status`")
            return 0
        if args.command == "down":
            if not cluster.down():
                print("devcluster: nothing recorded as running", file=sys.stderr)
            return 0
        if args.command == "status":
            statuses = cluster.status()
            if not statuses:
                print(f"devcluster: not running (no state in {cluster.state_dir})")
                return 1
            for s in statuses:
                print(f"{s.name:<24} {'healthy' if s.healthy else 'UNHEALTHY':<10} {s.detail}")
            for key, value in cluster.env().items():
                if key != "PATH":
                    print(f"{key}={value}")
            return 0 if all(s.healthy for s in statuses) else 1
        if args.command == "env":
            env = cluster.env()
            prefix = env["PATH"].split(":")[:2]
            print(f"export KUBECONFIG={shlex.quote(env['KUBECONFIG'])}")
            print(f"export PATH={':'.join(shlex.quote(p) for p in prefix)}:\"$PATH\"")
            for key in ("PROMETHEUS_URL", "ALERTMANAGER_URL", "GITOPS_REPO_URL"):
                if key in env:
                    print(f"export {key}={shlex.quote(env[key])}")
            return 0
        if args.command == "services":
            return _services(cluster, args.json)
    except RuntimeError as e:  # DevClusterError, and build failures
        print(f"devcluster: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`
        sys.stdout = None
        return 0
    return 2
