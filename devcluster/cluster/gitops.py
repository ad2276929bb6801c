"""Flux on the devcluster (`python -m devcluster up --gitops`): its source-controller and
kustomize-controller as local processes, and a Git server on loopback that they sync from.

- The controllers are built from the Go module proxy like the other binaries (build.flux_recipe),
  the first time `--gitops` needs them, and run against the cluster as the ServiceAccounts
  `flux-system/source-controller` and `flux-system/kustomize-controller` (bound to cluster-admin, as
  Flux's own install binds its reconciler), with tokens from the TokenRequest API. They watch only
  the `flux-system` namespace (`--watch-all-namespaces=false`, RUNTIME_NAMESPACE), elect no leader,
  and bind their metrics, health and artifact ports to 127.0.0.1.
- `devcluster.gitserver` serves bare repositories under `<state_dir>/gitops/repos/` at
  http://127.0.0.1:PORT/<name>.git (clone, fetch, push; no authentication).
- The repository `devcluster.git` (GITOPS_REPO_URL in `python -m devcluster env`) is synced by the
  GitRepository and Kustomization `flux-system/devcluster`: whatever its `deploy/` folder holds on
  `main` is applied (server-side, field manager `kustomize-controller`), kept applied (drift
  corrected) and pruned when deleted from Git. Every manifest there names its namespace.
  `repository_objects(name, url)` gives another repository the same pair (tests use their own).
"""

from __future__ import annotations

from pathlib import Path

NAMESPACE = "flux-system"
CONTROLLERS = ("source-controller", "kustomize-controller")
DEFAULT_REPOSITORY = "devcluster"
DEPLOY_PATH = "deploy"
BRANCH = "main"
# How often the source-controller looks for a new commit and the kustomize-controller re-applies
# (drift correction): short, so a push shows up within seconds.
SYNC_INTERVAL = "5s"
TOKEN_SECONDS = 30 * 24 * 3600

SOURCE_API = "source.toolkit.fluxcd.io/v1"
KUSTOMIZE_API = "kustomize.toolkit.fluxcd.io/v1"

README = f"""\
# devcluster GitOps repository

Flux (`flux-system/{DEFAULT_REPOSITORY}` on the devcluster) keeps what `{DEPLOY_PATH}/` holds on
`{BRANCH}` applied to the cluster, every {SYNC_INTERVAL}: commit and push a manifest here and it
appears; change it and the cluster follows; delete it and the object is pruned. Every manifest
names its namespace (`metadata.namespace`). See docs/gitops.md in moe-operator.
"""

# kustomize-controller generates a kustomization for a folder without one; a README is not a manifest.
INITIAL_FILES = {"README.md": README, f"{DEPLOY_PATH}/.keep": ""}


def repository_url(port: int, name: str = DEFAULT_REPOSITORY) -> str:
    return f"http://127.0.0.1:{port}/{name}.git"


def repository_path(repos_dir: Path, name: str) -> Path:
    return repos_dir / f"{name}.git"


def rbac_objects() -> list[dict]:
    """The namespace and the controllers' ServiceAccounts, bound to cluster-admin."""
    objects: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    for name in CONTROLLERS:
        objects += [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NAMESPACE}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": f"devcluster-flux-{name}"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
             "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]},
        ]
    return objects


def token_kubeconfig(server: str, ca_file: Path, user: str, token: str) -> dict:
    """A kubeconfig that authenticates with a bearer token (a ServiceAccount's)."""
    return {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "devcluster", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": user,
                                                        "namespace": NAMESPACE}}],
        "current-context": "devcluster",
    }


def controller_env(base: dict[str, str], kubeconfig: Path) -> dict[str, str]:
    """The controllers' environment: their kubeconfig, their namespace, and no proxy for loopback."""
    return {**base, "KUBECONFIG": str(kubeconfig), "RUNTIME_NAMESPACE": NAMESPACE,
            "NO_PROXY": "127.0.0.0/8,localhost", "no_proxy": "127.0.0.0/8,localhost"}


def _common_args(metrics_port: int, health_port: int) -> list[str]:
    return [f"--metrics-addr=127.0.0.1:{metrics_port}", f"--health-addr=127.0.0.1:{health_port}",
            "--enable-leader-election=false", "--watch-all-namespaces=false", "--log-level=info",
            "--log-encoding=console"]


def source_controller_args(binary: Path, *, metrics_port: int, health_port: int, storage_port: int,
                           storage_path: Path) -> list[str]:
    """The artifact server (where kustomize-controller downloads each commit's tarball) on loopback,
    advertised as such (upstream advertises the pod's hostname)."""
    return [str(binary), *_common_args(metrics_port, health_port), f"--storage-path={storage_path}",
            f"--storage-addr=127.0.0.1:{storage_port}", f"--storage-adv-addr=127.0.0.1:{storage_port}"]


def kustomize_controller_args(binary: Path, *, metrics_port: int, health_port: int) -> list[str]:
    """No remote bases: a kustomization in Git may not pull from the internet."""
    return [str(binary), *_common_args(metrics_port, health_port), "--no-remote-bases=true"]


def repository_objects(name: str, url: str, *, path: str = DEPLOY_PATH, interval: str = SYNC_INTERVAL,
                       wait: bool = False, health_check_exprs: list[dict] | None = None,
                       ignore: list[dict] | None = None, timeout: str | None = None) -> list[dict]:
    """A GitRepository for url's branch `main` and a Kustomization applying its `path`, both
    `flux-system/<name>`. Without `wait`, Ready means applied; with it, Ready also means every applied
    object is healthy (kstatus, or `health_check_exprs`: Flux's CEL health checks by kind)."""
    kustomization: dict = {
        "interval": interval, "retryInterval": interval,
        "sourceRef": {"kind": "GitRepository", "name": name},
        "path": f"./{path}", "prune": True, "wait": wait,
    }
    if timeout:
        kustomization["timeout"] = timeout
    if health_check_exprs:
        kustomization["healthCheckExprs"] = health_check_exprs
    if ignore:
        kustomization["ignore"] = ignore
    return [
        {"apiVersion": SOURCE_API, "kind": "GitRepository", "metadata": {"name": name, "namespace": NAMESPACE},
         "spec": {"interval": interval, "url": url, "ref": {"branch": BRANCH}, "timeout": "20s"}},
        {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization", "metadata": {"name": name, "namespace": NAMESPACE},
         "spec": kustomization},
    ]
