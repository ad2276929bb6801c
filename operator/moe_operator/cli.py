"""`moe-operator run`: the operator in the foreground (kopf, the HTTP port, the resync loop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from .alerts import AbortStore, TokenSource, alerts_routes
from .apply import Writer
from .controller import Controller, key_of
from .handlers import configure, registry
from .metrics import OperatorMetrics
from .observe import Reader
from .server import build_app, serve

log = logging.getLogger("moe_operator")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-operator", description="Kubernetes operator for MoE model servers.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator in the foreground")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable; globs as kopf allows)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    run.add_argument("--host", default=os.environ.get("MOE_OPERATOR_HOST", "0.0.0.0"),
                     help="address of /healthz and /metrics (default 0.0.0.0)")
    run.add_argument("--port", type=int, default=int(os.environ.get("MOE_OPERATOR_PORT", "8080")),
                     help="port of /healthz and /metrics (default 8080)")
    run.add_argument("--resync-seconds", type=float, default=30.0,
                     help="reconcile every ModelDeployment this often even without events (default 30)")
    alerts = run.add_mutually_exclusive_group()
    alerts.add_argument("--alerts-token-secret", metavar="NAMESPACE/NAME[:KEY]",
                        default=os.environ.get("MOE_OPERATOR_ALERTS_TOKEN_SECRET"),
                        help="Secret holding the bearer token Alertmanager sends to /alerts (key `token` "
                             "unless given); re-read every 10 s, so rotating it needs no restart")
    alerts.add_argument("--alerts-token-file", metavar="PATH",
                        default=os.environ.get("MOE_OPERATOR_ALERTS_TOKEN_FILE"),
                        help="file holding that token instead (e.g. a mounted Secret)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def token_source(args: argparse.Namespace, api: client.ApiClient) -> TokenSource:
    """Where /alerts gets its token; without one it refuses every post (401)."""
    if args.alerts_token_file:
        return TokenSource(file=args.alerts_token_file)
    if args.alerts_token_secret:
        ref, _, key = args.alerts_token_secret.partition(":")
        namespace, _, name = ref.partition("/")
        if not namespace or not name:
            raise SystemExit("--alerts-token-secret takes NAMESPACE/NAME[:KEY]")
        core = client.CoreV1Api(api)
        return TokenSource(secret=(namespace, name, key or "token"),
                           read_secret=lambda ns, n: core.read_namespaced_secret(n, ns).data or {})
    log.warning("no --alerts-token-secret or --alerts-token-file: /alerts refuses every post")
    return TokenSource()


def api_client(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    except config.ConfigException:
        return config.new_client_from_config()


async def resync(controller: Controller, interval: float) -> None:
    """Level-based safety net: reconcile everything periodically (a converged one writes nothing)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        keys = controller.keys()
        results = await asyncio.gather(*(loop.run_in_executor(None, controller.run, key) for key in keys),
                                       return_exceptions=True)
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, Exception):
                log.warning("resync of %s/%s failed: %s", *key, result)


def alert_routes(controller: Controller, metrics: OperatorMetrics, token: TokenSource, store: AbortStore):
    """/alerts: a recorded abort is reconciled at once, from the object as written (not waiting for
    its watch event), off the event loop."""
    loop = asyncio.get_running_loop()

    def reconcile_now(body, _received: float) -> None:
        controller.remember(body)
        loop.run_in_executor(None, controller.run, key_of(body))

    return alerts_routes(token, store, on_abort=reconcile_now,
                         on_result=lambda result: metrics.alerts.labels(result).inc())


async def operate(args: argparse.Namespace, controller: Controller, metrics: OperatorMetrics,
                  token: TokenSource, store: AbortStore) -> None:
    ready = asyncio.Event()
    routes = alert_routes(controller, metrics, token, store)
    runner = await serve(build_app(metrics, ready.is_set, routes), args.host, args.port)
    log.info("serving /healthz, /metrics and /alerts on %s:%d", args.host, args.port)
    resync_task = asyncio.create_task(resync(controller, args.resync_seconds))
    try:
        await kopf.operator(
            registry=registry,
            settings=configure(kopf.OperatorSettings()),
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            memo=kopf.Memo(controller=controller),
            ready_flag=ready,
        )
    finally:
        resync_task.cancel()
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)   # not a line per handled event
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig     # kopf's own login reads it
    try:
        api = api_client(args.kubeconfig)
        dyn = DynamicClient(api)
        metrics = OperatorMetrics()
        controller = Controller(Reader(dyn), Writer(dyn, metrics), metrics, log)
        store = AbortStore(dyn)
    except ResourceNotFoundError:
        print("moe-operator: the ModelDeployment CRD is not installed; install it with\n"
              "  kubectl apply --server-side -f crds/modeldeployments.yaml", file=sys.stderr)
        return 1
    except (config.ConfigException, OSError, urllib3.exceptions.HTTPError) as error:
        print(f"moe-operator: cannot reach the Kubernetes API ({error}); pass --kubeconfig or set KUBECONFIG",
              file=sys.stderr)
        return 1
    try:
        asyncio.run(operate(args, controller, metrics, token_source(args, api), store))
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
