"""The `cluster` fixture: one devcluster (with Prometheus and Alertmanager) for the whole session.

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


@pytest.fixture
def namespace(cluster):
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
