"""The local Kubernetes cluster the project's demo and tests run on (see docs/devcluster.md).

`DevCluster` is the Python API (tests/cluster/conftest.py and tests/e2e use it); `python -m
devcluster` is the command line.
"""

from devcluster.control_plane import DevCluster, DevClusterError

__all__ = ["DevCluster", "DevClusterError"]
