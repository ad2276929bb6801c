"""Helpers for tests that run the real operator against a cluster (tests/cluster, tests/e2e).

    install_crd(cluster)
    with running_operator(cluster, namespaces=["ns"]) as op:
        op.metric("moe_operator_reconcile_total", result="ok")

`cluster` is devcluster.testing.RunningCluster (anything with .kubectl(), .env and .state_dir).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "modeldeployments.yaml"


def wait_for(what: str, check: Callable[[], object], timeout: float, interval: float = 0.1):
    """Poll `check` until it returns something truthy (returned); raise AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def install_crd(cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "crd/modeldeployments.serving.moe.dev",
                    "--timeout=30s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningOperator:
    process: subprocess.Popen
    port: int
    log_path: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            series, value = line.rsplit(" ", 1)
            if series.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def running_operator(cluster, namespaces: list[str] | None = None, resync_seconds: float = 30.0,
                     extra_args: tuple[str, ...] = (), kubeconfig: Path | None = None,
                     wait_ready: bool = True) -> Iterator[RunningOperator]:
    """`moe-operator run` as a subprocess (with `kubeconfig`, the cluster's by default), ready (healthz
    200) on entry unless `wait_ready` is False, stopped (SIGTERM) on exit."""
    kubeconfig = kubeconfig or cluster.kubeconfig
    port = free_port()
    logs = Path(cluster.state_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"moe-operator-{port}.log"
    scope = [a for ns in namespaces for a in ("--namespace", ns)] if namespaces else ["--all-namespaces"]
    cmd = [sys.executable, "-m", "moe_operator.app.cli", "run", "--kubeconfig", str(kubeconfig),
           "--host", "127.0.0.1", "--port", str(port), "--resync-seconds", str(resync_seconds), *scope,
           *extra_args]
    env = {**os.environ, **cluster.env, "KUBECONFIG": str(kubeconfig)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    op = RunningOperator(process, port, log_path)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"moe-operator exited with {process.returncode}:\n{op.log()[-4000:]}")
        return op.get("/healthz")[0] == 200

    try:
        if wait_ready:
            wait_for("the operator's /healthz", healthy, 60)
        yield op
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

