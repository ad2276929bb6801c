"""Runtime-tier fixtures: `moe-runtime serve` as a subprocess on loopback with a tiny builtin model.

`runtime_server` (session-scoped) is the shared, default-configured server, with a revision in
$MOE_REVISION as the operator sets it on a pod; tests that need other flags or kill their server
start their own with `ServerProcess`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

MODEL = "builtin:tiny-mixtral"
MODEL_NAME = "tiny-mixtral"
REVISION = "3f2a9c1b7e"  # runtime_server's revision (the operator's revision names are 10 hex digits)
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One `moe-runtime serve` subprocess bound to 127.0.0.1 on free ports."""

    def __init__(
        self,
        *extra_args: str,
        model: str = MODEL,
        pod_ip: str | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float | None = 120.0,
    ):
        """Start the server; wait until it is ready unless `startup_timeout_s` is None. With
        `pod_ip`, the server gets no --host but POD_IP in its environment, as in a pod. `env` is
        added to its environment; this process's POD_IP and MOE_REVISION are not passed on."""
        self.http_port, self.grpc_port = free_port(), free_port()
        host = pod_ip or "127.0.0.1"
        self.base_url = f"http://{host}:{self.http_port}"
        self.grpc_url = f"{host}:{self.grpc_port}"
        self.log = tempfile.NamedTemporaryFile(prefix="moe-runtime-", suffix=".log", delete=False)
        args = [sys.executable, "-m", "model_runtime.cli", "serve", "--model", model]
        args += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        environ = {**os.environ, "PYTHONUNBUFFERED": "1"}
        environ.pop("POD_IP", None)
        environ.pop("MOE_REVISION", None)
        environ.update(env or {})
        if pod_ip:
            environ["POD_IP"] = pod_ip
        else:
            args += ["--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*args, *extra_args], stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=environ
        )
        if startup_timeout_s is not None:
            self.wait_ready(startup_timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.base_url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling with a deadline
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server_process():
    """`ServerProcess`, for tests that start a server with their own flags (and stop it)."""
    return ServerProcess


@pytest.fixture(scope="session")
def runtime_server():
    server = ServerProcess(
        "--max-model-len", "256", "--max-body-bytes", "1Mi", "--seed", "0", env={"MOE_REVISION": REVISION}
    )
    yield server
    assert server.stop() == 0, server.logs()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """In-process models run on one torch thread: on a small shared machine, torch's OpenMP workers
    contend with the servers and other test processes and every step gets many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_helper_threads_left():
    """A test that builds an engine in process (engine/build.py starts the kernels' helper threads)
    or starts helpers itself leaves none behind: with them running, the float32 rows kernels take
    more rows (decision 37) than the tests after it expect."""
    yield
    from model_runtime.kernels import cpu_decode

    if cpu_decode._helpers:
        cpu_decode.start_helpers(0)
