"""The KV block pool: allocation, growth, release, accounting."""

import pytest

from model_runtime.engine.block_manager import BlockManager

pytestmark = pytest.mark.unit


def test_grow_allocates_whole_blocks_and_accounts_usage():
    bm = BlockManager(num_blocks=8, block_size=4)
    table: list[int] = []
    assert bm.grow(table, 5)  # 5 tokens -> 2 blocks
    assert len(table) == 2 and len(set(table)) == 2
    assert bm.num_free_blocks == 6 and bm.usage == pytest.approx(2 / 8)
    assert bm.grow(table, 8)  # still 2 blocks
    assert len(table) == 2
    assert bm.grow(table, 9)
    assert len(table) == 3 and bm.num_used_blocks == 3


def test_grow_refuses_without_partial_allocation():
    bm = BlockManager(num_blocks=3, block_size=4)
    a: list[int] = []
    assert bm.grow(a, 8)
    b: list[int] = []
    assert not bm.grow(b, 8)  # needs 2, 1 free
    assert b == [] and bm.num_free_blocks == 1
    assert bm.can_grow(b, 4) and not bm.can_grow(b, 5)


def test_release_returns_blocks_and_detects_double_free():
    bm = BlockManager(num_blocks=4, block_size=2)
    a: list[int] = []
    b: list[int] = []
    bm.grow(a, 4)
    bm.grow(b, 4)
    assert bm.usage == 1.0
    blocks_of_a = list(a)
    bm.release(a)
    assert a == [] and bm.num_free_blocks == 2
    assert bm.grow(a, 3) and sorted(a) == sorted(blocks_of_a)  # reused
    bm.release(a)
    bm.release(b)
    assert bm.usage == 0.0
    with pytest.raises(RuntimeError, match="released twice"):
        bm.release(blocks_of_a)


def test_distinct_tables_never_share_a_block():
    bm = BlockManager(num_blocks=10, block_size=1)
    tables = [[] for _ in range(4)]
    for i, t in enumerate(tables):
        assert bm.grow(t, i + 1)
    flat = [b for t in tables for b in t]
    assert len(flat) == len(set(flat)) == 10 and bm.num_free_blocks == 0
    assert not bm.grow([], 1)
