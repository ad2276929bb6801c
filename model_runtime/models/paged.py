"""One step over a paged KV cache: what the engine hands the model, and how attention reads the cache.

The engine owns the block allocator and builds one `PagedBatch` per step (`build_paged_batch`);
the model (`Transformer.forward_paged`) derives the step's index tensors once (`PagedContext`),
and each layer writes the new tokens' keys/values (or MLA latents) at `slot_mapping` and attends
over each sequence's context through its block table (`paged_attention`).

Legend: N new tokens in this step (all sequences, flattened), S sequences, B_max blocks per
sequence (padded), Q new tokens per sequence (padded), L context length (padded), H heads, K kv
heads, E head dim of q and k, Ev of v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


# ---- attending through the cache (every layer of one step) -----------------------------------


@dataclass
class PagedContext:
    """forward_paged(): index tensors shared by every layer of one step."""

    slot_mapping: torch.Tensor  # [N] cache slot each new token writes
    context_slots: torch.Tensor  # [S, L] cache slot of each context position
    mask: torch.Tensor  # [S, 1, Q, L] bool: query may attend key
    token_seq: torch.Tensor | None  # [N] sequence of each new token (None: every sequence has Q new tokens)
    token_offset: torch.Tensor | None  # [N] index of each new token among its sequence's new tokens
    num_seqs: int  # S
    max_new: int  # Q

    @classmethod
    def build(cls, batch: PagedBatch, sliding_window: int | None) -> PagedContext:
        S = batch.context_lens.shape[0]
        N = batch.positions.shape[0]
        new_lens = batch.query_start[1:] - batch.query_start[:-1]  # [S]
        Q, L = torch.stack([new_lens.max(), batch.context_lens.max()]).tolist()  # one host sync per step
        device = batch.positions.device
        pos = torch.arange(L, device=device)  # [L]
        bs = batch.block_size
        context_slots = batch.block_tables[:, pos // bs] * bs + pos % bs  # [S, L]
        if N == S * Q:  # every sequence brings Q new tokens (decode: Q == 1): a plain view
            token_seq = token_offset = None
            q_pos = batch.positions.view(S, Q)  # [S, Q]
        else:
            token_seq = torch.repeat_interleave(
                torch.arange(S, device=device), new_lens, output_size=N
            )  # [N]
            token_offset = torch.arange(N, device=device) - batch.query_start[token_seq]  # [N]
            q_pos = torch.zeros(S, Q, dtype=torch.long, device=device)  # padding queries see key 0 only
            q_pos[token_seq, token_offset] = batch.positions
        mask = pos[None, None, :] <= q_pos[:, :, None]  # [S, Q, L] causal; also hides other sequences' tails
        if sliding_window is not None:
            mask &= pos[None, None, :] > q_pos[:, :, None] - sliding_window
        return cls(batch.slot_mapping, context_slots, mask[:, None], token_seq, token_offset, S, Q)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] new-token rows -> [S, Q, ...] per sequence (zeros where padded)."""
        if self.token_seq is None:
            return x.view(self.num_seqs, self.max_new, *x.shape[1:])
        out = x.new_zeros(self.num_seqs, self.max_new, *x.shape[1:])
        out[self.token_seq, self.token_offset] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[S, Q, ...] -> [N, ...]"""
        if self.token_seq is None:
            return x.reshape(-1, *x.shape[2:])
        return x[self.token_seq, self.token_offset]


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [slots, ...] rows at slots [S, L] -> [S, L, ...].

    index_select on the flattened slots: ~2.5x faster on the CPU than advanced indexing.
    """
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: PagedContext, scale: float
) -> torch.Tensor:
    """New tokens attend their sequence's cached context.

    q [N, H, E]; k [S, L, K, E] and v [S, L, K, Ev] gathered through the block tables -> [N, H, Ev].
    """
    qs = ctx.pad(q)  # [S, Q, H, E]
    if ctx.max_new == 1 or k.shape[2] == 1:  # decode, or MLA's one latent head: no expanded copies
        return ctx.unpad(grouped_attention(qs, k, v, ctx.mask, scale))
    qs, k, v = qs.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [S, H|K, Q|L, E]
    out = F.scaled_dot_product_attention(
        qs, k, v, attn_mask=ctx.mask, scale=scale, enable_gqa=qs.shape[1] != k.shape[1]
    )  # [S, H, Q, Ev]
    return ctx.unpad(out.transpose(1, 2))  # [N, H, Ev]


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention as two batched matmuls, the Q new tokens and the G = H / K query heads of each kv
    head stacked into one matrix: every cached key and value is read once, never expanded per
    head (scaled_dot_product_attention copies them for GQA, and its CPU dispatch is far slower
    for single-query shapes). With one kv head (MLA) or one new token the stacking is a view.

    q [S, Q, H, E]; k [S, L, K, E]; v [S, L, K, Ev]; mask [S, 1, Q, L] -> [S, Q, H, Ev]
    """
    S, Q, H, E = q.shape
    K = k.shape[2]
    G = H // K  # query head h reads kv head h // G
    qg = q.view(S, Q, K, G, E).transpose(1, 2).reshape(S, K, Q * G, E)  # [S, K, Q*G, E]
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale  # [S, K, Q*G, L]
    scores = scores.view(S, K, Q, G, -1).masked_fill(~mask[:, :, :, None], float("-inf"))  # [S, K, Q, G, L]
    probs = scores.softmax(dim=-1).to(v.dtype).view(S, K, Q * G, -1)  # [S, K, Q*G, L]
    out = torch.matmul(probs, v.transpose(1, 2))  # [S, K, Q*G, Ev]
    return out.view(S, K, Q, G, -1).transpose(1, 2).reshape(S, Q, H, -1)  # [S, Q, H, Ev]
