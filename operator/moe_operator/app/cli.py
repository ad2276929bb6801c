"""`moe-operator run`: the operator in the foreground (kopf, the HTTP port, the resync loop)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor

import kopf
import urllib3
from aiohttp import web
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from ..apply import Writer
from ..rollout.progressive import rollback_word
from ..world.observe import Reader
from .alerts import AbortStore, NamespaceTokens, TokenSource, alerts_routes
from .controller import Controller, key_of
from .gates import GateKeeper
from .handlers import configure, registry
from .leader import LEASE_NAME, LeaderElector
from .metrics import OperatorMetrics
from .permissions import RECHECK_SECONDS, RETRY_SECONDS, Access, KopfRetries, Readiness, one_line
from .ratelimit import DEFAULT_BURST, DEFAULT_QPS, TokenBucket, limit_api_client
from .server import TLSFiles, build_app, serve

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
    run.add_argument("--alerts-namespace-token-secret", metavar="NAME[:KEY]",
                     default=os.environ.get("MOE_OPERATOR_ALERTS_NAMESPACE_TOKEN_SECRET"),
                     help="also accept on /alerts the token in the Secret NAME (key `token` unless given) of "
                          "an alert's namespace, for alerts naming that namespace only (a tenant's "
                          "Alertmanager); needs `get` on Secrets of that name")
    run.add_argument("--tls-cert-file", metavar="PATH", default=os.environ.get("MOE_OPERATOR_TLS_CERT_FILE"),
                     help="serve HTTPS with this PEM certificate (chain); re-read when it changes")
    run.add_argument("--tls-private-key-file", metavar="PATH",
                     default=os.environ.get("MOE_OPERATOR_TLS_PRIVATE_KEY_FILE"),
                     help="the certificate's PEM private key (with --tls-cert-file)")
    ha = run.add_argument_group("high availability and API load")
    ha.add_argument("--leader-elect", action=argparse.BooleanOptionalAction,
                    default=os.environ.get("MOE_OPERATOR_LEADER_ELECT", "") in ("1", "true"),
                    help="run as one of several replicas: only the holder of a coordination.k8s.io Lease "
                         "reconciles, watches and scrapes; the others serve /healthz and /alerts (an abort "
                         "is written to its ModelDeployment, and the leader acts on it)")
    ha.add_argument("--leader-election-namespace", default=os.environ.get("POD_NAMESPACE") or "default",
                    help="namespace of the Lease (default: $POD_NAMESPACE, else default)")
    ha.add_argument("--leader-election-id", default=LEASE_NAME, help="name of the Lease")
    ha.add_argument("--leader-election-lease-seconds", type=float, default=10.0,
                    help="how long a leader that stopped renewing keeps the Lease (the failover time)")
    ha.add_argument("--kube-api-qps", type=float, default=DEFAULT_QPS,
                    help="sustained API requests per second of the reconciles (0: no limit)")
    ha.add_argument("--kube-api-burst", type=int, default=DEFAULT_BURST,
                    help="API requests the reconciles may make at once after a quiet spell")
    run.add_argument("--gang-scheduling", choices=("auto", "workload", "gates", "none"),
                     default=os.environ.get("MOE_OPERATOR_GANG_SCHEDULING") or "auto",
                     help="how a multi-pod group's pods are bound all together or not at all: `workload`, "
                          "Kubernetes' PodGroups (scheduling.k8s.io/v1alpha2) where served; `gates`, the "
                          "operator's own admission (pods behind a scheduling gate, lifted together when the "
                          "group fits; needs list/watch on nodes and on pods cluster-wide); `auto`, the first "
                          "where served, else the second; `none`, pod by pod (e.g. under Kueue or Volcano)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say: the TLS flags come as a pair; limits and lease times that work."""
    if args.command != "run":
        return
    if bool(args.tls_cert_file) != bool(args.tls_private_key_file):
        p.error("--tls-cert-file and --tls-private-key-file go together")
    if args.kube_api_burst < 1:
        p.error(f"--kube-api-burst must be >= 1, got {args.kube_api_burst}")
    if args.leader_election_lease_seconds < 3:
        p.error(f"--leader-election-lease-seconds must be >= 3, got {args.leader_election_lease_seconds}")


