"""Paged KV cache accounting: a pool of fixed-size blocks, a free list, per-sequence block tables.

A sequence's block table lists the physical blocks that hold its tokens in order; token p lives in
block `table[p // block_size]` at offset `p % block_size`. The manager only counts and hands out
block ids; the cache tensors themselves belong to the model (`allocate_kv_cache`).
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of at least one token (got {num_blocks} x {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        # a stack: the most recently freed block is reused first (its memory is warm in the cache)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._in_use = bytearray(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks in use, 0..1."""
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
        return self.blocks_needed(block_table, num_tokens) <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend `block_table` in place to hold `num_tokens`; False (and no change) if the pool is short."""
        need = self.blocks_needed(block_table, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.pop()
            self._in_use[block] = 1
            block_table.append(block)
        return True

    def release(self, block_table: list[int]) -> None:
        """Return every block of `block_table` to the pool and empty the table."""
        for block in reversed(block_table):
            if not self._in_use[block]:
                raise RuntimeError(f"block {block} released twice")
            self._in_use[block] = 0
            self._free.append(block)
        block_table.clear()
