"""Decode attention that reads the paged KV cache in place (bfloat16 or float32 on the CPU), and a
prefill's attention the same way (bfloat16 on AVX512-BF16).

The torch path (models/model.py: `gather_slots` + `paged_attention`) copies every sequence's whole
context out of the cache into a dense [S, L, ...] tensor at every layer and step, then attends it
with two batched matmuls over a [S, ..., L] score tensor padded to the longest context. For a
decode step (one new token per sequence) `csrc/paged_attention.c` instead walks each sequence's
block table and reads each cached key and value row once, where it lies, for all the query heads
that share it, with an online softmax: nothing of the context's length is materialized and a
short sequence costs only its own context, not the longest one's. This is what vLLM's and SGLang's
CPU decode kernels do; decision 27 in docs/decisions.md says why this one is ours.

It serves grouped-query attention (cache [2, slots, K, Dh]) and MLA's absorbed decode (cache
[slots, C + R]: the keys are whole rows, the values their first C columns, read in place, no copy
of a strided view). It applies to queries and cache of one dtype, bfloat16 or float32, on the CPU,
one new token per sequence, outside autograd, with torch on one thread (the runtime's setting on
small machines; more threads stay with torch's ops, which spread over cores). Two builds of the
same steps: bfloat16 on CPUs with AVX512-BF16 runs the AVX-512 kernel (its scores on AMX tiles
where those apply); float32 anywhere, and bfloat16 on CPUs without AVX512-BF16 (AMD Zen 2/3, where
`--dtype auto` is float32), run the AVX2 + FMA one. The one-call rope and cache writes before
attention (gqa_prepare, mla_prepare) are bfloat16 AVX-512 only. Anywhere else, or with
MOE_RUNTIME_CPU_KERNELS=0, the torch path runs, and it stays the reference:
tests/runtime/test_paged_attention_kernel.py checks one against the other.

A step of several new tokens a sequence (a prefill, its chunks, a mixed step's prompts) runs
`prefill` where the CPU has AVX512-BF16 (decision 39): each (sequence, kv head) reads its context's
key and value rows once from the cache, and its (token, query head) pairs attend their causal
range in float32, with no gathered copy, padding or mask; MLA's expanded prefill takes the same
kernel on kv_b_proj's output and the cache's rope keys as they lie (`prefill_expanded`).

The C is compiled once, like csrc/cpu_decode.c (decision 14), into the same cache directory, keyed
by the source's hash, and called through ctypes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch

from model_runtime.kernels import triton_attention
from model_runtime.kernels.build import amx_emulated, amx_flags, build_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.c"
CFLAGS = ["-O3", "-shared", "-fPIC"]  # the kernel's own function carries its AVX-512 target

_lock = threading.Lock()
_lib = None  # the loaded library (None: not loaded, or not usable here)
_avx512 = False  # whether its AVX512-BF16 kernels run here (else only the AVX2 decode)
_decided = False


def _build() -> Path:
    return build_library(SOURCE, CFLAGS + amx_flags())


def _load():
    """The kernel's library, or None (with the reason logged once)."""
    global _lib, _avx512, _decided
    if _decided:
        return _lib
    with _lock:
        if _decided:
            return _lib
        lib = None
        if os.environ.get("MOE_RUNTIME_CPU_KERNELS", "1") == "0":
            log.info("paged attention kernel: off (MOE_RUNTIME_CPU_KERNELS=0)")
        elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            log.info("paged attention kernel: off (this CPU has no AVX2)")
        else:
            try:
                lib = ctypes.CDLL(str(_build()))
                lib.moe_paged_supported.restype = ctypes.c_int
                lib.moe_paged_avx2_supported.restype = ctypes.c_int
                ptr, long = ctypes.c_void_p, ctypes.c_long
                decode_args = (
                    [ptr, long, long, ptr, long, long, long]
                    + [ptr, long, long, ptr, long, long, ptr, long, ptr, ptr, long, long]
                    + [long] * 7
                    + [ctypes.c_float]
                )
                lib.moe_paged_decode_avx2.argtypes = decode_args + [ctypes.c_int]
                lib.moe_paged_decode_avx2.restype = None
                lib.moe_paged_use_pool.argtypes, lib.moe_paged_use_pool.restype = [ptr], None
                gqa_args = [ptr] * 7 + [long, ptr] + [long] * 4 + [ctypes.c_int] + [long] * 3
                lib.moe_gqa_prepare_f32.argtypes, lib.moe_gqa_prepare_f32.restype = gqa_args, None
                mla_args = [ptr, long, long, ptr, ptr, ptr, ptr, ctypes.c_float, ptr, long, ptr] + [long] * 3
                lib.moe_mla_prepare_f32.argtypes = mla_args + [ctypes.c_int]
                lib.moe_mla_prepare_f32.restype = None
                if not lib.moe_paged_avx2_supported():
                    log.info("paged attention kernel: off (this CPU has no AVX2 and FMA)")
                    lib = None
                elif not lib.moe_paged_supported():
                    log.info("paged attention kernel: AVX2 FMAs (this CPU has no AVX512-BF16)")
                else:
                    _avx512 = True
                    lib.moe_paged_decode_bf16.argtypes = decode_args
                    lib.moe_paged_decode_bf16.restype = None
                    lib.moe_paged_prefill_bf16.argtypes = (
                        [ptr, long, long, ptr, long, long, ptr, long, long, long, ptr, long, long, ptr, long, long]
                        + [ptr, ptr, ptr, long, long]
                        + [long] * 7
                        + [ctypes.c_float]
                    )
                    lib.moe_paged_prefill_bf16.restype = ctypes.c_int
                    lib.moe_mla_prepare_bf16.argtypes = lib.moe_mla_prepare_f32.argtypes
                    lib.moe_mla_prepare_bf16.restype = None
                    lib.moe_gqa_prepare_bf16.argtypes = gqa_args
                    lib.moe_gqa_prepare_bf16.restype = None
                    lib.moe_paged_amx_select.argtypes, lib.moe_paged_amx_select.restype = [ctypes.c_int], ctypes.c_int
                    amx = lib.moe_paged_amx_select(int(os.environ.get("MOE_RUNTIME_AMX", "1") != "0"))
                    log.info("paged attention kernel: scores with %s", ("AMX tiles emulated in software (MOE_RUNTIME_AMX_EMULATE)" if amx_emulated() else "AMX tiles") if amx else "AVX-512 FMAs")
            except Exception as e:  # noqa: BLE001 (any failure means: torch's own ops)
                lib, _avx512 = None, False
                log.warning("paged attention kernel: off (%s); torch's ops are used", e)
        _lib, _decided = lib, True
        return lib


