"""One Transformer for Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3.

What differs between them is a small part chosen by ModelConfig: GQA or MLA attention, the
router's scoring and top-k, shared experts, dense layers.

Every layer works on a flat list of N tokens. `forward(input_ids)` flattens a [B, T] batch and
attends causally without a cache; `forward_paged` takes one engine step (models/paged.py) and
attends through each sequence's block table over a paged KV cache.

The CPU's batch-1 decode kernels and int8 quantization are transforms applied to a built model
(model_runtime.kernels); nothing here knows them.

Built with a `Shard` (model_runtime.distributed), a model is one rank's part of a tensor / expert
parallel replica: each layer holds only its heads, rows and experts, its attention and feed-forward
outputs are partial sums, and the block completes each with one all-reduce (`comm`). Embedding,
norms, routers and lm_head are replicated. Without a shard (world 1) nothing is reduced.

Legend
    B batch          T tokens per sequence       N tokens in the step (flattened)
    S sequences      Q new tokens per sequence (padded)      L context length (padded)
    D hidden         H heads        K kv heads      Dh head dim         V vocab
    E experts        A experts per token            I expert hidden
    C MLA kv latent  R rope dim     P no-rope q/k dim       Dv value dim
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_runtime.distributed.shard import Shard
from model_runtime.kernels import paged_attention as paged_kernel
from model_runtime.kernels import shapes
from model_runtime.models.config import ModelConfig
from model_runtime.models.paged import PagedBatch

SINGLE = Shard()

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32, cast back before the weight (as transformers does); one fused op
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


# ---- rotary position embedding -----------------------------------------------------------------


def rope_frequencies(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R / 2] and the factor cos/sin are scaled by (YaRN's attention factor)."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type != "yarn":
        return inv_freq, 1.0
    original_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or cfg.max_position_embeddings / original_len
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [N, H, R] by position; cos, sin [N, R/2].

    Interleaved (DeepSeek) rotates pairs (x0, x1), (x2, x3), ...; otherwise (x_i, x_{i+R/2}). The
    result is laid out half-split either way: q and k get the same layout, so q.k is unchanged.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # [N, H, R/2]
    else:
        x1, x2 = x.chunk(2, dim=-1)  # [N, H, R/2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [N, 1, R/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # [N, H, R]


# ---- how a step attends: no cache (whole sequences) or through the paged cache ---------------


@dataclass
class DenseContext:
    """forward(): B sequences of T tokens each, flattened to N = B * T, no cache."""

    batch: int  # B
    seq_len: int  # T


@dataclass
class PagedContext:
    """forward_paged(): index tensors shared by every layer of one step."""

    slot_mapping: torch.Tensor  # [N] cache slot each new token writes
    q_pos: torch.Tensor  # [S, Q] position of each new token (a padding query: 0)
    padded_context: int  # L: the longest context padded to whole blocks
    token_seq: torch.Tensor | None  # [N] sequence of each new token (None: every sequence has Q new tokens)
    token_offset: torch.Tensor | None  # [N] index of each new token among its sequence's new tokens
    num_seqs: int  # S
    max_new: int  # Q
    max_context: int  # the longest sequence's context (L is this padded to whole blocks)
    block_tables: torch.Tensor  # [S, B] physical blocks of each sequence (decode reads them in place)
    context_lens: torch.Tensor  # [S] tokens in the cache per sequence, this step's included
    query_start: torch.Tensor  # [S + 1] cumulative count of new tokens per sequence (PagedBatch's)
    block_size: int
    sliding_window: int | None
    # A mixed step (decodes first, then prefill chunks, as the scheduler orders them): the
    # decodes' context and the prefill chunks' context, for attention that reads the decodes'
    # cache in place rather than padding every sequence to the longest chunk (None: not mixed).
    split: tuple[PagedContext, PagedContext] | None = None

    @classmethod
    def build(cls, batch: PagedBatch, sliding_window: int | None) -> PagedContext:
        S = batch.context_lens.shape[0]
        N = batch.positions.shape[0]
        new_lens = batch.query_start[1:] - batch.query_start[:-1]  # [S]
        # how many leading sequences bring one token (a mixed step's decodes, as the scheduler
        # orders them), learnt in the same host sync; a step of N == S tokens is all decodes
        leading = new_lens.max() if N == S else torch.where(new_lens != 1, torch.arange(S, device=new_lens.device), S).min()
        Q, L, decodes = torch.stack([new_lens.max(), batch.context_lens.max(), leading]).tolist()  # one host sync per step
        device = batch.positions.device
        bs = batch.block_size
        # The context padded to whole blocks (the mask hides the tail; the longest sequence holds
        # those blocks): attention's shapes then change once per block_size decode steps, not at
        # every step, and oneDNN's bfloat16 matmuls on the CPU, which build a kernel per shape
        # (~0.25 ms each), hit their cache.
        max_context, L = L, -(-L // bs) * bs
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
        split = None
        if token_seq is not None and 0 < decodes < S:  # mixed: the decodes read the cache in place
            split = (
                cls.build(_seqs_of(batch, 0, decodes), sliding_window),
                cls.build(_seqs_of(batch, decodes, S), sliding_window),
            )
        return cls(
            batch.slot_mapping,
            q_pos,
            L,
            token_seq,
            token_offset,
            S,
            Q,
            max_context,
            batch.block_tables,
            batch.context_lens,
            batch.query_start,
            bs,
            sliding_window,
            split,
        )

    # What only the gathered path reads, built on its first use: a step whose attention reads the
    # cache in place (the CPU's C kernels, the GPU's Triton ones) never builds them; on a GPU the
    # mask of a long prefill is S x Q x L bytes.
    @functools.cached_property
    def context_slots(self) -> torch.Tensor:
        """[S, L] cache slot of each context position (the padded tail: the last block's slots)."""
        bs = self.block_size
        pos = torch.arange(self.padded_context, device=self.block_tables.device)  # [L]
        return self.block_tables[:, pos // bs] * bs + pos % bs

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[S, 1, Q, L] bool: query may attend key (causal, which also hides other sequences'
        tails; within the sliding window)."""
        pos = torch.arange(self.padded_context, device=self.q_pos.device)  # [L]
        mask = pos[None, None, :] <= self.q_pos[:, :, None]  # [S, Q, L]
        if self.sliding_window is not None:
            mask &= pos[None, None, :] > self.q_pos[:, :, None] - self.sliding_window
        return mask[:, None]

    def split_in_place(self, q: torch.Tensor, cache: torch.Tensor) -> tuple[PagedContext, PagedContext] | None:
        """(the decodes' context, the prefill chunks' context) when this is a mixed step whose
        decodes read the cache in place (the first decodes.num_seqs rows of q are theirs), else
        None: attention then runs once over the whole step."""
        if self.split is None or not self.split[0].in_place_decode(q, cache):
            return None
        return self.split

    def in_place_decode(self, q: torch.Tensor, cache: torch.Tensor) -> bool:
        """Whether this step's attention reads the cache in place: one new token per sequence, on
        the CPU the C kernel loaded (kernels/paged_attention.py), on CUDA the Triton kernel
        (kernels/triton_attention.py)."""
        return paged_kernel.applies(q, cache, self.max_new, self.token_seq is None)

    def decode_in_place(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scale: float,
        out: torch.Tensor | None = None,
        q_rope: torch.Tensor | None = None,
    ):
        """q [S, H, E]; keys [slots, K, E], values [slots, K, Ev] views of the cache -> [S, H, Ev]
        (written into `out` when given, any strides with rows contiguous; with `q_rope` [S, H, E2]
        the queries' last E2 columns, apart)."""
        return paged_kernel.decode(
            q, keys, values, self.block_tables, self.context_lens, self.block_size, scale, self.sliding_window,
            out, q_rope,
        )  # fmt: skip

    def in_place_prefill(self, q: torch.Tensor, cache: torch.Tensor) -> bool:
        """Whether this step's attention of several new tokens per sequence reads the cache in
        place (kernels/paged_attention.py: prefill): bfloat16 on a CPU with AVX512-BF16, the
        kernel loaded; on CUDA the Triton kernel (MLA's expanded prefill asks
        paged_kernel.prefill_expanded_applies)."""
        return paged_kernel.prefill_applies(q, cache)

    def prefill_in_place(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """q [N, H, E] (rotated) of the step's new tokens; keys [slots, K, E], values [slots, K, Ev]
        views of the cache holding them -> [N, H, Ev]."""
        return paged_kernel.prefill(
            q, keys, values, self.block_tables, self.context_lens, self.query_start, self.block_size, scale,
            self.sliding_window, max_new=self.max_new,
        )  # fmt: skip

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


def _seqs_of(batch: PagedBatch, first: int, stop: int) -> PagedBatch:
    """Sequences first .. stop - 1 of a step, as a step of their own (their new tokens are rows
    query_start[first] .. query_start[stop] - 1 of the step's)."""
    t0, t1 = batch.query_start[first], batch.query_start[stop]
    return PagedBatch(
        positions=batch.positions[t0:t1],
        slot_mapping=batch.slot_mapping[t0:t1],
        block_tables=batch.block_tables[first:stop],
        context_lens=batch.context_lens[first:stop],
        query_start=batch.query_start[first : stop + 1] - t0,
        logits_indices=batch.logits_indices[first:stop] - t0,
        block_size=batch.block_size,
    )


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: DenseContext, scale: float, window: int | None
) -> torch.Tensor:
    """Causal attention within each sequence. q [N, H, E], k [N, K, E], v [N, K, Ev] -> [N, H, Ev]."""
    B, T = ctx.batch, ctx.seq_len
    q, k, v = (t.view(B, T, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))  # [B, H|K, T, E]
    mask = None
    if window is not None:
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # [T, T]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )  # [B, H, T, Ev]
    return out.transpose(1, 2).reshape(B * T, q.shape[1], v.shape[-1])  # [N, H, Ev]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, q [B, H, Q, E], k [B, K, L, E], v [B, K, L, Ev] -> [B, H, Q,
    Ev], GQA when K < H. On the CPU values narrower than the keys (MLA expanded: Ev 128 against
    E 192 in DeepSeek-V3) are padded with zeros to E: torch's fused CPU kernel takes only equal
    head dims, and its fallback (the math kernel: scores, mask, softmax as separate ops and copies)
    took 6.8 ms where the padded fused call takes 1.2 (32 sequences x 32 tokens, 8 heads, E 96,
    Ev 32, bfloat16, one thread)."""
    E, Ev = q.shape[-1], v.shape[-1]
    pad = E - Ev if q.device.type == "cpu" and Ev < E else 0
    out = F.scaled_dot_product_attention(
        q, k, F.pad(v, (0, pad)) if pad else v, enable_gqa=q.shape[1] != k.shape[1], **kwargs
    )
    return out[..., :Ev] if pad else out


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
    out = sdpa(qs, k, v, attn_mask=ctx.mask, scale=scale)  # [S, H, Q, Ev]
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


# ---- attention variants ------------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query attention (Mixtral, Qwen-MoE), optional q/k RMSNorm (Qwen3) and qkv bias."""

    def __init__(self, cfg: ModelConfig, shard: Shard = SINGLE):
        super().__init__()
        self.cfg = cfg
        h0, h1 = shard.heads(cfg.num_attention_heads)
        k0, k1 = shard.kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads)
        self.num_heads, self.num_kv_heads = H, K = h1 - h0, k1 - k0  # this rank's
        Dh, D = cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, K * Dh, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, K * Dh, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.o_bias and shard.holds_bias_of_reduced_output)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps)
        self.scale = Dh**-0.5

    def forward(self, x, cos, sin, ctx, cache):
        cfg = self.cfg
        N = x.shape[0]
        qkv = shapes.fused(self, "qkv")  # one matmul (kernels/cpu_decode.py: fuse_projections)
        q, k, v = qkv(x) if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(N, self.num_heads, cfg.head_dim)  # [N, H, Dh]
        k = k.view(N, self.num_kv_heads, cfg.head_dim)  # [N, K, Dh]
        v = v.view(N, self.num_kv_heads, cfg.head_dim)  # [N, K, Dh]
        if cfg.qk_norm:  # the norms' kernel takes rows Dh apart: columns of a fused output are copied out
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        # bfloat16 on the CPU, one C call: q rotated in place, k rotated and v written into the cache
        written = cache is not None and paged_kernel.gqa_prepare(
            q, k, v, cos, sin, cache, ctx.slot_mapping, cfg.rope_interleave
        )
        if not written:
            q, k = apply_rope(q, cos, sin, cfg.rope_interleave), apply_rope(k, cos, sin, cfg.rope_interleave)
            if cache is not None:
                cache[0][ctx.slot_mapping] = k.to(cache.dtype)  # cache: [2, slots, K, Dh]
                cache[1][ctx.slot_mapping] = v.to(cache.dtype)
        if cache is None:
            out = dense_attention(q, k, v, ctx, self.scale, cfg.sliding_window)  # [N, H, Dh]
        else:
            if split := ctx.split_in_place(q, cache):  # a mixed step: the decodes in place, then the chunks
                n = split[0].num_seqs
                out = torch.cat([self.attend(q[:n], split[0], cache), self.attend(q[n:], split[1], cache)])
            else:
                out = self.attend(q, ctx, cache)
        return self.o_proj(out.reshape(N, -1))  # [N, D]

    def attend(self, q: torch.Tensor, ctx: PagedContext, cache: torch.Tensor) -> torch.Tensor:
        """q [N, H, Dh] (rotated) over the cache holding this step's keys and values -> [N, H, Dh]."""
        if ctx.in_place_decode(q, cache):
            return ctx.decode_in_place(q, cache[0], cache[1], self.scale)
        if ctx.in_place_prefill(q, cache):
            return ctx.prefill_in_place(q, cache[0], cache[1], self.scale)
        k_ctx = gather_slots(cache[0], ctx.context_slots).to(q.dtype)  # [S, L, K, Dh]
        v_ctx = gather_slots(cache[1], ctx.context_slots).to(q.dtype)
        return paged_attention(q, k_ctx, v_ctx, ctx, self.scale)  # [N, H, Dh]


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Keys and values come from a compressed latent c [C] (plus one rope key [R] shared by all heads);
    the paged cache keeps only (c, k_rope). Without a cache the latent is expanded into per-head keys
    and values; with the cache kv_b_proj is absorbed into the query and the output instead, so the
    cached latent is attended directly.
    """

    def __init__(self, cfg: ModelConfig, shard: Shard = SINGLE):
        super().__init__()
        self.cfg = cfg
        h0, h1 = shard.heads(cfg.num_attention_heads)
        D, H = cfg.hidden_size, h1 - h0  # this rank's heads
        self.num_heads = H
        P, R, C, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (P + R), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (P + R), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + R, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(C, 1e-6)
        self.kv_b_proj = nn.Linear(C, H * (P + Dv), bias=False)
        self.o_proj = nn.Linear(H * Dv, D, bias=cfg.o_bias and shard.holds_bias_of_reduced_output)
        self.scale = (P + R) ** -0.5
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):  # softmax mscale
            self.scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2

    def expands(self, num_seqs: int, max_new: int, context: int, new_tokens: int) -> bool:
        """Whether a step's attention over the cache (not a decode step's: that reads the cache in
        place) expands the context's latents into per-head keys and values rather than absorbing
        kv_b_proj into the queries and the output: whichever takes fewer multiply-adds on the
        padded shapes, S sequences of Q new tokens over L context tokens, N new tokens in all.
        Absorbed: each new token's query and output through kv_b_proj's halves (C (P + Dv) per
        head), then 2 (C + R) per query and context token and head (the latent row is both key and
        value). Expanded: C (P + Dv) per context token and head, then P + R + Dv per pair. A prefill
        (Q = L) always expands; a decode (Q = 1) over more than a few tokens absorbs."""
        cfg = self.cfg
        P, R, C, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        S, Q, L, N = num_seqs, max_new, context, new_tokens
        absorbed = N * C * (P + Dv) + S * Q * L * 2 * (C + R)
        expanded = S * L * C * (P + Dv) + S * Q * L * (P + R + Dv)
        return expanded < absorbed

    def absorbed_weights(self, dtype: torch.dtype, rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's key and value halves per head, w_uk [H, P, C] and w_uv transposed, w_uv_t
        [H, C, Dv], each contiguous; with `rows` the other way round, w_uk transposed [H, C, P] and
        w_uv [H, Dv, C] (each head's outputs as rows: the AMX kernel's operand, kernels/cpu_decode.py:
        amx_heads). As views of the weight they are strided across heads, and bmm
        copies such an operand at every call (for bfloat16 on the CPU ~0.2 ms a layer). Kept while the weight is
        the same tensor at the same address and version; an FP8 layer's dequantized weight is a
        new tensor at every call and is split afresh, as before. A float32 model's weight kept as
        bfloat16 (kernels/cpu_decode.py: narrow_linears) gives float32 halves, the same values."""
        cfg = self.cfg
        P, Dv, C = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        derived = getattr(self.kv_b_proj, "dequantized", None) is not None
        w = linear_weight(self.kv_b_proj, dtype)
        try:
            version = w._version
        except RuntimeError:  # an inference-mode tensor: no version counter
            version = None
        key = (w.data_ptr(), w.dtype, w.device, version)
        name = "_absorbed_rows" if rows else "_absorbed"
        cached = self.__dict__.get(name)  # (weight, key, halves); not a buffer: never saved
        if derived or cached is None or cached[0] is not w or cached[1] != key:
            w_kv = w.view(self.num_heads, P + Dv, C)
            uk, uv = (w_kv[:, :P].transpose(1, 2), w_kv[:, P:]) if rows else (w_kv[:, :P], w_kv[:, P:].transpose(1, 2))
            halves = uk.to(dtype).contiguous(), uv.to(dtype).contiguous()
            if derived:
                return halves
            cached = self.__dict__[name] = (w, key, halves)
        return cached[2]

    def latent_queries(self, q_nope: torch.Tensor) -> torch.Tensor:
        """The queries' no-rope part q_nope [N, H, P] in the latent space: q_nope @ w_uk per head
        -> [H, N, C]."""
        w_uk, _ = self.absorbed_weights(q_nope.dtype)  # [H, P, C]
        return torch.bmm(q_nope.transpose(0, 1), w_uk)

    def forward(self, x, cos, sin, ctx, cache):
        cfg = self.cfg
        N, H = x.shape[0], self.num_heads
        P, R, C, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(N, H, P + R)  # [N, H, P + R]
        kv = self.kv_a_proj_with_mqa(x)  # [N, C + R]

        if cache is None:  # expand the latent into per-head keys and values
            q_nope, q_rope = q.split([P, R], dim=-1)  # [N, H, P], [N, H, R]
            c, k_rope = kv.split([C, R], dim=-1)  # [N, C], [N, R]
            q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)
            k_rope = apply_rope(k_rope[:, None, :], cos, sin, cfg.rope_interleave)  # [N, 1, R]
            k_nope, v = self.kv_b_proj(self.kv_a_layernorm(c)).view(N, H, P + Dv).split([P, Dv], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(N, H, R)], dim=-1)  # [N, H, P + R]
            out = dense_attention(torch.cat([q_nope, q_rope], -1), k, v, ctx, self.scale, None)  # [N, H, Dv]
            return self.o_proj(out.reshape(N, H * Dv))

        self.write_latent(q, kv, cos, sin, ctx.slot_mapping, cache)  # and q's rope part rotated
        if split := ctx.split_in_place(q, cache):  # a mixed step: the decodes in place, then the chunks
            n = split[0].num_seqs
            return torch.cat([self.attend(q[:n], split[0], cache), self.attend(q[n:], split[1], cache)])
        return self.attend(q, ctx, cache)

    def attend(self, q: torch.Tensor, ctx: PagedContext, cache: torch.Tensor) -> torch.Tensor:
        """q [N, H, P + R] (its rope part rotated) over the cache holding this step's latents, then
        o_proj -> [N, D]."""
        cfg = self.cfg
        N, H = q.shape[:2]
        P, R, C, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        if ctx.in_place_decode(q, cache):  # one new token each
            return self.decode_in_place(q, ctx, cache)
        q_nope, q_rope = q.split([P, R], dim=-1)  # [N, H, P], [N, H, R]
        kv_ctx = gather_slots(cache, ctx.context_slots).to(q.dtype)  # [S, L, C + R]
        S, L = kv_ctx.shape[:2]
        if self.expands(S, ctx.max_new, L, N):  # a prefill: expanding the context is cheaper
            k_nope, v = self.kv_b_proj(kv_ctx[..., :C]).view(S, L, H, P + Dv).split([P, Dv], dim=-1)
            if paged_kernel.prefill_expanded_applies(q, cache, P):  # no concatenated keys, no padded values
                out = paged_kernel.prefill_expanded(q, k_nope, kv_ctx[..., C:], v, ctx.context_lens, ctx.query_start,
                                                    self.scale, ctx.sliding_window, max_new=ctx.max_new)  # fmt: skip
                return self.o_proj(out.reshape(N, H * Dv))
            k = torch.cat([k_nope, kv_ctx[:, :, None, C:].expand(S, L, H, R)], dim=-1)  # [S, L, H, P + R]
            out = paged_attention(torch.cat([q_nope, q_rope], -1), k, v, ctx, self.scale)  # [N, H, Dv]
            return self.o_proj(out.reshape(N, H * Dv))
        q_latent = self.latent_queries(q_nope).transpose(0, 1)  # [N, H, C]
        q_abs = torch.cat([q_latent, q_rope], dim=-1)  # [N, H, C + R]
        kv_ctx = kv_ctx[:, :, None, :]  # [S, L, 1, C + R]
        # the values are the latent: the whole cached row is passed and the rope columns of the
        # output dropped, since a [..., :C] view of the context would be copied into a dense
        # tensor (for bfloat16 on the CPU the larger cost of the step's attention)
        out_latent = paged_attention(q_abs, kv_ctx, kv_ctx, ctx, self.scale)[..., :C]  # [N, H, C]
        return self.absorbed_output(out_latent.transpose(0, 1))

    def absorbed_output(self, out_latent: torch.Tensor) -> torch.Tensor:
        """out_latent [H, N, C] @ w_uv_t [H, C, Dv], then o_proj -> [N, D]. On the CPU, one thread,
        1 to 256 tokens, this order is as fast as w_uv [H, Dv, C] @ out_latent^T or up to 4x faster
        (bfloat16, 32 tokens, Dv 32: 0.09 against 0.16 ms), float32 too."""
        N = out_latent.shape[1]
        _, w_uv_t = self.absorbed_weights(out_latent.dtype)  # [H, C, Dv]
        out = torch.bmm(out_latent, w_uv_t).transpose(0, 1)  # [N, H, Dv]
        return self.o_proj(out.reshape(N, -1))  # row-major rows (reshape copies; int8 kernels need them)

    def write_latent(self, q, kv, cos, sin, slots, cache) -> None:
        """The new tokens' cache rows, the normed latent and the rotated rope key of kv [N, C + R]
        (kv_a_proj_with_mqa's output), written at slots [N]; q [N, H, P + R]'s rope part rotated in
        place. bfloat16 or float32 on the CPU: one C call with torch's bits (kernels/paged_attention.py:
        mla_prepare; torch's ops for it are ~15 small calls, ~0.12 ms at 32 tokens); else torch's."""
        cfg = self.cfg
        P, R, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        norm = self.kv_a_layernorm
        if paged_kernel.mla_prepare(q, kv, cos, sin, norm.weight, norm.eps, cache, slots, cfg.rope_interleave):
            return
        c, k_rope = kv.split([C, R], dim=-1)  # [N, C], [N, R]
        k_rope = apply_rope(k_rope[:, None, :], cos, sin, cfg.rope_interleave)[:, 0]  # [N, R]
        cache[slots] = torch.cat([norm(c), k_rope], dim=-1).to(cache.dtype)  # cache: [slots, C + R]
        q[..., P:] = apply_rope(q[..., P:], cos, sin, cfg.rope_interleave)

    def decode_in_place(self, q, ctx, cache) -> torch.Tensor:
        """A decode step reading the cache in place (kernels/paged_attention.py), after
        write_latent: q [N, H, P + R] -> [N, D]. The kernel reads the queries' latent part
        (q_nope @ w_uk) and their rope part where they lie, and writes its output head-major, as
        the next bmm reads it."""
        cfg = self.cfg
        N, H = q.shape[:2]
        P, C = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        q_latent = self.latent_queries(q[..., :P])  # [H, N, C]
        rows = cache[:, None, :]  # [slots, 1, C + R]: the keys are whole rows, the values their latent
        out_latent = q.new_empty(H, N, C)  # [H, N, C]
        ctx.decode_in_place(
            q_latent.transpose(0, 1), rows, rows[..., :C], self.scale, out=out_latent.transpose(0, 1), q_rope=q[..., P:]
        )
        return self.absorbed_output(out_latent)


