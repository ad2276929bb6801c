"""Paged KV cache accounting: a pool of fixed-size blocks, per-sequence block tables, and the
prefix cache over them.

A sequence's block table lists the physical blocks that hold its tokens in order; token p lives in
block `table[p // block_size]` at offset `p % block_size`. The manager only counts and hands out
block ids; the cache tensors themselves belong to the model (`allocate_kv_cache`).

Prefix caching (vLLM's automatic prefix caching, `enable_prefix_caching`): a full block whose
keys/values have been computed is registered under its hash, which chains the hash of the block
before it with the block's token ids (`hash_blocks`), so one hash names one whole prefix. A new
sequence takes the longest run of cached blocks that starts its tokens (`cached_prefix`), shares
them (each block counts its holders) and computes only the tokens after them. Shared blocks are
never written: a sequence writes from its first uncached token on, which lies past them. A block
whose last holder lets go keeps its keys/values and its hash, and waits as evictable; blocks are
handed out from the never-cached free ones first, then by evicting the least recently released
cached block. Evictable blocks count as free (`num_free_blocks`, `usage`).

Hashes are SHA-256 (a collision would silently serve another prompt's keys/values; Python's
`hash` of a tuple is 64 bits and predictable). The model revision is one per process, so it is
not part of the hash.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def hash_blocks(token_ids: list[int], block_size: int, hashes: list[bytes]) -> list[bytes]:
    """Extend `hashes` (the hashes of `token_ids`' first full blocks, in order) to every full block
    of `token_ids`, and return it. Each hash covers the block's tokens and, through its parent's
    hash, every token before them."""
    for i in range(len(hashes), len(token_ids) // block_size):
        h = hashlib.sha256(hashes[i - 1] if i else b"")
        h.update(array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes())
        hashes.append(h.digest())
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of at least one token (got {num_blocks} x {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # a stack of blocks that hold nothing reusable: the most recently freed is reused first
        # (its memory is warm in the cache)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # cached blocks no sequence holds, least recently released first: evicted in this order
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_blocks  # sequences holding each block
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash -> the block holding that prefix's last block

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: never-cached free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or evictable."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks in use, 0..1 (evictable cached blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks to add to `block_table` so that it holds `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= self.num_free_blocks

    # -- the prefix cache ---------------------------------------------------------------------------

    def cached_prefix(self, block_hashes: list[bytes], max_blocks: int) -> list[int]:
        """The cached blocks that hold the longest prefix of these block hashes, at most
        `max_blocks` of them (none with prefix caching off). Changes nothing: `grow(...,
        cached=...)` takes them."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for h in block_hashes[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def cache_full_blocks(self, block_table: list[int], block_hashes: list[bytes], start: int, end: int) -> None:
        """Register `block_table[start:end]` (full blocks whose keys/values are computed) under
        their hashes. A hash already cached keeps its block: the other copy stays private to its
        sequence and is freed as a plain block."""
        if not self.enable_prefix_caching:
            return
        for i in range(start, end):
            h, block = block_hashes[i], block_table[i]
            if h not in self._cached and self._hash_of[block] is None:
                self._cached[h] = block
                self._hash_of[block] = h

    # -- tables -------------------------------------------------------------------------------------

    def grow(self, block_table: list[int], num_tokens: int, cached: list[int] | None = None) -> bool:
        """Extend `block_table` in place to hold `num_tokens`; False (and no change) if the pool is
        short. `cached` (from `cached_prefix`, for an empty table) are shared as the table's first
        blocks."""
        cached = cached or []
        if cached and block_table:
            raise ValueError("cached prefix blocks can only start an empty block table")
        need = max(0, self.blocks_for(num_tokens) - len(cached) - len(block_table))
        revived = sum(1 for b in cached if self._refs[b] == 0)  # evictable now, held once taken
        if need > self.num_free_blocks - revived:
            return False
        for block in cached:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            block_table.append(block)
        for _ in range(need):
            block = self._take_free()
            self._refs[block] = 1
            block_table.append(block)
        return True

    def release(self, block_table: list[int]) -> None:
        """Let go of every block of `block_table` and empty the table. A block no one else holds
        becomes free, or evictable if it is cached; the table's last blocks are evicted first (a
        longer prefix is less likely to be asked for again)."""
        for block in reversed(block_table):
            if self._refs[block] == 0:
                raise RuntimeError(f"block {block} released twice")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash_of[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)  # the least recently released
        del self._cached[self._hash_of[block]]
        self._hash_of[block] = None
        return block
