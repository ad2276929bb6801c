"""`moe-runtime serve`: one asyncio loop serving HTTP and gRPC in front of one InferenceService,
whose engine steps in a child process (engine/process.py; `--no-engine-process`: in a thread).

SIGTERM drains: ready goes false at once, new requests are refused, running requests and streams
finish (up to --drain-timeout), then the engine stops and the process exits 0.

The server binds its own sockets: in a pod its pod IP (local pods share one network stack) and
loopback too where that port is free; TCP_NODELAY on each (see `bind_sockets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket

import uvicorn

from model_runtime.serving.config import ServerConfig
from model_runtime.serving.grpc_server import start_grpc_server
from model_runtime.serving.http_server import create_app
from model_runtime.serving.service import InferenceService

log = logging.getLogger("model_runtime.server")


def listen_hosts(host: str | None, pod_ip: str | None) -> list[tuple[str, bool]]:
    """Addresses to bind and whether each is required. In a pod the server binds its pod IP
    (local pods share one network stack) and loopback too where that port is free."""
    if host:
        return [(host, True)]
    if pod_ip:
        hosts = [(pod_ip, True)]
        if pod_ip != "127.0.0.1":
            hosts.append(("127.0.0.1", False))
        return hosts
    return [("0.0.0.0", True)]


LISTEN_BACKLOG = 2048   # uvicorn's default; it listens again on these sockets with its own


def bind_sockets(hosts: list[tuple[str, bool]], port: int) -> list[socket.socket]:
    """TCP sockets bound to each host on one port (port 0: the first bind picks it)."""
    sockets = []
    for host, required in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on TCP sockets that say so, and without
        # it a stream's first event waits ~40 ms behind the response headers (Nagle + delayed ACK)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            # Listen now: with SO_REUSEADDR two processes may both bind one address and port until
            # one listens (local pods starting together both bind 127.0.0.1), and the other's
            # listen, inside uvicorn, would fail the whole server instead of skipping this socket.
            sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            sock.close()
            if required or e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
            log.info("not listening on %s:%d as well (%s)", host, port, e.strerror)
            continue
        port = sock.getsockname()[1]
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def log_fault_injection(config: ServerConfig) -> None:
    if config.inject_latency_ms > 0:
        log.warning(
            "FAULT INJECTION ON: %.0f ms added before the first token of every request",
            config.inject_latency_ms,
        )
    if config.inject_error_rate > 0:
        log.warning(
            "FAULT INJECTION ON: %.1f%% of requests fail with an injected error",
            100 * config.inject_error_rate,
        )


async def serve(config: ServerConfig, pod_ip: str | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain and return the exit code. A pod without rank 0 of a
    distributed replica runs its ranks and answers health only (serving/rank_server.py)."""
    if not config.parallel.is_leader:
        from model_runtime.serving.rank_server import serve_ranks

        return await serve_ranks(config, pod_ip)
    log_fault_injection(config)
    service = InferenceService(config)
    hosts = listen_hosts(config.host, pod_ip)
    http_sockets = bind_sockets(hosts, config.http_port)
    http_port = http_sockets[0].getsockname()[1]
    grpc_server, grpc_port = await start_grpc_server(service, hosts, config.grpc_port, config.max_body_bytes)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # SIGTERM drains first (below), then stops uvicorn
            yield

    http_server = Server(
        uvicorn.Config(
            create_app(service),
            log_level="warning",
            access_log=False,
            lifespan="off",
            headers=config.revision_headers,  # on every response uvicorn sends, errors included
            timeout_graceful_shutdown=5,
            timeout_keep_alive=5,
        )
    )
    http_task = asyncio.create_task(http_server.serve(sockets=http_sockets), name="http")
    addresses = ", ".join(f"{h}" for h, _ in hosts)
    log.info(
        "serving %s%s: HTTP on %s port %d, gRPC port %d",
        service.model_name,
        f" revision {config.revision}" if config.revision else "",
        addresses,
        http_port,
        grpc_port,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    load_task = asyncio.create_task(service.load(), name="load")
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait([load_task, stop_task, http_task], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if load_task.done() and load_task.exception() is not None:
        log.error("loading %s failed: %s", config.model, load_task.exception())
        service.state = "failed"
        exit_code = 1
    elif http_task.done():
        failure = None if http_task.cancelled() else http_task.exception()
        log.error("the HTTP server stopped on its own (%s): exiting", failure or "it could not start")
        exit_code = 1
    elif config.parallel.distributed:
        # one replica over several ranks: a lost rank (its engine process exits, or this pod's
        # ranks die) leaves nothing to serve with; stop (not live meanwhile), the group restarts
        lost_task = asyncio.create_task(_replica_lost(service))
        await asyncio.wait([stop_task, lost_task, http_task], return_when=asyncio.FIRST_COMPLETED)
        if not stop_task.done():
            exit_code = 1
        lost_task.cancel()
    else:
        await stop_task
    log.info("shutting down")
    service.begin_drain()
    if not load_task.done():
        load_task.cancel()
        with contextlib.suppress(BaseException):
            await load_task
    drained = await service.drain(config.drain_timeout_s)
    await grpc_server.stop(grace=1.0 if drained else 0)
    # After a drain that ran out, uvicorn must not wait its own graceful period again for the
    # connections still open: --drain-timeout is what the pod's grace period was sized for.
    http_server.force_exit = not drained
    http_server.should_exit = True
    with contextlib.suppress(BaseException):
        await http_task
    await service.stop(drain_timeout_s=1.0 if drained else 0.0)
    log.info("stopped")
    return exit_code


async def _replica_lost(service: InferenceService, poll_s: float = 0.2) -> None:
    """Return once the replica has lost a rank (the service is no longer live)."""
    while service.live:
        await asyncio.sleep(poll_s)
    reason = getattr(service.engine, "lost_reason", None) if service.engine is not None else None
    log.error("the replica lost a rank (%s): not live; exiting", reason)
