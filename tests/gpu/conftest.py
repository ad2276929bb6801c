"""GPU tier: the runtime tier's `ServerProcess`, reused."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "runtime_tier_conftest", Path(__file__).resolve().parents[1] / "runtime" / "conftest.py"
)
_runtime = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_runtime)


@pytest.fixture(scope="session")
def server_process():
    return _runtime.ServerProcess
