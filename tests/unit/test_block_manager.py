"""The KV block pool: allocation, growth, release, accounting."""

import pytest

from model_runtime.engine.block_manager import BlockManager, hash_blocks

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


# -- prefix caching ---------------------------------------------------------------------------------


def test_a_block_hash_names_the_whole_prefix_up_to_it():
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7], 2, [])
    assert len(a) == 3  # full blocks only: the 7th token waits for its block to fill
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 2, list(a))[:3] == a  # extended, never changed
    b = hash_blocks([9, 9, 3, 4, 5, 6], 2, [])
    assert b[0] != a[0] and b[1] != a[1] and b[2] != a[2]  # same tokens, another prefix: another hash
    assert hash_blocks([1, 2, 3, 4, 5, 6], 2, []) == a
    assert hash_blocks([1, 2, 3, 4], 4, [])[0] != a[1]  # one block of 4 is not two chained blocks of 2


def cached_table(bm: BlockManager, tokens: list[int]) -> list[int]:
    """A sequence's table for `tokens`, computed and registered (as the scheduler does)."""
    hashes = hash_blocks(tokens, bm.block_size, [])
    table: list[int] = []
    cached = bm.cached_prefix(hashes, (len(tokens) - 1) // bm.block_size)
    assert bm.grow(table, len(tokens), cached=cached)
    bm.cache_full_blocks(table, hashes, len(cached), len(hashes))
    return table


def test_shared_blocks_are_counted_and_stay_cached_when_released():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    first = cached_table(bm, [1, 2, 3, 4, 5])
    second = cached_table(bm, [1, 2, 3, 4, 9])
    assert second[:2] == first[:2] and second[2] != first[2]  # the two full blocks, shared
    assert bm.num_used_blocks == 4 and bm.num_cached_blocks == 2
    shared = second[:2]
    bm.release(first)
    assert bm.num_used_blocks == 3  # the shared blocks are still held by `second`
    bm.release(list(second))
    assert bm.usage == 0.0 and bm.num_free_blocks == 6 and bm.num_cached_blocks == 2  # evictable
    third = cached_table(bm, [1, 2, 3, 4, 5, 6])
    assert third[:2] == shared
    bm.release(list(third))
    with pytest.raises(RuntimeError, match="released twice"):
        bm.release(second)


def test_the_last_token_is_never_taken_from_the_cache():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    first = cached_table(bm, [1, 2, 3, 4])
    hashes = hash_blocks([1, 2, 3, 4], 2, [])
    assert bm.cached_prefix(hashes, 2) == first  # both blocks are cached ...
    assert bm.cached_prefix(hashes, (4 - 1) // 2) == first[:1]  # ... a sequence of 4 tokens takes one


def test_evictable_blocks_go_least_recently_released_first_and_after_free_ones():
    bm = BlockManager(num_blocks=4, block_size=1, enable_prefix_caching=True)
    a, b = cached_table(bm, [1, 2]), cached_table(bm, [3, 4])  # two cached blocks each
    bm.release(list(a))
    bm.release(list(b))
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4
    big: list[int] = []
    assert bm.grow(big, 1)  # nothing free but cached blocks: a's last, least recently released
    assert big == [a[1]] and bm.cached_prefix(hash_blocks([1, 2], 1, []), 2) == [a[0]]
    assert bm.grow(big, 3)
    assert big == [a[1], a[0], b[1]] and bm.num_cached_blocks == 1


def test_prefix_caching_off_caches_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    table = cached_table(bm, [1, 2, 3, 4, 5])
    bm.release(table)
    assert bm.num_cached_blocks == 0 and bm.cached_prefix(hash_blocks([1, 2, 3, 4], 2, []), 2) == []


def test_cached_blocks_only_start_an_empty_table():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    table = cached_table(bm, [1, 2, 3])
    with pytest.raises(ValueError, match="empty block table"):
        bm.grow(table, 6, cached=[table[0]])