def linear_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight as a float matrix (an FP8 layer's dequantized)."""
    dequantized = getattr(linear, "dequantized", None)
    return dequantized(dtype) if dequantized is not None else linear.weight


# ---- feed-forward variants -----------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU; sharded, this rank's rows of the hidden layer (its output a partial sum)."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False, shard: Shard = SINGLE):
        super().__init__()
        r0, r1 = shard.rows(hidden)
        hidden = r1 - r0
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias and shard.holds_bias_of_reduced_output)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        gate_up = shapes.fused(self, "gate_up")  # one matmul (kernels/cpu_decode.py: fuse_projections)
        gate, up = gate_up(x) if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class Router(nn.Module):
    """Chooses A of E experts per token and their weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, A] (float32), expert ids [N, A]"""
        cfg = self.cfg
        N, E, A, G = x.shape[0], cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        if cfg.scoring_func == "softmax":
            scores = logits.softmax(dim=-1)  # [N, E]
            choice = scores
        else:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()  # the bias steers choice, not weight
        if cfg.topk_method == "group_limited_greedy":
            group_scores = choice.view(N, G, E // G).amax(dim=-1)  # [N, G]
            choice = self._keep_groups(choice, group_scores, 0.0)
        elif cfg.topk_method == "noaux_tc":
            group_scores = choice.view(N, G, E // G).topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            choice = self._keep_groups(choice, group_scores, float("-inf"))
        ids = choice.topk(A, dim=-1).indices  # [N, A]
        weights = scores.gather(1, ids)  # [N, A]
        if cfg.norm_topk_prob:
            weights = weights / (
                weights.sum(dim=-1, keepdim=True) + (1e-20 if cfg.scoring_func == "sigmoid" else 0)
            )
        return weights * cfg.routed_scaling_factor, ids

    def _keep_groups(self, choice: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        N, G = group_scores.shape
        keep_groups = group_scores.topk(self.cfg.topk_group, dim=-1).indices  # [N, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)  # [N, G]
        keep = keep[:, :, None].expand(N, G, choice.shape[1] // G).reshape(N, -1)  # [N, E]
        return choice.masked_fill(~keep, fill)


class Experts(nn.Module):
    """The routed experts this rank runs, with stacked weights; tokens grouped by expert, then two
    grouped GEMMs over all experts (`grouped`) or one matmul pair per expert.

    Expert parallel: experts [first, first + E_local) whole. Tensor parallel (or one rank): all E
    experts, this rank's rows of each one's intermediate layer. Either way the output is this
    rank's partial sum.
    """

    plain_weights = True  # gate_up_proj / down_proj are the float matrices (int8 and FP8 subclasses: no)
    # the dtype the experts compute in where their weights are stored narrower (a float32 model's
    # experts kept as the bfloat16 values they are: kernels/cpu_decode.py, narrow_experts); None:
    # the weights' own
    compute_dtype: torch.dtype | None = None

    def __init__(self, cfg: ModelConfig, shard: Shard = SINGLE):
        super().__init__()
        e0, e1 = shard.experts(cfg.num_experts)
        r0, r1 = shard.expert_rows(cfg.moe_intermediate_size)
        E, D, I = e1 - e0, cfg.hidden_size, r1 - r0  # noqa: E741 (legend)
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # gate rows then up rows
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.num_experts = cfg.num_experts  # routed experts in the model
        self.first_expert, self.num_local_experts = e0, E

    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert e (global first_expert + e) on its tokens x [n, D] -> [n, D] (int8
        quantization and the CPU decode kernels override this)."""
        gate, up = F.linear(x, self.expert_weight(self.gate_up_proj, e, x)).chunk(2, dim=-1)  # [n, I] each
        return F.linear(self.act(gate).mul_(up), self.expert_weight(self.down_proj, e, x))

    @staticmethod
    def expert_weight(stacked: torch.Tensor, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's matrix of `stacked` in x's dtype (widened where stored narrower)."""
        w = stacked[e]
        return w if w.dtype == x.dtype else w.to(x.dtype)

    def grouped(self, x: torch.Tensor) -> bool:
        """Whether this forward runs as two grouped GEMMs (torch's F.grouped_mm: one call per
        projection over every expert, no Python loop, no host sync) rather than a matmul pair per
        expert: when this rank holds every expert (one rank, or tensor parallel), the experts are
        plain float weights (not int8 / FP8 / the CPU's float32 decode kernels, which override
        expert_mlp), and the device has the kernel (the CPU; CUDA: bfloat16 on sm80+). An expert-
        parallel rank on CUDA groups its own experts' assignments the same way (local_grouped_forward:
        the loop would read the counts on the host, a device sync per layer); on the CPU such a rank
        keeps the loop, whose counts are host values already. On a CPU
        without AMX the engine stores bfloat16 / float16 expert weights column-major
        (kernels/cpu_decode.py: grouped_experts_layout): each expert's transposed weight is then
        row-major, which torch's CPU grouped GEMM reads about twice as fast. (Where the CPU has AMX
        the C kernel moe_amx_experts takes the bfloat16 experts instead: decision 32.)"""
        if not self.plain_weights:
            return False
        if self.num_local_experts != self.num_experts and x.device.type != "cuda":
            return False
        if x.device.type == "cpu":
            return x.dtype in (torch.bfloat16, torch.float16)  # float32 keeps MKL's per-expert sgemm
        if x.device.type == "cuda":  # its kernel wants 16-byte aligned rows
            D, I = self.down_proj.shape[1:]  # noqa: E741 (legend)
            aligned = D % 8 == 0 and I % 8 == 0
            return x.dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability(x.device) >= (8, 0)
        return False

    def grouped_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor):
        """All N * A assignments sorted by expert, each projection one grouped GEMM over the runs of
        the sorted rows (offsets from the counts, on the device), then unsorted and weighted."""
        N, A = ids.shape
        if self.num_local_experts != self.num_experts:
            return self.local_grouped_forward(x, weights, ids)
        order = ids.reshape(-1).argsort(stable=True)  # [N * A] assignments grouped by expert
        if shapes.buckets(x):  # each expert's run padded to a bucket: oneDNN builds its kernels once
            return self.padded_grouped_forward(x, weights, order, counts)
        offs = counts.cumsum(0).to(torch.int32)  # [E] end of each expert's run
        xs = x.index_select(0, order // A)  # [N * A, D]
        gate, up = F.grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)  # [N * A, I]
        ys = F.grouped_mm(self.act(gate).mul_(up), self.down_proj.transpose(-2, -1), offs=offs)  # [N * A, D]
        ys = torch.empty_like(ys).index_copy_(0, order, ys)  # [N * A, D] back in token order
        return (ys.view(N, A, -1) * weights.to(ys.dtype)[:, :, None]).sum(dim=1)  # [N, D]

    def local_grouped_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """grouped_forward on an expert-parallel rank, with no host sync: the assignments to this
        rank's experts sorted to the front by local expert, the others after the last offset, where
        the grouped GEMMs leave their rows unwritten (any bits, NaN too): those are masked out with
        torch.where, not multiplied by a zero weight. -> this rank's partial sum [N, D]."""
        N, A = ids.shape
        E = self.num_local_experts
        key = ids.reshape(-1) - self.first_expert  # [N * A] local expert of each assignment
        local = (key >= 0) & (key < E)
        key = torch.where(local, key, E)  # another rank's: after every local expert
        order = key.argsort(stable=True)  # [N * A]
        offs = torch.bincount(key, minlength=E + 1)[:E].cumsum(0).to(torch.int32)  # [E] end of each run
        xs = x.index_select(0, order // A)  # [N * A, D]
        gate, up = F.grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        ys = F.grouped_mm(self.act(gate).mul_(up), self.down_proj.transpose(-2, -1), offs=offs)  # [N * A, D]
        ys = torch.empty_like(ys).index_copy_(0, order, ys)  # back in assignment order
        ys = torch.where(local[:, None], ys, 0)
        return (ys.view(N, A, -1) * weights.to(ys.dtype)[:, :, None]).sum(dim=1)  # [N, D]

    def padded_grouped_forward(self, x, weights, order, counts):
        """grouped_forward on the CPU in bfloat16 / float16, each expert's run of rows padded with
        zero rows to its bucket (kernels/shapes.py): the grouped GEMM runs one oneDNN matmul per
        expert, and a row count it has not seen costs a kernel build (~1 ms) that a prefill's
        fresh counts would pay for nearly every expert."""
        N, A = weights.shape
        sizes = counts.tolist()  # on the CPU: no device sync
        padded = [shapes.padded_rows(n) if n else 0 for n in sizes]
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0)  # [E] first sorted row of each expert
        pstarts = torch.tensor([0] + padded[:-1]).cumsum(0)  # [E] its first padded row
        shift = torch.repeat_interleave(pstarts - starts, counts, output_size=N * A)  # [N * A]
        at = torch.empty_like(order).index_copy_(0, order, torch.arange(N * A) + shift)  # [N * A] padded row of each assignment
        xs = x.new_zeros(sum(padded), x.shape[1]).index_copy_(0, at, x.repeat_interleave(A, dim=0))  # [P, D]
        offs = torch.tensor(padded).cumsum(0).to(torch.int32)  # [E] end of each expert's padded run
        gate, up = F.grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)  # [P, I]
        ys = F.grouped_mm(self.act(gate).mul_(up), self.down_proj.transpose(-2, -1), offs=offs)  # [P, D]
        ys = ys.index_select(0, at)  # [N * A, D] in token order
        return (ys.view(N, A, -1) * weights.to(ys.dtype)[:, :, None]).sum(dim=1)  # [N, D]

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], weights/ids [N, A] -> (this rank's output [N, D], tokens per expert [E], all
        experts: the router is replicated)"""
        counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts)  # [E]
        if self.grouped(x):
            return self.grouped_forward(x, weights, ids, counts), counts
        return self.looped_forward(x, weights, ids, counts), counts

    def looped_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor):
        """This rank's partial sum [N, D] one expert at a time (expert_mlp), only the experts that
        got tokens: the counts read on the host."""
        N, A = ids.shape
        e0, e1 = self.first_expert, self.first_expert + self.num_local_experts
        flat_ids = ids.reshape(-1)  # [N * A]
        if N == 1:  # one token (batch-1 decode): its A experts in turn, nothing to group
            picked = [(i, e) for i, e in enumerate(flat_ids.tolist()) if e0 <= e < e1]
            if not picked:
                return torch.zeros_like(x)
            ys = torch.cat([self.expert_mlp(e - e0, x) for _, e in picked])  # [a, D]
            w = weights.reshape(A)[[i for i, _ in picked]].reshape(-1, 1).to(ys.dtype)
            return (ys * w).sum(0, keepdim=True)
        order = flat_ids.argsort(stable=True)  # [N * A] assignments grouped by expert
        local = counts.tolist()
        start = sum(local[:e0])  # this rank's experts' assignments are one contiguous run of `order`
        stop = start + sum(local[e0:e1])
        order = order[start:stop]
        token = order // A  # [n] token of each grouped assignment
        xs = x.index_select(0, token)  # [n, D] (index_select: faster than indexing on the CPU)
        w = weights.reshape(-1)[order, None].to(x.dtype)  # [n, 1]
        out = torch.zeros_like(x)
        start = 0
        for e in range(e0, e1):  # only the experts that got tokens are read
            n = local[e]
            if n:
                end = start + n
                ys = self.expert_mlp(e - e0, xs[start:end]).mul_(w[start:end])  # [n, D]
                out.index_add_(0, token[start:end], ys)
                start = end
        return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard = SINGLE):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg, shard)
        if cfg.shared_expert_intermediate_size:  # tensor-split, with or without expert parallelism
            self.shared_experts = MLP(
                cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act, cfg.mlp_bias, shard
            )
        if cfg.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)  # [N, A]
        out, counts = self.experts(x, weights, ids)  # [N, D]
        self.tokens_per_expert += counts
        if hasattr(self, "shared_experts"):
            shared = self.shared_experts(x)  # [N, D]
            if hasattr(self, "shared_expert_gate"):  # a per-token scalar: it scales partial sums too
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard = SINGLE, comm=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        attention = MLAttention if cfg.attention == "mla" else Attention
        self.self_attn = attention(cfg, shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg, shard)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, shard)
        self.comm = comm  # sums the ranks' partial outputs (None: one rank)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return partial if self.comm is None else self.comm.all_reduce(partial)

    def forward(self, x, cos, sin, ctx, cache):
        x = x + self.reduce(self.self_attn(self.input_layernorm(x), cos, sin, ctx, cache))
        return x + self.reduce(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard = SINGLE, comm=None):
        """The whole model, or with `shard` one rank's part of it (`comm` sums the ranks' partial
        outputs; it must be given when the shard has more than one rank)."""
        super().__init__()
        if shard.sharded and comm is None:
            raise ValueError("a sharded Transformer needs the replica's comm to sum partial outputs")
        self.config = cfg
        self.shard = shard
        self.comm = comm
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, shard, comm) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.rope_dim // 2), persistent=False)
        self.rope_attention_factor = 1.0
        self.init_buffers()

    def init_buffers(self) -> None:
        """Compute the non-persistent buffers (rope frequencies, expert counters) on the model's device.

        Needed after building on the meta device and assigning the real weights.
        """
        device = self.embed_tokens.weight.device
        if device.type == "meta":
            return
        self.inv_freq, self.rope_attention_factor = rope_frequencies(self.config, device)
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.tokens_per_expert = torch.zeros(
                    self.config.num_experts, dtype=torch.long, device=device
                )

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, R/2]
        f = self.rope_attention_factor
        return (freqs.cos() * f).to(dtype), (freqs.sin() * f).to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> float32 logits [B, T, V], causal, no cache."""
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids.reshape(-1))  # [N, D]
        positions = torch.arange(T, device=input_ids.device).repeat(B)  # [N]
        cos, sin = self.rope(positions, x.dtype)
        ctx = DenseContext(B, T)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx, None)
        return self.lm_head(self.norm(x)).float().view(B, T, -1)

    def forward_paged(
        self, tokens: torch.Tensor, batch: PagedBatch, kv_cache: list[torch.Tensor]
    ) -> torch.Tensor:
        """One engine step: tokens [N] new tokens of S sequences -> float32 logits [S, V] at
        batch.logits_indices. Writes the new tokens' keys/values into kv_cache first."""
        x = self.embed_tokens(tokens)  # [N, D]
        cos, sin = self.rope(batch.positions, x.dtype)
        ctx = PagedContext.build(batch, self.config.sliding_window)
        for layer, cache in zip(self.layers, kv_cache, strict=True):
            x = layer(x, cos, sin, ctx, cache)
        x = x[batch.logits_indices]  # [S, D]
        return self.lm_head(self.norm(x)).float()

    # ---- paged KV cache --------------------------------------------------------------------
    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None, device=None
    ) -> list[torch.Tensor]:
        """One tensor per layer: GQA [2, slots, K, Dh]; MLA [slots, C + R] (latent and rope key)."""
        slots = num_blocks * block_size
        dtype, device = dtype or self.dtype, device or self.device
        return [
            torch.zeros((slots, *shape) if len(shape) == 1 else (2, slots, *shape[1:]), dtype=dtype, device=device)
            for shape in self._kv_shapes()
        ]

    def _kv_shapes(self) -> list[tuple[int, ...]]:
        """Per layer, one token's cache entry: MLA (C + R,), replicated on every rank; GQA
        (2, K_local, Dh), this rank's key/value heads."""
        cfg = self.config
        if cfg.attention == "mla":
            return [(cfg.kv_lora_rank + cfg.qk_rope_head_dim,)] * cfg.num_hidden_layers
        return [(2, layer.self_attn.num_kv_heads, cfg.head_dim) for layer in self.layers]

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one token takes in this rank's KV cache (all layers)."""
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        return sum(math.prod(shape) for shape in self._kv_shapes()) * itemsize

    def weight_bytes(self) -> int:
        """Bytes of the weights this rank holds (parameters and persistent buffers; a tied lm_head
        counted once)."""
        seen: set[int] = set()
        total = 0
        persistent = self.state_dict(keep_vars=True)
        for t in [*self.parameters(), *(b for n, b in self.named_buffers() if n in persistent)]:
            if id(t) not in seen and t.device.type != "meta":
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    # ---- expert load ------------------------------------------------------------------------
    def expert_token_counts(self) -> dict[int, list[int]]:
        """Cumulative tokens routed to each expert, per MoE layer index."""
        return {
            i: layer.mlp.tokens_per_expert.tolist()
            for i, layer in enumerate(self.layers)
            if isinstance(layer.mlp, MoE)
        }

    def reset_expert_token_counts(self) -> None:
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.tokens_per_expert.zero_()