def elector_for(args: argparse.Namespace, api: client.ApiClient) -> LeaderElector | None:
    """The Lease loop, with --leader-elect; None runs as the only replica."""
    if not args.leader_elect:
        return None
    lease = args.leader_election_lease_seconds

    def lost() -> None:   # as controller-runtime's managers: stop at once, restart as a candidate
        log.error("leadership lost: exiting so that only one replica reconciles")
        logging.shutdown()
        os._exit(1)

    return LeaderElector(client.CoordinationV1Api(api), args.leader_election_namespace, args.leader_election_id,
                         lease_duration=lease, renew_deadline=0.7 * lease, retry_period=max(1.0, lease / 5),
                         on_lost=lost)


def tls_files(args: argparse.Namespace) -> TLSFiles | None:
    """The serving certificate, or None for plain HTTP; SystemExit with the reason when it cannot load."""
    if not args.tls_cert_file:
        return None
    try:
        return TLSFiles(args.tls_cert_file, args.tls_private_key_file)
    except (OSError, ssl.SSLError) as error:
        raise SystemExit(f"moe-operator: cannot load the TLS certificate {args.tls_cert_file} and key "
                         f"{args.tls_private_key_file}: {error}") from None


def namespace_tokens(args: argparse.Namespace, api: client.ApiClient) -> NamespaceTokens | None:
    """Per-namespace /alerts tokens (--alerts-namespace-token-secret), or None."""
    if not args.alerts_namespace_token_secret:
        return None
    name, _, key = args.alerts_namespace_token_secret.partition(":")
    if not name:
        raise SystemExit("--alerts-namespace-token-secret takes NAME[:KEY]")
    core = client.CoreV1Api(api)
    return NamespaceTokens(name, key or "token", read_secret=lambda ns, n: core.read_namespaced_secret(n, ns).data or {})


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
    if not args.alerts_namespace_token_secret:
        log.warning("no --alerts-token-secret or --alerts-token-file: /alerts refuses every post")
    return TokenSource()


API_CONNECTIONS = 32   # the client's connection pool: reconciles run on up to 16 + 16 threads (kopf's, the caches')


def api_client(kubeconfig: str | None) -> client.ApiClient:
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = API_CONNECTIONS
    return client.ApiClient(cfg)


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
        del results
        await asyncio.to_thread(release_free_memory)


ROLLBACK_REPLY_WAIT_SECONDS = 5.0   # how long /alerts waits for the abort's reconcile to tell how it went
TRIGGER_WORKERS = 16                # reconciles the caches' change events may run at once (as kopf's)


def run_quietly(controller: Controller, key) -> None:
    """A reconcile triggered by a change of an owned object (the resync retries what fails)."""
    try:
        controller.run(key)
    except Exception as error:
        log.warning("reconcile of %s/%s after a change failed: %s", *key, error)


def alert_routes(controller: Controller, metrics: OperatorMetrics, token: TokenSource, store: AbortStore,
                 tenants: NamespaceTokens | None = None, elector: LeaderElector | None = None):
    """/alerts: a recorded abort is reconciled at once, from the object as written (not waiting for
    its watch event), off the event loop; the reply says whether the rollback was instant. On a
    standby replica the abort is recorded (the annotation is written) and the leader acts on it."""
    loop = asyncio.get_running_loop()

    async def reconcile_now(body, _received: float) -> str | None:
        if elector is not None and not elector.leading:
            return "recorded; the leading replica acts on it"
        controller.remember(body)
        run = loop.run_in_executor(None, controller.run, key_of(body))
        try:
            outcome = await asyncio.wait_for(asyncio.shield(run), ROLLBACK_REPLY_WAIT_SECONDS)
        except TimeoutError:
            return "recorded; the operator is acting on it"
        return rollback_word(outcome.plan) if outcome and outcome.plan else "recorded; the operator is acting on it"

    return alerts_routes(token, store, on_abort=reconcile_now, namespace_tokens=tenants,
                         on_result=lambda result: metrics.alerts.labels(result).inc())