def use_pool(parallel_rows: int | None) -> None:
    """The float32 / AVX2 decode kernel shares its sequences with the CPU kernels' helper threads
    through `parallel_rows` (the address of cpu_decode.c's moe_parallel_rows; None: no more)."""
    lib = _load()
    if lib is not None:
        lib.moe_paged_use_pool(ctypes.c_void_p(parallel_rows))


def available() -> bool:
    """Whether the decode kernel is compiled and loaded, in either build (a given call may still
    not qualify)."""
    return _load() is not None


def avx512_lib():
    """The library where its AVX512-BF16 kernels run here (bfloat16 decode on AVX-512 or AMX,
    gqa_prepare, mla_prepare, what cpu_decode's one-token attention calls), else None."""
    lib = _load()
    return lib if _avx512 else None


def applies(q: torch.Tensor, cache: torch.Tensor, max_new: int, uniform: bool) -> bool:
    """Whether decode() serves this step: q and cache of one dtype, bfloat16 or float32, on the
    CPU, one new token per sequence (max_new 1, no padding), outside autograd, torch on one
    thread, kernel loaded. On CUDA (and on the CPU under Triton's interpreter, how the tests
    check it): whether the Triton kernel serves it (kernels/triton_attention.py)."""
    if q.device.type != "cpu" or triton_attention.interpreting():
        return triton_attention.applies(q, cache, max_new, uniform)
    return (
        max_new == 1
        and uniform
        and q.dtype in (torch.bfloat16, torch.float32)
        and cache.dtype == q.dtype
        and q.device.type == "cpu"
        and not (torch.is_grad_enabled() and q.requires_grad)
        and torch.get_num_threads() == 1
        and _load() is not None
    )


def decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
    out: torch.Tensor | None = None,
    q_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence attends its cached context, read in place.

    q [S, H, E] bfloat16 or float32 (rows contiguous, any sequence and head strides), or with `q_rope` [S, H,
    E2] its last E2 columns apart (q then [S, H, E - E2], E - E2 a multiple of 16: MLA's latent
    and rope parts as they lie, not concatenated); keys [slots, K, E] and
    values [slots, K, Ev], views of the cache whose rows are contiguous (any slot and head
    strides); block_tables [S, B] and context_lens [S] as in PagedBatch (the new token already
    written, at position context_len - 1); window: keep the last `window` positions only.
    -> [S, H, Ev] of q's dtype, written into `out` when given (rows contiguous, any other strides:
    MLA passes a head-major buffer's transposed view); the cache of q's dtype too. On CUDA (or
    under Triton's interpreter) the Triton kernel computes it (kernels/triton_attention.py).
    """
    if q.device.type != "cpu" or triton_attention.interpreting():
        return triton_attention.decode(
            q, keys, values, block_tables, context_lens, block_size, scale, window, out, q_rope
        )  # fmt: skip
    lib = _load()
    if lib is None:
        raise RuntimeError("paged attention kernel: not available here (see available())")
    S, H, E1 = q.shape
    if q_rope is not None and (E1 % 16 or q_rope.shape[:2] != (S, H) or q_rope.dtype != q.dtype):
        q, q_rope = torch.cat([q, q_rope], dim=-1), None
    E1 = q.shape[2]
    E = E1 + (q_rope.shape[2] if q_rope is not None else 0)
    K, Ev = keys.shape[1], values.shape[2]
    if keys.shape[2] != E or H % K or keys.stride(2) != 1 or values.stride(2) != 1:
        raise ValueError(f"paged decode: q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}")
    dtype = q.dtype
    if dtype not in (torch.bfloat16, torch.float32) or keys.dtype != dtype or values.dtype != dtype:
        raise ValueError(f"paged decode: q {dtype}, keys {keys.dtype}, values {values.dtype}: not all bfloat16 or float32")
    if out is None:
        out = torch.empty(S, H, Ev, dtype=dtype)
    elif out.shape != (S, H, Ev) or out.dtype != dtype or out.stride(2) != 1:
        raise ValueError(f"paged decode: out {tuple(out.shape)} {out.dtype} is not [{S}, {H}, {Ev}] {dtype} rows")
    if q.stride(2) != 1:
        q = q.contiguous()
    if q_rope is not None and q_rope.stride(2) != 1:
        q_rope = q_rope.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    bf = dtype == torch.bfloat16
    if bf and _avx512:
        kernel = lib.moe_paged_decode_bf16
    else:  # the AVX2 build: its last argument says bfloat16 or float32

        def kernel(*args):
            lib.moe_paged_decode_avx2(*args, int(bf))

    kernel(
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        None if q_rope is None else q_rope.data_ptr(),
        0 if q_rope is None else q_rope.stride(0),
        0 if q_rope is None else q_rope.stride(1),
        E1,
        keys.data_ptr(),
        keys.stride(0),
        keys.stride(1),
        values.data_ptr(),
        values.stride(0),
        values.stride(1),
        tables.data_ptr(),
        tables.stride(0),
        lens.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        S,
        K,
        H // K,
        E,
        Ev,
        block_size,
        window or 0,
        scale,
    )
    return out


def prefill_applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether prefill() serves this step's attention: q and cache bfloat16 on a CPU with
    AVX512-BF16, outside autograd, torch on one thread, kernel loaded. On CUDA (or under Triton's
    interpreter): whether the Triton kernel does (grouped-query attention's cache only)."""
    if q.device.type != "cpu" or triton_attention.interpreting():
        return triton_attention.prefill_applies(q, cache)
    return (
        q.dtype is torch.bfloat16
        and cache.dtype is torch.bfloat16
        and q.device.type == "cpu"
        and not (torch.is_grad_enabled() and q.requires_grad)
        and torch.get_num_threads() == 1
        and avx512_lib() is not None
    )


def prefill(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
    out: torch.Tensor | None = None,
    max_new: int | None = None,
) -> torch.Tensor:
    """Several new tokens per sequence attend their context in the cache, read in place, causally.

    q [N, H, E] bfloat16 (rows contiguous), sequence s's new tokens its rows query_start[s] ..
    query_start[s + 1] - 1 (query_start [S + 1], cu_seqlens), at the last positions of its
    context_lens[s], their keys and values already written; keys [slots, K, E] and values [slots,
    K, Ev], views of the bfloat16 cache with contiguous rows; block_tables [S, B]; window: keep a
    token's last `window` positions only. -> [N, H, Ev] bfloat16, written into `out` when given
    (rows contiguous, any other strides). On CUDA (or under Triton's interpreter) the Triton
    kernel computes it, any float dtype, its grid sized by max_new (the most new tokens of a
    sequence; read from query_start when not given)."""
    if q.device.type != "cpu" or triton_attention.interpreting():
        if max_new is None:
            max_new = int((query_start[1:] - query_start[:-1]).max())
        return triton_attention.prefill(
            q, keys, values, block_tables, context_lens, query_start, block_size, scale, window, max_new, out
        )  # fmt: skip
    if keys.dim() != 3 or values.dim() != 3:
        raise ValueError(f"paged prefill: q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}")
    tables = block_tables.to(torch.int64).contiguous()
    return _prefill(q, keys, None, values, context_lens, query_start, scale, window, out, tables=tables,
                    block_size=block_size)  # fmt: skip


def prefill_expanded_applies(q: torch.Tensor, cache: torch.Tensor, nope_dim: int) -> bool:
    """Whether prefill_expanded() serves an MLA prefill over the cache `cache` [slots, C + R]: as
    prefill_applies() says, and on the CPU a nope head size (P) that is a multiple of 16."""
    if q.device.type != "cpu" or triton_attention.interpreting():
        return triton_attention.prefill_applies(q, cache)
    return nope_dim % 16 == 0 and prefill_applies(q, cache)


def prefill_expanded(
    q: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    values: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
    window: int | None = None,
    out: torch.Tensor | None = None,
    max_new: int | None = None,
) -> torch.Tensor:
    """MLA's prefill over its context expanded into per-head keys and values (models/model.py:
    MLAttention.attend), without concatenating or padding them: q [N, H, P + R] bfloat16 (rows
    contiguous, the rope part rotated); k_nope [S, L, H, P] and values [S, L, H, Dv] (rows
    contiguous: kv_b_proj's output, split), k_rope [S, L, R] (the cache's rope keys, one for every
    head), position t of sequence s at [s, t] of each (dim 0's stride L times dim 1's); P a multiple
    of 16; context_lens, query_start and window as prefill()'s. -> [N, H, Dv] bfloat16. On CUDA
    (or under Triton's interpreter) the Triton kernel computes it (any float dtype, any P)."""
    if q.device.type != "cpu" or triton_attention.interpreting():
        if max_new is None:
            max_new = int((query_start[1:] - query_start[:-1]).max())
        return triton_attention.prefill_expanded(
            q, k_nope, k_rope, values, context_lens, query_start, scale, window, max_new, out
        )  # fmt: skip
    S, L, H, P = k_nope.shape
    if (
        k_rope.shape[:2] != (S, L) or values.shape[:3] != (S, L, H) or q.shape[1] != H
        or q.shape[2] != P + k_rope.shape[2] or P % 16
        or any(t.stride(0) != L * t.stride(1) for t in (k_nope, k_rope, values))
    ):  # fmt: skip
        raise ValueError(
            f"paged prefill: q {tuple(q.shape)} does not fit keys {tuple(k_nope.shape)} + {tuple(k_rope.shape)}, "
            f"values {tuple(values.shape)} (or their strides)"
        )
    keys = k_nope.flatten(0, 1)  # [S L, H, P]: slot s L + t
    rope = k_rope.flatten(0, 1)[:, None, :].expand(S * L, H, k_rope.shape[2])  # head stride 0
    return _prefill(q, keys, rope, values.flatten(0, 1), context_lens, query_start, scale, window, out, dense_len=L)


def _prefill(q, keys, rope, values, context_lens, query_start, scale, window, out, tables=None, block_size=0,
             dense_len=0):  # fmt: skip
    """moe_paged_prefill_bf16: keys [slots, K, E1] (+ rope [slots, K, E - E1], else E1 = E), values
    [slots, K, Ev]; the context paged (tables [S, B] int64, blocks of block_size) or dense
    (sequence s's position t at slot s dense_len + t)."""
    lib = avx512_lib()
    if lib is None:
        raise RuntimeError("paged prefill kernel: not available here (AVX512-BF16)")
    N, H, E = q.shape
    K, E1, Ev = keys.shape[1], keys.shape[2], values.shape[2]
    parts = (keys, values) if rope is None else (keys, rope, values)
    if H % K or E1 + (0 if rope is None else rope.shape[2]) != E or any(t.stride(2) != 1 for t in parts):
        raise ValueError(f"paged prefill: q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}")
    if any(t.dtype != torch.bfloat16 for t in (q, *parts)):
        raise ValueError(f"paged prefill: q {q.dtype}, keys {keys.dtype}, values {values.dtype}: not all bfloat16")
    if q.stride(2) != 1:
        q = q.contiguous()
    S = context_lens.shape[0]
    if out is None:
        out = torch.empty(N, H, Ev, dtype=q.dtype)
    elif out.shape != (N, H, Ev) or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"paged prefill: out {tuple(out.shape)} {out.dtype} is not [{N}, {H}, {Ev}] bfloat16 rows")
    lens = context_lens.to(torch.int64).contiguous()
    starts = query_start.to(torch.int64).contiguous()
    if lib.moe_paged_prefill_bf16(
        q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), keys.stride(0), keys.stride(1),
        None if rope is None else rope.data_ptr(), 0 if rope is None else rope.stride(0),
        0 if rope is None else rope.stride(1), E1, values.data_ptr(), values.stride(0), values.stride(1),
        None if tables is None else tables.data_ptr(), 0 if tables is None else tables.stride(0), dense_len,
        lens.data_ptr(), starts.data_ptr(), out.data_ptr(), out.stride(0), out.stride(1), S, K, H // K, E, Ev,
        block_size, window or 0, scale,
    ):  # fmt: skip
        raise MemoryError(f"paged prefill: no memory for a context of {int(lens.max())} tokens")
    return out


