"""Repository-wide rules the suite itself depends on."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique_across_tiers():
    # The tiers are plain folders (no __init__.py): pytest imports test modules by basename, so two
    # tiers holding test_x.py make the whole session fail at collection.
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