async def keep_readiness(readiness: Readiness, access: Access, kopf_started: asyncio.Event) -> None:
    """Check the permissions at start and periodically (a fixed Role is noticed without a restart);
    once they are all granted and kopf has started, LIST what the watches list, once."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            missing = await loop.run_in_executor(None, access.missing)
        except Exception as error:     # the API server cannot answer: say so on /healthz, try again
            if readiness.check_error is None:
                log.warning("cannot check the operator's permissions: %s", one_line(error))
            readiness.check_error = one_line(error)
        else:
            readiness.check_error = None
            for line in missing:
                if line not in (readiness.missing or ()):     # one line per missing permission, not per check
                    log.error("%s", line)
            if not missing and readiness.missing != []:
                log.info("permissions: all %d granted", len(access.checks))
            readiness.missing = missing
        if readiness.missing == [] and readiness.check_error is None and not readiness.listed:
            await kopf_started.wait()
            readiness.list_error = await loop.run_in_executor(None, access.list_watched)
            readiness.listed = readiness.list_error is None
            if readiness.listed:
                log.info("ready: watching %s", ", ".join(access.namespaces) or "all namespaces")
            else:
                log.warning("%s", readiness.list_error)
        await asyncio.sleep(RECHECK_SECONDS if readiness.ok() else RETRY_SECONDS)


TLS_RELOAD_SECONDS = 30.0


async def keep_tls(tls: TLSFiles) -> None:
    """A renewed certificate (a rotated Secret) is served within TLS_RELOAD_SECONDS, without a restart."""
    while True:
        await asyncio.sleep(TLS_RELOAD_SECONDS)
        tls.reload_if_changed()


async def livez(_request: web.Request) -> web.Response:
    """/livez: the process serves; for a liveness probe (a missing permission makes /healthz 503, and
    a restart would not cure it)."""
    return web.Response(text="ok\n")


def healthz_with_reason(readiness: Readiness):
    """/healthz: 200 `ok`, or 503 with the one-line reason (server.build_app's own route says only
    `starting`)."""
    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path != "/healthz":
            return await handler(request)
        reason = readiness.reason()
        return web.Response(text=f"{reason or 'ok'}\n", status=503 if reason else 200)
    return middleware


async def operate(args: argparse.Namespace, controller: Controller, metrics: OperatorMetrics,
                  token: TokenSource, store: AbortStore, access: Access,
                  tenants: NamespaceTokens | None = None, tls: TLSFiles | None = None) -> None:
    kopf_started = asyncio.Event()
    kopf_retries = KopfRetries()
    logging.getLogger("kopf").addHandler(kopf_retries)
    readiness = Readiness(kopf_retries)
    elector = elector_for(args, access.api) if args.leader_elect else None
    routes = [*alert_routes(controller, metrics, token, store, tenants, elector), web.get("/livez", livez)]
    app = build_app(metrics, readiness.ok, routes)
    app.middlewares.append(healthz_with_reason(readiness))
    runner = await serve(app, args.host, args.port, tls.context if tls else None)
    log.info("serving /healthz, /livez, /metrics and /alerts on %s:%d (%s)", args.host, args.port,
             f"HTTPS, certificate {tls.cert_file}" if tls else "HTTP")
    tls_task = asyncio.create_task(keep_tls(tls)) if tls else None
    readiness_task = asyncio.create_task(keep_readiness(readiness, access, kopf_started))
    resync_task = None
    gate_keeper = None
    try:
        if elector is not None:
            readiness.standby = True
            elector.start()
            log.info("waiting for the lease %s/%s as %s", elector.namespace, elector.name, elector.identity)
            while not await asyncio.to_thread(elector.wait_until_leading, 1.0):
                pass
            readiness.standby = False
            log.info("leading: starting the watches and reconciles")
        resync_task = asyncio.create_task(resync(controller, args.resync_seconds))
        triggers = ThreadPoolExecutor(max_workers=TRIGGER_WORKERS, thread_name_prefix="owned-change")
        caches = controller.reader.use_caches(args.namespace, on_change=lambda key: triggers.submit(
            run_quietly, controller, key))
        log.info("watching %s through caches (server-side selector)", ", ".join(c.kind for c in caches))
        controller.reader.gang_mode = args.gang_scheduling
        if args.gang_scheduling in ("auto", "gates"):
            auto = args.gang_scheduling == "auto"
            gate_keeper = GateKeeper(controller.reader.dyn, controller.reader.gang_pods,
                                     on_wait=metrics.gang_waiting_groups.set,
                                     needed=lambda: not auto or controller.reader.pod_groups_resource() is None)
            await asyncio.to_thread(gate_keeper.start)
            controller.reader.gates_active = gate_keeper.active
        await kopf.operator(
            registry=registry,
            settings=configure(kopf.OperatorSettings(), args.namespace),
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            memo=kopf.Memo(controller=controller),
            ready_flag=kopf_started,
        )
    finally:
        if resync_task is not None:
            resync_task.cancel()
        if gate_keeper is not None:
            gate_keeper.stop()
        if elector is not None:
            await asyncio.to_thread(elector.stop)   # a clean stop hands the Lease over at once
        readiness_task.cancel()
        if tls_task:
            tls_task.cancel()
        logging.getLogger("kopf").removeHandler(kopf_retries)
        await runner.cleanup()


M_ARENA_MAX = -8   # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads that allocate at once their own malloc arenas (up to 8 per core), and the
    operator's threads (reconciles, caches, kopf's) leave freed memory scattered over all of them,
    which stays in RSS. Two arenas keep RSS close to what is in use; MALLOC_ARENA_MAX, when set, wins."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):   # not glibc: its allocator does its own thing
        pass


def release_free_memory() -> None:
    """Hand glibc's free heap pages back to the system (malloc_trim). The caches re-pack an object's
    JSON on every change (a few KiB, from malloc, not Python's small-object pools), and a resync pass
    or a relist allocates and frees a burst: the freed pages stay in RSS, scattered between live
    blocks, until trimmed. Called after each resync pass (a few ms at the operator's size)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def run(args: argparse.Namespace) -> int:
    limit_malloc_arenas()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)   # not a line per handled event
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig     # kopf's own login reads it
    try:
        metrics = OperatorMetrics()
        api = limit_api_client(api_client(args.kubeconfig), TokenBucket(args.kube_api_qps, args.kube_api_burst),
                               on_wait=metrics.client_throttled.inc)
        dyn = DynamicClient(api)
        controller = Controller(Reader(dyn), Writer(dyn, metrics), metrics, log)
        store = AbortStore(dyn)
        access = Access(api, dyn, args.namespace, log)
    except ResourceNotFoundError:
        print("moe-operator: the ModelDeployment CRD is not installed; install it with\n"
              "  kubectl apply --server-side -f crds/modeldeployments.yaml", file=sys.stderr)
        return 1
    except (config.ConfigException, OSError, urllib3.exceptions.HTTPError) as error:
        print(f"moe-operator: cannot reach the Kubernetes API ({error}); pass --kubeconfig or set KUBECONFIG",
              file=sys.stderr)
        return 1
    tls = tls_files(args)
    try:
        asyncio.run(operate(args, controller, metrics, token_source(args, api), store, access,
                            namespace_tokens(args, api), tls))
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    if args.command == "run":
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