def mla_prepare(
    q: torch.Tensor,
    kv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cache: torch.Tensor,
    slots: torch.Tensor,
    interleaved: bool,
) -> bool:
    """MLA's decode step before attention, in one C call: the latent kv[:, :C] normed (norm_weight,
    eps: model.RMSNorm) and the rope key kv[:, C:] rotated (model.apply_rope) written to the cache
    rows at `slots`; q [N, H, P + R]'s rope part rotated in place. On the CPU, q and kv
    contiguous, cache [slots, C + R] rows contiguous, cos / sin [N, R / 2]. All bfloat16
    (AVX512-BF16: torch's bits) or all float32 (any CPU the library loads on: torch's bits for the
    rope parts, the normed latent within an ulp of torch's). Returns False (nothing done) when the
    inputs are not such: the caller then runs torch's ops."""
    bf16 = q.dtype == torch.bfloat16
    lib = avx512_lib() if bf16 else _load()
    N, H, PR = q.shape
    C = norm_weight.shape[0]
    R = kv.shape[1] - C
    tensors = (q, kv, cos, sin, norm_weight, cache)
    if (
        lib is None
        or q.dtype not in (torch.bfloat16, torch.float32)
        or any(t.dtype != q.dtype or t.device.type != "cpu" for t in tensors)
        or (torch.is_grad_enabled() and q.requires_grad)
        or not all(t.is_contiguous() for t in (q, kv, cos, sin, norm_weight))
        or cache.dim() != 2 or cache.stride(1) != 1 or cache.shape[1] != C + R
        or kv.shape[0] != N or cos.shape != (N, R // 2) or sin.shape != (N, R // 2) or R % 2 or PR < R
    ):  # fmt: skip
        return False
    slots = slots.to(torch.int64).contiguous()
    (lib.moe_mla_prepare_bf16 if bf16 else lib.moe_mla_prepare_f32)(
        q.data_ptr(), H, PR - R, kv.data_ptr(), cos.data_ptr(), sin.data_ptr(), norm_weight.data_ptr(), eps,
        cache.data_ptr(), cache.stride(0), slots.data_ptr(), N, C, R, int(interleaved),
    )  # fmt: skip
    return True


def gqa_prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    interleaved: bool,
) -> bool:
    """Grouped-query attention's step before attention, in one C call: q [N, H, D] rotated in place
    (model.apply_rope, the whole head), k [N, K, D] rotated into the key cache and v [N, K, D]
    copied into the value cache at `slots` (cache [2, slots, K, D]). All bfloat16 (AVX512-BF16) or
    all float32 (any CPU the library loads on) on the CPU, each token's heads of q, k and v
    contiguous (their rows may be apart: column ranges of one fused projection's output), cos and
    sin contiguous [N, D / 2]. Returns False (nothing done) when the inputs are not such: the
    caller then runs torch's ops."""
    bf16 = q.dtype == torch.bfloat16
    lib = avx512_lib() if bf16 else _load()
    N, H, D = q.shape
    K = k.shape[1]
    tensors = (q, k, v, cos, sin, cache)
    if (
        lib is None
        or q.dtype not in (torch.bfloat16, torch.float32)
        or any(t.dtype != q.dtype or t.device.type != "cpu" for t in tensors)
        or not all(t.stride()[1:] == (D, 1) for t in (q, k, v))
        or not all(t.is_contiguous() for t in (cos, sin))
        or (torch.is_grad_enabled() and q.requires_grad)
        or k.shape != (N, K, D) or v.shape != (N, K, D) or D % 2
        or cos.shape != (N, D // 2) or sin.shape != (N, D // 2)
        or cache.dim() != 4 or cache.shape[0] != 2 or tuple(cache.shape[2:]) != (K, D)
        or cache[0].stride()[1:] != (D, 1) or cache.stride(1) != K * D
    ):  # fmt: skip
        return False
    slots = slots.to(torch.int64).contiguous()
    (lib.moe_gqa_prepare_bf16 if bf16 else lib.moe_gqa_prepare_f32)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), cache[0].data_ptr(),
        cache[1].data_ptr(), cache.stride(1), slots.data_ptr(), N, H, K, D, int(interleaved),
        q.stride(0), k.stride(0), v.stride(0),
    )  # fmt: skip
    return True
