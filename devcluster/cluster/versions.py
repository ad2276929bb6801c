"""The one place that pins what the devcluster builds: versions, module paths, staging modules.

Changing a version here changes the cache key (`~/.cache/moe-operator/<component>-<version>/`), so
the next `python -m devcluster build` builds the new version beside the old one.
"""

from __future__ import annotations

from dataclasses import dataclass

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v4.3.1"
# Flux's source-controller and kustomize-controller (`up --gitops`; built lazily, not by `build`).
FLUX_VERSION = "v1.9.6"

# The k8s.io/kubernetes go.mod of KUBERNETES_VERSION replaces these with ./staging/src/...;
# the wrapper module replaces each with the matching v0.<minor>.<patch> release instead.
# (Checked against the release's own go.mod by `build.check_staging_modules`.)
KUBERNETES_STAGING_MODULES = (
    "k8s.io/api",
    "k8s.io/apiextensions-apiserver",
    "k8s.io/apimachinery",
    "k8s.io/apiserver",
    "k8s.io/cli-runtime",
    "k8s.io/client-go",
    "k8s.io/cloud-provider",
    "k8s.io/cluster-bootstrap",
    "k8s.io/code-generator",
    "k8s.io/component-base",
    "k8s.io/component-helpers",
    "k8s.io/controller-manager",
    "k8s.io/cri-api",
    "k8s.io/cri-client",
    "k8s.io/cri-streaming",
    "k8s.io/csi-translation-lib",
    "k8s.io/dynamic-resource-allocation",
    "k8s.io/endpointslice",
    "k8s.io/externaljwt",
    "k8s.io/kms",
    "k8s.io/kube-aggregator",
    "k8s.io/kube-controller-manager",
    "k8s.io/kube-proxy",
    "k8s.io/kube-scheduler",
    "k8s.io/kubectl",
    "k8s.io/kubelet",
    "k8s.io/metrics",
    "k8s.io/mount-utils",
    "k8s.io/pod-security-admission",
    "k8s.io/sample-apiserver",
    "k8s.io/sample-cli-plugin",
    "k8s.io/sample-controller",
    "k8s.io/streaming",
)

# The Kubernetes multicall binary answers to these names (symlinks in the bin dir).
KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


@dataclass(frozen=True)
class Component:
    """One thing `build` produces: a set of binaries from one Go module at one version."""

    name: str
    module: str
    version: str
    binaries: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


def staging_version(kubernetes_version: str = KUBERNETES_VERSION) -> str:
    """v1.36.3 -> v0.36.3: the tag k8s.io staging modules carry for a Kubernetes release."""
    major, minor, patch = kubernetes_version.lstrip("v").split(".")
    assert major == "1", kubernetes_version
    return f"v0.{minor}.{patch}"


COMPONENTS = (
    Component("kubernetes", "k8s.io/kubernetes", KUBERNETES_VERSION, ("kube",) + KUBERNETES_COMMANDS),
    Component("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION, ("etcd",)),
    Component("kwok", "sigs.k8s.io/kwok", KWOK_VERSION, ("kwok",)),
    Component("helm", "helm.sh/helm/v4", HELM_VERSION, ("helm",)),
)

# Built the first time `up --gitops` (or `build flux`) needs them, not by `make tools`: about 13
# minutes cold on 2 cores, which a CI run that never uses GitOps should not pay.
FLUX_COMPONENTS = (
    Component("source-controller", "github.com/fluxcd/source-controller", FLUX_VERSION, ("source-controller",)),
    Component("kustomize-controller", "github.com/fluxcd/kustomize-controller", FLUX_VERSION,
              ("kustomize-controller",)),
)

# Module versions a Flux build requires instead of the release's own: the module proxy here answers
# 403 for github.com/fluxcd/pkg/artifact v0.18.3 (source-controller v1.9.6's), and v0.18.0 builds
# and serves artifacts the same.
FLUX_MODULE_PINS = {"source-controller": {"github.com/fluxcd/pkg/artifact": "v0.18.0"}}
