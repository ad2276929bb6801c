"""The `cluster` fixture: one devcluster (with Prometheus and Alertmanager) for the whole session;
`plain_cluster` the same devcluster without adding them (a module whose tests need neither makes its
`cluster` that one).

It reuses a devcluster that is already running (`python -m devcluster up --monitoring`) and stops,
at the end, only what it started itself; DEVCLUSTER_KEEP=1 leaves it running for the next run.
"""

import uuid

import pytest

from devcluster.testing import running_cluster


@pytest.fixture(scope="session")
def cluster():
    with running_cluster(monitoring=True) as running:
        yield running


@pytest.fixture(scope="session")
def plain_cluster():
    """The devcluster, without adding Prometheus and Alertmanager (a running cluster, with or
    without them, is reused; one started here stays up for the session)."""
    with running_cluster(monitoring=False) as running:
        yield running


@pytest.fixture
def namespace(cluster):
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
