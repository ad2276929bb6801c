"""Shared by the e2e modules: which `moe-operator run` processes watch a namespace.

A test that kills and restarts the operator must be the only one reconciling its namespace: a
module's long-lived operator, or one another session left running with --all-namespaces, would
quietly move the rollout on between kills and the test would prove nothing. Such tests take a
namespace of their own (`own_namespace`) and call `assert_sole_operator(ns, allowed_pids)` around
every start and kill.
"""

import os
import urllib.parse
import uuid
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

from devcluster.testing import running_cluster
from devtools.harness import install_crd, running_operator


def _cmdline(pid: str) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def operator_processes() -> dict[int, list[str]]:
    """pid -> argv of every live `moe-operator run` on this machine (zombies have no argv: skipped)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        argv = _cmdline(pid)
        if "run" not in argv:
            continue
        run_at = argv.index("run")
        program = argv[:run_at]
        if any(Path(a).name in ("moe-operator", "moe_operator") or a in ("moe_operator.app.cli", "moe_operator")
               for a in program):
            found[int(pid)] = argv
    return found


def watched_namespaces(argv: list[str]) -> list[str] | None:
    """The namespaces an operator's argv names (--namespace/-n, repeatable); None: all namespaces."""
    names = []
    for i, arg in enumerate(argv):
        if arg in ("--namespace", "-n") and i + 1 < len(argv):
            names.append(argv[i + 1])
        elif arg.startswith("--namespace="):
            names.append(arg.split("=", 1)[1])
    return names or None


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(part.decode(errors="replace").partition("=")[::2] for part in raw.split(b"\0") if b"=" in part)


def _endpoint(url: str) -> tuple[str, int | None]:
    parsed = urllib.parse.urlparse(url)
    return (parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80))


def api_servers(pid: int, argv: list[str]) -> set[tuple[str, int | None]] | None:
    """The API server(s) an operator process talks to: from --kubeconfig, else $KUBECONFIG, else the
    in-cluster variables (the devcluster's node agent sets them for pods); None when unknown."""
    env = _environ(pid)
    kubeconfig = env.get("KUBECONFIG")
    for i, arg in enumerate(argv):
        if arg == "--kubeconfig" and i + 1 < len(argv):
            kubeconfig = argv[i + 1]
        elif arg.startswith("--kubeconfig="):
            kubeconfig = arg.split("=", 1)[1]
    if kubeconfig:
        try:
            config = yaml.safe_load(Path(kubeconfig).read_text()) or {}
            return {_endpoint(c["cluster"]["server"]) for c in config.get("clusters") or []}
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return None
    if env.get("KUBERNETES_SERVICE_HOST"):
        return {(env["KUBERNETES_SERVICE_HOST"], int(env.get("KUBERNETES_SERVICE_PORT") or 443))}
    return None


def operators_watching(namespace: str, api_server_url: str) -> dict[int, list[str]]:
    """Live operator processes that reconcile `namespace` (by name, glob, or all namespaces) of the
    cluster at api_server_url (a process whose cluster cannot be told counts)."""
    ours = _endpoint(api_server_url)
    found = {}
    for pid, argv in operator_processes().items():
        scope = watched_namespaces(argv)
        if scope is not None and not any(fnmatchcase(namespace, p) for p in scope):
            continue
        servers = api_servers(pid, argv)
        if servers is None or ours in servers:
            found[pid] = argv
    return found


def assert_sole_operator(namespace: str, api_server_url: str, allowed: tuple[int, ...] = ()) -> None:
    strays = {pid: argv for pid, argv in operators_watching(namespace, api_server_url).items()
              if pid not in allowed}
    assert not strays, (f"other moe-operator processes watch namespace {namespace} (stop them; a test "
                        f"that kills its operator must be alone there): "
                        + "; ".join(f"pid {pid}: {' '.join(argv)}" for pid, argv in strays.items()))


@pytest.fixture
def own_namespace(cluster):
    """A fresh namespace for one test, watched by no module-wide operator; deleted afterwards."""
    name = f"own-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    assert_sole_operator(name, cluster.api_server_url)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def sole_operator(cluster):
    """`sole_operator(ns, allowed_pids=())`: fail when any other operator process watches ns of
    this cluster."""
    return lambda namespace, allowed=(): assert_sole_operator(namespace, cluster.api_server_url, allowed)


# --- the fixtures every e2e module uses ------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """The devcluster with Prometheus and Alertmanager, the CRD installed (shared by the modules)."""
    with running_cluster(monitoring=True) as running:
        install_crd(running)
        yield running


@pytest.fixture(scope="module")
def ns(cluster, request):
    """A namespace of this module's own, named after it, deleted (without waiting) after it."""
    prefix = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:8].replace("_", "-").strip("-")
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def token(cluster):
    """The /alerts bearer token: (value, path of the file the operator reads)."""
    value = uuid.uuid4().hex
    path = cluster.state_dir / f"alerts-token-{value[:6]}"
    path.write_text(value)
    return value, path


@pytest.fixture(scope="module")
def operator(cluster, ns, token):
    """The operator for this module's namespace (resync every 2 s, /alerts with `token`)."""
    with running_operator(cluster, namespaces=[ns], resync_seconds=2.0,
                          extra_args=("--alerts-token-file", str(token[1]))) as op:
        yield op
