"""Container logs: one file per container (`<state-dir>/pods/<ns>_<pod>/<container>.log`, stdout
and stderr, appended across restarts, a marker line at every start), their rotation, the tail that
FallbackToLogsOnError reports, and the kubelet's `/containerLogs` endpoint, so that `kubectl logs [-f]
[--previous] [--tail N]` works."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from devcluster.cluster import certs
from devcluster.files import write_atomic
from devcluster.kubeapi import rfc3339
from devcluster.node.context import NodeConfig

LOG_ROTATE_BYTES = 64 * 1024 * 1024
RUN_MARKER = "--- devcluster: "  # starts the line the agent writes before each run of a container
KUBELET_CERT_VALIDITY = dt.timedelta(days=3650)


@contextlib.contextmanager
def open_for_run(path: Path, argv: list[str]) -> Iterator[BinaryIO]:
    """The container's log, rotated if it grew too large, opened for appending with this run's
    marker line written."""
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            rotate_log(path)
    with open(path, "ab") as log_file:
        log_file.write(f"{RUN_MARKER}{rfc3339()} starting {' '.join(argv)}\n".encode())
        log_file.flush()
        yield log_file


def log_tail(path: Path, max_bytes: int = 2048, max_lines: int = 80) -> str:
    """The end of a container's log since its last start (terminationMessagePolicy
    FallbackToLogsOnError: at most 2 KiB or 80 lines, as the kubelet takes)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    text = text.rsplit(RUN_MARKER, 1)[-1].split("\n", 1)[-1] if RUN_MARKER in text else text
    return "\n".join(text.splitlines()[-max_lines:])


def rotate_log(path: Path) -> None:
    """copytruncate: the running process keeps its (O_APPEND) descriptor and writes on from 0."""
    shutil.copyfile(path, path.with_suffix(".log.1"))
    os.truncate(path, 0)


def container_runs(text: str) -> list[str]:
    """A container log split into its runs (the agent writes a marker line at every start)."""
    runs = re.split(rf"^{re.escape(RUN_MARKER)}.*\n", text, flags=re.M)
    return runs[1:] if len(runs) > 1 else runs


def log_slice(text: str, tail_lines: int | None, limit_bytes: int | None) -> str:
    if tail_lines is not None:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[-tail_lines:]) if tail_lines > 0 else ""
    if limit_bytes is not None:
        text = text.encode()[:limit_bytes].decode("utf-8", "ignore")
    return text


def self_signed_certificate(directory: Path, host_ip: str, node_name: str) -> tuple[Path, Path]:
    """A serving certificate for the log endpoint (the API server does not verify it unless told
    to with --kubelet-certificate-authority)."""
    cert_path, key_path = directory / "kubelet.crt", directory / "kubelet.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    cert, key = certs.self_signed(node_name, dns_names=(node_name,), ip_addresses=(host_ip,),
                                  validity=KUBELET_CERT_VALIDITY)
    write_atomic(key_path, key, 0o600)
    write_atomic(cert_path, cert)
    return cert_path, key_path


class LogServer:
    """The one kubelet API call the local node answers: `/containerLogs/<ns>/<pod>/<container>`.
    HTTPS on the node's address; a client must present a certificate of the cluster CA (the API
    server's kubelet client certificate does). `running(namespace, pod, container)` says whether a
    container's process runs (a follow ends when it does not)."""

    FOLLOW_POLL_SECONDS = 0.5

    def __init__(self, config: NodeConfig, running: Callable[[str, str, str], bool]):
        self.config, self.running = config, running
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        config = self.config
        cert, key = self_signed_certificate(config.state_dir, config.host_ip, config.node_name)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=config.ca_file)
        context.load_cert_chain(cert, key)
        context.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.container_logs)
        app.router.add_get("/healthz", lambda _: self._ok())
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, config.host_ip, 0, ssl_context=context).start()
        self.port = self._runner.addresses[0][1]

    async def _ok(self) -> web.Response:
        return web.Response(text="ok")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        namespace, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        path = self.config.pod_dir(namespace, pod) / f"{container}.log"
        if "/" in f"{namespace}{pod}{container}" or not path.is_file():
            return web.Response(status=404, text=f"no log of container {container} in pod {namespace}/{pod}")
        query = request.query

        def number(key: str) -> int | None:
            return int(query[key]) if query.get(key, "").isdigit() else None

        runs = container_runs(path.read_bytes().decode("utf-8", "replace"))
        previous = query.get("previous") in ("true", "1")
        if previous and len(runs) < 2:
            return web.Response(status=400, text=f"previous terminated container {container!r} not found")
        text = runs[-2] if previous else runs[-1]
        body = log_slice(text, number("tailLines"), number("limitBytes"))
        if previous or query.get("follow") not in ("true", "1"):
            return web.Response(text=body, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(body.encode())
        offset = path.stat().st_size
        marker = RUN_MARKER.encode()
        while True:  # follow while the container runs; a poll of the file, bounded by the process
            running = self.running(namespace, pod, container)
            try:
                if path.stat().st_size < offset:
                    offset = 0  # rotated (copytruncate)
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(1 << 20)
            except OSError:
                break
            if chunk:
                offset += len(chunk)
                if marker in chunk:  # the container restarted: this stream ends
                    await response.write(chunk.split(marker, 1)[0])
                    break
                await response.write(chunk)
            elif not running:
                break
            else:
                await asyncio.sleep(self.FOLLOW_POLL_SECONDS)
        return response
