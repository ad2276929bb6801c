"""`moe-runtime serve --node-rank R` for R > 0: a pod that holds ranks of a replica but not rank 0.

It runs its ranks (distributed/ranks.py) and answers only health and /metrics; rank 0's pod serves
every request. Like vLLM's headless workers and LeaderWorkerSet's workers:

    /v2/health/live     200 while every rank of this pod runs; 503 once one has exited
    /v2/health/ready    200 once every rank has loaded its part and joined the replica
    /metrics            moe_weight_bytes{rank} of this pod's ranks, and the process's own series
    anything else       404 naming rank 0's pod

The pod exits when its ranks do: 0 when rank 0 told them to stop, 1 when one failed or the replica
lost a rank (after `--distributed-timeout` at most). SIGTERM waits up to --drain-timeout for rank
0's stop (a group deleted together drains through rank 0), then kills the ranks and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from model_runtime.distributed.ranks import LocalRanks
from model_runtime.serving.config import ServerConfig
from model_runtime.serving.metrics import CONTENT_TYPE, RankMetrics
from model_runtime.serving.server import bind_sockets, listen_hosts
from model_runtime.serving.service import engine_config_of, engine_spec

log = logging.getLogger("model_runtime.server")

POLL_S = 0.2


class RankPod:
    def __init__(self, config: ServerConfig):
        self.config = config
        parallel = config.parallel
        self.ranks = LocalRanks(engine_spec(config, engine_config_of(config)), parallel.global_ranks())
        self.metrics = RankMetrics(config.model_name, self.ranks.weight_bytes)
        self.stopping = False

    @property
    def live(self) -> bool:
        return self.ranks.alive and not self.ranks.failed

    @property
    def ready(self) -> bool:
        return not self.stopping and self.live and self.ranks.all_ready

    def app(self) -> Starlette:
        parallel = self.config.parallel
        first, last = parallel.global_ranks()[0], parallel.global_ranks()[-1]

        async def live(request):
            return JSONResponse({}, status_code=200 if self.live else 503)

        async def ready(request):
            return JSONResponse({}, status_code=200 if self.ready else 503)

        async def metrics(request):
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

        async def elsewhere(request):
            return JSONResponse(
                {
                    "error": f"this pod holds ranks {first}..{last} of a replica of {self.config.model_name} "
                    f"(pod {parallel.node_rank} of {parallel.nnodes}); requests go to rank 0's pod at "
                    f"{parallel.master_addr}"
                },
                status_code=404,
            )

        return Starlette(
            routes=[
                Route("/v2/health/live", live),
                Route("/v2/health/ready", ready),
                Route("/metrics", metrics),
                Route("/{path:path}", elsewhere, methods=["GET", "POST", "PUT", "DELETE"]),
            ]
        )


async def serve_ranks(config: ServerConfig, pod_ip: str | None = None) -> int:
    """Run this pod's ranks until they exit or SIGTERM; the exit code."""
    pod = RankPod(config)
    parallel = config.parallel
    pod.ranks.start()
    hosts = listen_hosts(config.host, pod_ip)
    sockets = bind_sockets(hosts, config.http_port)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    http = Server(
        uvicorn.Config(
            pod.app(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            headers=config.revision_headers,
            timeout_graceful_shutdown=2,
        )
    )
    http_task = asyncio.create_task(http.serve(sockets=sockets), name="http")
    log.info(
        "pod %d of %d: ranks %s of %s; health and /metrics on port %d; rank 0 at %s:%s",
        parallel.node_rank,
        parallel.nnodes,
        parallel.global_ranks(),
        config.model_name,
        sockets[0].getsockname()[1],
        parallel.master_addr,
        parallel.master_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    code = 0
    announced = False
    while not stop.is_set():
        if pod.ranks.all_ready and not announced:
            log.info("ranks %s loaded and joined: ready", sorted(pod.ranks.ready))
            announced = True
        codes = pod.ranks.exit_codes()
        if pod.ranks.failed or any(c is not None for c in codes.values()):
            if all(c == 0 for c in codes.values()):
                log.info("rank 0 stopped the replica: exiting")
                break
            if pod.ranks.failed:
                log.error("ranks could not start: %s", pod.ranks.failed)
            else:
                log.error("a rank exited (%s): this pod cannot serve its part; exiting", codes)
            code = 1
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_S)
    pod.stopping = True
    if stop.is_set():
        log.info("SIGTERM: waiting up to %.0fs for rank 0 to stop the replica", config.drain_timeout_s)
    clean = await asyncio.to_thread(pod.ranks.stop, config.drain_timeout_s if stop.is_set() else 1.0)
    if stop.is_set() and not clean:
        log.warning("the ranks were killed before rank 0 stopped them")
    http.should_exit = True
    with contextlib.suppress(BaseException):
        await http_task
    log.info("stopped")
    return code
