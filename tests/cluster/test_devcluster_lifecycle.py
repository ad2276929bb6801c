"""`up` is idempotent and within budget, `status` tells the truth, `down` leaves no process behind.

Runs a second, small devcluster in its own state dir, so the session's cluster is not disturbed.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devcluster import DevCluster, processes
from devcluster.wait import poll

pytestmark = pytest.mark.cluster

UP_BUDGET_SECONDS = 30


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devcluster", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=120)


def processes_referring_to(path: Path) -> list[str]:
    """Processes whose command line, working dir or environment mention path (pods included)."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if (entry / "stat").read_text().split(") ")[-1].startswith("Z"):
                continue
            cwd = os.readlink(entry / "cwd").encode()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in cmdline or cwd.startswith(needle) or needle in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{entry.name}: {command}")
    return found


def test_up_is_idempotent_and_down_stops_everything_it_started(tmp_path):
    state_dir = tmp_path / "devcluster"
    cluster = DevCluster(state_dir)
    assert cli(state_dir, "status").returncode == 1  # nothing running yet

    started = time.monotonic()
    assert cluster.up(gpu_nodes=1) is True
    up_seconds = time.monotonic() - started
    try:
        status = cli(state_dir, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "kube-apiserver" in status.stdout and "etcd" in status.stdout

        again = time.monotonic()
        assert cluster.up(gpu_nodes=1) is False  # already running: nothing restarted
        assert time.monotonic() - again < 5

        env = cli(state_dir, "env").stdout
        assert f"export KUBECONFIG={state_dir / 'kubeconfig'}" in env
        version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
        assert version["serverVersion"]["gitVersion"].startswith("v1.")

        state = cluster.read_state()
        if state.local_node:
            # A pod process on the local node must go when the cluster goes.
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
                   "spec": {"nodeSelector": {"devcluster.serving.moe.dev/local": "true"},
                            "containers": [{"name": "sleep", "image": "busybox", "command": ["sleep", "600"]}]}}
            cluster.kubectl("create", "-f", "-", input=json.dumps(pod))
            cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Running", "pod/sleeper", "--timeout=30s")
    finally:
        assert cluster.down() is True

    assert not [p.name for p in state.processes if processes.is_alive(p)]
    poll("every process of the cluster to exit", lambda: not processes_referring_to(state_dir), timeout=10,
         on_timeout=lambda: f": {processes_referring_to(state_dir)}")
    assert cli(state_dir, "status").returncode == 1
    assert up_seconds < UP_BUDGET_SECONDS, f"up took {up_seconds:.1f}s"
