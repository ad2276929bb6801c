"""The operator's one HTTP port: `/healthz`, `/metrics` (and, with rollouts, `/alerts`).

Runs on kopf's event loop (aiohttp); `extra_routes` lets other parts add their endpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import OperatorMetrics


def build_app(metrics: OperatorMetrics, healthy: Callable[[], bool],
              extra_routes: Iterable[web.RouteDef] = ()) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(text="ok\n" if ok else "starting\n", status=200 if ok else 503)

    async def metrics_endpoint(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics_endpoint), *extra_routes])
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
