"""Suite-wide wiring: each test's tier marker follows the folder it lives in.

`pytest -m unit|runtime|cluster|e2e` selects a tier; modules may still mark themselves explicitly.
"""

from pathlib import Path

import pytest

TIERS = ("unit", "runtime", "cluster", "e2e")
TESTS_ROOT = Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:
        try:
            tier = Path(item.fspath).relative_to(TESTS_ROOT).parts[0]
        except ValueError:
            continue
        if tier in TIERS and not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))
