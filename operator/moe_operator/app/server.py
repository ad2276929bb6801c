"""The operator's one HTTP port: `/healthz`, `/metrics` (and, with rollouts, `/alerts`).

Runs on kopf's event loop (aiohttp); `extra_routes` lets other parts add their endpoints. With a
certificate and key (`--tls-cert-file`, `--tls-private-key-file`) the port speaks HTTPS only; the files
are re-read when they change (a rotated Secret, cert-manager's renewals) without a restart.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import OperatorMetrics

log = logging.getLogger("moe_operator.app.server")


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


class TLSFiles:
    """The serving certificate (PEM chain) and private key: one SSLContext for the server's life, whose
    certificate is loaded again by `reload_if_changed` when either file changes, so new connections get
    the renewed certificate (connections already open keep theirs)."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._files_stamp()
        self.context.load_cert_chain(cert_file, key_file)    # a bad pair fails at start, with the reason

    def _files_stamp(self) -> tuple:
        # stat follows the kubelet's ..data symlinks: an updated Secret is a new inode and mtime
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, (self.cert_file, self.key_file)))

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed; True when the new certificate is in use. A pair that
        does not load (caught between the two files' updates, say) keeps the old one until the next call."""
        try:
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return False
            # first in a scratch context: a failed load would leave the live one with a certificate and
            # no key (OpenSSL drops a key that does not match a newly loaded certificate)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            log.warning("cannot load the TLS certificate %s and key %s (keeping the one in use): %s",
                        self.cert_file, self.key_file, error)
            return False
        self._stamp = stamp
        log.info("TLS certificate %s reloaded", self.cert_file)
        return True


async def serve(app: web.Application, host: str, port: int,
                ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    """Serve `app` on host:port: HTTPS with `ssl_context`, plain HTTP without."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner
