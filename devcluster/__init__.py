"""The local Kubernetes cluster the project's demo and tests run on (see docs/devcluster.md).

`DevCluster` is the Python API (tests/cluster/conftest.py and tests/e2e use it); `python -m
devcluster` is the command line. Layout, in the order things start:

    cluster/     the control plane: build, versions, certificates, kwok's simulated GPU nodes,
                 monitoring, and `DevCluster` (control_plane.py), which starts and stops it all
    node/        the local node agent: runs the pods bound to it as processes
    proxy.py     the service proxy: a local port per Service port, as kube-proxy
    dns.py       the cluster DNS: headless Services, pod hostnames and pod names on loopback, as CoreDNS
    kubeapi.py   the one Kubernetes API client (the node, the proxy, the DNS, pod discovery and `up`)
    processes.py, wait.py, files.py, loopback.py   what they all share
    cli.py       `python -m devcluster`; testing.py: `running_cluster` for test fixtures
"""

from devcluster.cluster.control_plane import DEFAULT_STATE_DIR, DevCluster, DevClusterError

__all__ = ["DEFAULT_STATE_DIR", "DevCluster", "DevClusterError"]
