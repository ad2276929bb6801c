"""The model <-> engine interface for one step over a paged KV cache.

The engine owns the block allocator and builds one `PagedBatch` per step (`build_paged_batch`);
the model (`Transformer.forward_paged`) writes the new tokens' keys/values (or MLA latents) at
`slot_mapping` and attends over each sequence's context through its block table.

Legend: N new tokens in this step (all sequences, flattened), S sequences, B_max blocks per
sequence (padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    """One engine step: the new tokens of S sequences, flattened to N tokens."""

    positions: torch.Tensor  # [N] long: absolute position of each new token
    slot_mapping: torch.Tensor  # [N] long: flat KV slot (block * block_size + offset) each new token writes
    block_tables: torch.Tensor  # [S, B_max] long: physical block ids of each sequence (pad with 0)
    context_lens: torch.Tensor  # [S] long: tokens in the cache for each sequence after this step's writes
    query_start: torch.Tensor  # [S + 1] long: cumulative count of new tokens per sequence (cu_seqlens)
    logits_indices: torch.Tensor  # [S] long: index into N of the token whose logits are wanted
    block_size: int

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: torch.device | str) -> PagedBatch:
        """The same batch with every tensor on `device`."""
        return PagedBatch(
            positions=self.positions.to(device),
            slot_mapping=self.slot_mapping.to(device),
            block_tables=self.block_tables.to(device),
            context_lens=self.context_lens.to(device),
            query_start=self.query_start.to(device),
            logits_indices=self.logits_indices.to(device),
            block_size=self.block_size,
        )


def build_paged_batch(
    seqs: list[tuple[list[int], int, int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> PagedBatch:
    """A PagedBatch for sequences given as (block ids, tokens already cached, new tokens).

    The new tokens of each sequence occupy positions `cached .. cached + new - 1` and write the
    slots their positions map to through its blocks. The engine builds each step's batch so.
    """
    positions: list[int] = []
    slots: list[int] = []
    lens: list[int] = []
    starts = [0]
    tables = []
    max_blocks = max((len(blocks) for blocks, _, _ in seqs), default=1) or 1
    for blocks, num_cached, num_new in seqs:
        ctx = num_cached + num_new
        if ctx > len(blocks) * block_size or num_new < 1:
            raise ValueError(f"{len(blocks)} blocks of {block_size} cannot hold {ctx} tokens (new {num_new})")
        if num_new == 1:  # a decode: one position
            positions.append(num_cached)
            slots.append(blocks[num_cached // block_size] * block_size + num_cached % block_size)
        else:
            positions.extend(range(num_cached, ctx))
            slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(num_cached, ctx))
        lens.append(ctx)
        starts.append(starts[-1] + num_new)
        tables.append(list(blocks) + [0] * (max_blocks - len(blocks)))

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    return PagedBatch(
        positions=t(positions),
        slot_mapping=t(slots),
        block_tables=t(tables).reshape(len(seqs), max_blocks),
        context_lens=t(lens),
        query_start=t(starts),
        logits_indices=t([q - 1 for q in starts[1:]]),
        block_size=block_size,
    )
