"""Probes and lifecycle handlers as the kubelet runs them: exec, httpGet (to the pod IP), tcpSocket,
grpc (grpc.health.v1) and sleep, and the success/failure thresholds that turn their results into a
container's started, ready and live states."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal

import aiohttp

from devcluster.loopback import is_loopback
from devcluster.node.env import find_executable


@dataclasses.dataclass
class ProbeTracker:
    """Consecutive-result bookkeeping of one probe: `result` flips to success after
    successThreshold successes and to failure after failureThreshold failures."""

    success_threshold: int = 1
    failure_threshold: int = 3
    result: bool = False
    successes: int = 0
    failures: int = 0

    @classmethod
    def for_probe(cls, probe: dict, initial: bool) -> ProbeTracker:
        return cls(success_threshold=max(1, int(probe.get("successThreshold") or 1)),
                   failure_threshold=max(1, int(probe.get("failureThreshold") or 3)), result=initial)

    def observe(self, ok: bool) -> bool:
        """Records one probe outcome; True when `result` changed."""
        before = self.result
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.success_threshold:
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.failure_threshold:
                self.result = False
        return self.result != before


def probe_port(port: int | str | None, container: dict) -> int:
    """A probe's port: a number, or a name looked up in the container's ports."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"port {port!r} is not a number and no container port has that name")


def _probe_host(handler: dict, pod_ip: str) -> str:
    host = handler.get("host") or pod_ip
    if host == "localhost":
        host = "127.0.0.1"
    if not is_loopback(host):
        raise ValueError(f"host {host!r} is not a loopback address (the devcluster stays on 127.0.0.0/8)")
    return host


async def _exec_handler(command: list[str], env: dict[str, str], cwd: str, timeout: float,
                        prefix: list[str]) -> tuple[bool, str]:
    if not command:
        return False, "exec: empty command"
    exe = find_executable(command[0], env.get("PATH", ""), cwd)
    if exe is None:
        return False, f'exec: "{command[0]}": executable file not found in $PATH'
    proc = await asyncio.create_subprocess_exec(
        *prefix, exe, *command[1:], stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = output.decode("utf-8", "replace")[-500:].strip()
    return proc.returncode == 0, text or f"exit code {proc.returncode}"


async def _grpc_health(host: str, port: int, service: str, timeout: float) -> tuple[bool, str]:
    import grpc  # deferred: only grpc probes need it (and grpc.aio with it)

    # grpc.health.v1.HealthCheckRequest{service} / HealthCheckResponse{status}: two tiny protobufs.
    encoded = service.encode()
    request = (b"\n" + bytes([len(encoded)]) + encoded) if encoded else b""
    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        response = await check(request, timeout=timeout)
    serving = response == b"\x08\x01"
    return serving, "SERVING" if serving else f"not serving ({response!r})"


async def run_handler(handler: dict, *, pod_ip: str, container: dict, env: dict[str, str], cwd: str,
                      timeout: float, http: aiohttp.ClientSession,
                      prefix: list[str] | None = None) -> tuple[bool, str]:
    """Runs one probe or lifecycle handler (exec, httpGet, tcpSocket, grpc, sleep); (ok, message).
    An exec command starts behind `prefix` (the pod's mount namespace wrapper), as it would run in
    the container."""
    try:
        if "exec" in handler:
            return await _exec_handler(handler["exec"].get("command") or [], env, cwd, timeout, prefix or [])
        if "httpGet" in handler:
            get = handler["httpGet"]
            host = _probe_host(get, pod_ip)
            port = probe_port(get.get("port"), container)
            scheme = (get.get("scheme") or "HTTP").lower()
            path = get.get("path") or "/"
            if not path.startswith("/"):
                path = "/" + path
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            headers.setdefault("User-Agent", "kube-probe/devcluster")
            async with http.get(f"{scheme}://{host}:{port}{path}", headers=headers, ssl=False,
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                ok = 200 <= resp.status < 400
                return ok, f"HTTP probe returned {resp.status}"
        if "tcpSocket" in handler:
            sock = handler["tcpSocket"]
            host, port = _probe_host(sock, pod_ip), probe_port(sock.get("port"), container)
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True, "connected"
        if "grpc" in handler:
            rpc = handler["grpc"]
            return await _grpc_health(_probe_host({}, pod_ip), int(rpc["port"]), rpc.get("service") or "",
                                      timeout)
        if "sleep" in handler:
            await asyncio.sleep(min(float(handler["sleep"].get("seconds") or 0), timeout))
            return True, "slept"
        return False, "unsupported handler (want exec, httpGet, tcpSocket, grpc or sleep)"
    except TimeoutError:
        return False, f"timed out after {timeout:g}s"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # connection refused, bad port name, grpc errors: all mean "failed"
        return False, f"{type(e).__name__}: {e}"
