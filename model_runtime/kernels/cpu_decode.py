"""Batch-1 decode on the CPU: C kernels that read the weights at memory speed.

Decoding one token multiplies one row by every weight, so a step lasts as long as the weights take
to stream from memory, plus whatever the step spends around them. On one thread of the machines
this was measured on, BLAS's gemv (MKL) walks several rows at once, which makes several memory
streams, and reads 12-14 GB/s against 21-26 GB/s for a plain sum; and a decode step of torch ops
spends as long again in per-op overhead (a few microseconds each, ~25 ops per MoE layer).

`csrc/cpu_decode.c` has the batch-1 pieces of the model as plain C (AVX2 + FMA, and AVX-512F for
bfloat16 weights where the CPU has it): a gemv that walks the rows front to back (one sequential
stream, read at the speed of a sum), a SwiGLU MLP, RMSNorm, MLA's absorbed attention with its rope
and cache write, and a whole MoE layer (router, experts, shared expert). models/model.py's torch code
stays the reference and serves every batch; the kernels take over only for one float32 or bfloat16
row on the CPU (and `moe_experts_bf16`, the routed experts of a bfloat16 MoE layer, for up to
EXPERTS_MAX_TOKENS rows: a decode step of several sequences, where torch's grouped GEMM pays a
oneDNN matmul's fixed cost per expert) (weights and cache of the same dtype; bfloat16 is widened to float32 as it is read
and the sums are float32) with torch on one thread (the runtime's default on small machines; more
threads stay with torch, which spreads over cores) and outside autograd.
Where the CPU has AMX (decision 32), two kernels run a step's bfloat16 matmuls on its tiles, reading
the weights as they are stored (row-major: the tiles' A operand): `moe_amx_linear` for 2 ..
amx_max_rows() rows of a linear, `moe_amx_experts` for the routed experts of any number of tokens
(a decode step, a prefill); the experts then stay row-major (`experts_layout`).
`MOE_RUNTIME_AMX=0` turns these two off.
Where it has no AVX-512 (float32 by default there: decision 33), `moe_experts_f32` takes the routed
experts of a few float32 rows and `moe_linear_f32` a linear of 2 .. F32_MAX_ROWS float32 rows, on
the weights as the engine stores them (experts column-major, linears row-major).
tests/runtime/test_cpu_decode.py checks each against the torch code.

They are a transform applied to a built model, not hooks in it: `use_cpu_decode_kernels` changes
each layer they can compute, in place, to a subclass (Decode*) whose forward calls the kernel for
one row and otherwise runs the layer's own torch code (super().forward). Parameters, buffers,
names and module identity are unchanged, so state dicts, checkpoints and the engine's references
to the model are unaffected; a second call starts afresh. The engine applies it to a model on the
CPU after the other transforms, else `use_decode_layout` (a weight layout BLAS's gemv reads faster).

The C is compiled once with the system's compiler (gcc, cc or $CC) into a cache directory keyed
by the source's hash, and called through ctypes. Without a compiler or AVX2, or with
`MOE_RUNTIME_CPU_KERNELS=0`, torch's ops run as before (one log line says why).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model_runtime.kernels import paged_attention as paged_kernel
from model_runtime.kernels import shapes
from model_runtime.kernels.build import amx_emulated, amx_flags, build_library
from model_runtime.models import model as layers

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_decode.c"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-pthread", "-shared", "-fPIC"]

_lock = threading.Lock()
_helpers = 0  # helper threads running (start_helpers)
_lib = None  # the loaded library (None: not loaded, or there is none)
_decided = False  # whether _load() has run
_avx512 = False  # whether the CPU runs the AVX-512-only kernels (moe_experts_bf16)
_amx = False  # whether the CPU (and the OS, for this process) runs the AMX kernel (moe_amx_linear)
_dpbf16 = False  # whether AVX512-BF16 without AMX runs moe_dpbf16_experts / moe_dpbf16_linear (decision 40)


def _build() -> Path:
    return build_library(SOURCE, CFLAGS + amx_flags())


def _load():
    """The kernels' library, or None (with the reason logged once)."""
    global _lib, _decided, _avx512, _amx, _dpbf16
    if _decided:
        return _lib
    with _lock:
        if _decided:
            return _lib
        lib = None
        if os.environ.get("MOE_RUNTIME_CPU_KERNELS", "1") == "0":
            log.info("cpu decode kernels: off (MOE_RUNTIME_CPU_KERNELS=0)")
        elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            log.info("cpu decode kernels: off (this CPU has no AVX2)")
        else:
            try:
                path = _build()
                lib = ctypes.CDLL(str(path))
                ptr, long, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
                i32 = ctypes.c_int
                lib.moe_gemv.argtypes = [ptr] * 4 + [long] * 2 + [i32] * 2
                lib.moe_swiglu.argtypes = [ptr] * 6 + [long, long, i32, i32]
                lib.moe_rmsnorm.argtypes = [ptr] * 4 + [f32, long, i32]
                lib.moe_rmsnorm_rows.argtypes = [ptr, long, ptr, ptr, ptr, f32, long, long, i32]
                lib.moe_mla_attention.argtypes = [ptr] * 14 + [i32, long, f32] + [long] * 8 + [i32] * 2
                lib.moe_mla_attention.restype = i32
                lib.moe_moe_decode.argtypes = [ptr] * 12 + [i32] * 3 + [f32] + [long] * 7 + [i32] * 4
                lib.moe_fp8_dequant.argtypes = [ptr] * 3 + [long] * 5 + [i32]
                lib.moe_simd_select.argtypes, lib.moe_simd_select.restype = [i32], i32
                lib.moe_experts_supported.argtypes, lib.moe_experts_supported.restype = [], i32
                lib.moe_experts_bf16.argtypes = [ptr] * 8 + [long] * 5
                lib.moe_experts_f32.argtypes = [ptr] * 8 + [long] * 5 + [i32]
                lib.moe_argmax_rows.argtypes = [ptr, long, long, long, ptr]
                lib.moe_route_rows.argtypes = [ptr] * 6 + [long] + [i32] * 3 + [f32] + [long] * 5 + [i32]
                lib.moe_amx_supported.argtypes, lib.moe_amx_supported.restype = [], i32
                lib.moe_amx_linear.argtypes = [ptr, long, long, ptr] + [long] * 3 + [ptr, ptr, long]
                lib.moe_amx_linear.restype = i32
                lib.moe_linear_f32.argtypes = lib.moe_amx_linear.argtypes
                lib.moe_linear_f32.restype = i32
                lib.moe_linear_f32_bf16w.argtypes = lib.moe_amx_linear.argtypes
                lib.moe_linear_f32_bf16w.restype = i32
                lib.moe_amx_heads.argtypes = [ptr, long, long, ptr, ptr] + [long] * 6
                lib.moe_amx_heads.restype = i32
                lib.moe_amx_experts.argtypes = [ptr] * 7 + [long] * 5
                lib.moe_amx_experts.restype = i32
                lib.moe_dpbf16_experts.argtypes = lib.moe_amx_experts.argtypes
                lib.moe_dpbf16_experts.restype = i32
                lib.moe_dpbf16_supported.argtypes, lib.moe_dpbf16_supported.restype = [], i32
                lib.moe_dpbf16_linear.argtypes = lib.moe_amx_linear.argtypes
                lib.moe_dpbf16_linear.restype = i32
                lib.moe_pairs_select.argtypes, lib.moe_pairs_select.restype = [i32], i32
                lib.moe_helpers_start.argtypes, lib.moe_helpers_start.restype = [i32], i32
                lib.moe_helpers_stop.argtypes, lib.moe_helpers_stop.restype = [], None
                lib.moe_helpers_rows.argtypes, lib.moe_helpers_rows.restype = [], long
                for fn in (
                    lib.moe_fp8_dequant,
                    lib.moe_gemv,
                    lib.moe_swiglu,
                    lib.moe_rmsnorm,
                    lib.moe_rmsnorm_rows,
                    lib.moe_moe_decode,
                    lib.moe_experts_bf16,
                    lib.moe_experts_f32,
                    lib.moe_argmax_rows,
                    lib.moe_route_rows,
                ):
                    fn.restype = None
                simd = "AVX-512F" if lib.moe_simd_select(1) else "AVX2"
                _avx512 = bool(lib.moe_experts_supported())
                _amx = _avx512 and os.environ.get("MOE_RUNTIME_AMX", "1") != "0" and bool(lib.moe_amx_supported())
                _amx_here[0] = _amx
                _dpbf16 = (
                    _avx512 and not _amx and os.environ.get("MOE_RUNTIME_DPBF16", "1") != "0"
                    and bool(lib.moe_dpbf16_supported())
                )  # fmt: skip
                lib.moe_pairs_select(int(_dpbf16))  # one row's dot products as bfloat16 pairs (decision 41)
                also = (
                    "; a few rows' linears and the routed experts on AMX tiles"
                    + (" (emulated in software: MOE_RUNTIME_AMX_EMULATE)" if amx_emulated() else "")
                    if _amx
                    else "; one row's, a few rows' linears and the routed experts by AVX512-BF16 dot products"
                    if _dpbf16
                    else ""
                )  # fmt: skip
                log.info("cpu decode kernels: %s (bfloat16 weights read with %s%s)", path, simd, also)
            except Exception as e:  # noqa: BLE001 (any failure means: torch's own ops)
                lib = None
                log.warning("cpu decode kernels: off (%s); torch's ops are used", e)
        _lib, _decided = lib, True
        return lib


_amx_here = [False]  # what _load decided for _amx (tests and benchmarks switch _amx itself)


def moe_amx_enabled() -> bool:
    """Whether this process runs the AMX kernels, as decided when the kernels loaded (the CPU, the
    OS's grant, MOE_RUNTIME_AMX), whatever _amx is switched to since."""
    _load()
    return _amx_here[0]


def available() -> bool:
    """Whether the kernels are compiled and loaded (a given call may still not qualify); compiles
    them the first time. use_cpu_decode_kernels calls it when an engine starts, so no
    forward pass ever waits for the compiler."""
    return _load() is not None


def start_helpers(n: int) -> int:
    """n helper threads for the kernels from now on (0: none; decisions 36, 37): they share the
    rows of each large matrix a step reads (a one-token step's gemvs and experts, a step of several
    sequences' linears and routed experts), with the same results. Returns how many run (0
    without the kernels)."""
    global _helpers
    lib = _load()
    if lib is None:
        return 0
    with _lock:
        _helpers = lib.moe_helpers_start(max(0, n))
        pool = ctypes.cast(lib.moe_parallel_rows, ctypes.c_void_p).value
        paged_kernel.use_pool(pool if _helpers else None)  # the paged attention's sequences too
        return _helpers


def helper_rows() -> int:
    """How many rows (or routed experts) of the kernels' matrices the helper threads have computed
    in this process so far."""
    return _lib.moe_helpers_rows() if _load() is not None else 0


def default_helpers() -> int:
    """How many helper threads an engine on the CPU starts: MOE_RUNTIME_DECODE_HELPERS when set,
    else one where torch runs on one thread and the process may use another core (the one the
    server leaves to its event loop, idle much of the time while the kernels run), else none."""
    env = os.environ.get("MOE_RUNTIME_DECODE_HELPERS", "")
    if env:
        if not env.isdigit():
            raise ValueError(f"MOE_RUNTIME_DECODE_HELPERS must be a whole number, not {env!r}")
        return int(env)
    return int(torch.get_num_threads() == 1 and len(os.sched_getaffinity(0)) > 1)


DTYPES = (torch.float32, torch.bfloat16)  # the kernels' dtypes; the C's `bf` flag picks one


def one_row(x: torch.Tensor) -> bool:
    """Whether x [..., D] is one float32 or bfloat16 row on the CPU, outside autograd, with torch on
    one thread and the kernels loaded (by `available`): the calls below then apply (weights of x's
    dtype, rows contiguous)."""
    return (
        x.numel() == x.shape[-1]
        and x.dtype in DTYPES
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
        and torch.get_num_threads() == 1
        and _lib is not None
    )


def kernel_rows(dtype: torch.dtype, *ws: torch.Tensor) -> bool:
    """Whether weights are of `dtype` (float32 or bfloat16) with contiguous rows, as the kernels
    read them."""
    return dtype in DTYPES and all(w.dtype == dtype and w.is_contiguous() for w in ws)


def is_bf16(x: torch.Tensor) -> int:
    """The C's `bf` flag for x's dtype."""
    return int(x.dtype == torch.bfloat16)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] (one row) @ w [out, in].T -> [..., out], in x's dtype (w's too, or bfloat16 for
    float32 x: narrow_linears)."""
    out, inn = w.shape
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out, dtype=x.dtype)
    scratch = torch.empty(inn + out)
    _lib.moe_gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), scratch.data_ptr(), out, inn, is_bf16(x), is_bf16(w))
    return y


# Up to this many rows a bfloat16 linear takes moe_amx_linear (a decode step's sequences, a prefill
# of a few hundred tokens, a step mixing the two) rather than oneDNN's matmul, which reorders the
# plain weights into its blocked layout at every call: at 2-64 rows the AMX kernel reads the
# weights at twice its speed (benchmarks/runtime_amx_linear.py), at 256-512 rows it is as fast on
# one thread and beyond slower (0.7-0.9x at 1024-2048). Where helper threads share its weight rows
# it takes up to AMX_HELPED_ROWS: 1.3-1.8x oneDNN's one thread at 384-512 rows, 0.8-1.7x at 1024
# (q/k/v of D 1024: 4.5 against 5.7 ms; decision 39).
AMX_MAX_ROWS = 512
AMX_HELPED_ROWS = 1024


def amx_max_rows() -> int:
    """How many rows moe_amx_linear takes: AMX_HELPED_ROWS where helper threads run, else AMX_MAX_ROWS."""
    return AMX_HELPED_ROWS if _helpers else AMX_MAX_ROWS


# Up to this many rows a float32 linear takes moe_linear_f32 rather than MKL's sgemm, on CPUs
# without AVX-512 (where float32 is the default dtype): as fast as MKL's at 64 rows and D 256, up to
# 1.7x faster at 32 rows and D 1024 (the lm head of 32000: 29 against 48 ms), 2x at 2-8 rows. A
# prefill's rows stay with MKL on torch's one thread, unless helper threads run (f32_max_rows);
# all stay with MKL on AVX-512, whose sgemm runs twice as wide as this.
F32_MAX_ROWS = 64


HELPER_MIN_BYTES = 1 << 20  # the C's JOB_MIN_BYTES: smaller matrices are not shared with the helpers


def f32_max_rows(w: torch.Tensor) -> int:
    """How many rows moe_linear_f32 takes for the weight w: F32_MAX_ROWS where it runs alone; any
    number where helper threads share w's rows (decision 37: a prefill's 1024 x 1024 x 3072 linear
    runs in 44-53 ms on the two cores, 64 rows at a time, against MKL's 81-93 ms on torch's one
    thread and 42 ms on two). A weight under HELPER_MIN_BYTES is not shared: its prefill stays
    with MKL, faster than this kernel on one thread."""
    return sys.maxsize if _helpers and w.numel() * w.element_size() >= HELPER_MIN_BYTES else F32_MAX_ROWS


def few_rows(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, max_rows: int,
    weight: torch.dtype | None = None,
) -> bool:  # fmt: skip
    """Whether F.linear(x, w, bias) is a few rows of `dtype` a row kernel reads as they are: on the
    CPU, outside autograd, torch on one thread, 2 <= rows <= max_rows, w [N, K] of `dtype` (or
    `weight`) with contiguous rows, the bias (if any) of `dtype` and contiguous."""
    return (
        x.dtype is dtype
        and w.dtype is (weight or dtype)
        and x.is_cpu
        and 2 * x.shape[-1] <= x.numel() <= max_rows * x.shape[-1]
        and w.dim() == 2
        and x.shape[-1] == w.shape[1]
        and w.stride(1) == 1
        and (bias is None or (bias.dtype is dtype and bias.dim() == 1 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and torch.get_num_threads() == 1
    )


def amx_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether moe_amx_linear computes F.linear(x, w, bias): bfloat16 on the CPU with AMX (_amx),
    2 to amx_max_rows() rows (few_rows), K a multiple of 32 (N any: an output head of 32001)."""
    return _amx and few_rows(x, w, bias, torch.bfloat16, amx_max_rows()) and w.shape[1] % 32 == 0


# A bfloat16 linear takes moe_dpbf16_linear on a CPU with AVX512-BF16 and no AMX (decision 40)
# rather than oneDNN's matmul where that is faster (Zen 4, scratch lin.py, lin2.py): its sums
# across lanes cost a fixed time per output, so it needs K of DPBF16_MIN_K or more (at K 64-128
# it runs at 0.4-0.9x oneDNN's speed from 8 rows). On one thread it is 1.3-2.4x oneDNN's speed
# at 2-8 rows, even or slower from 16: up to DPBF16_MAX_ROWS. Where helper threads share the
# weight rows, any number up to DPBF16_HELPED_ROWS: 1.5-2x oneDNN's one thread at K 512-2048,
# 1.1-1.5x at K 256 (an output head of 8192 x 256 at 32 rows). They share a job of
# HELPER_MIN_BYTES of weights or more, counted once per DPBF16_SHARE_ROWS rows (the C's
# DOT_SHARE_ROWS): 32 rows of a 512 x 512 weight (0.5 MB, 0.06 against oneDNN's 0.10 ms), 128 of
# a 256 x 256 one.
# And a product of at most DPBF16_SMALL_MACS multiply-adds takes it at any number of rows up to
# DPBF16_HELPED_ROWS: oneDNN's ~15 us a call outweighs its speed there (Qwen2-MoE's shared expert
# gate, 32 x 1 x 512: 0.016 against 0.005 ms; 1024 x 1 x 2048, 2M, is oneDNN's at 0.85x).
DPBF16_MAX_ROWS = 8
DPBF16_MIN_K = 256
DPBF16_HELPED_ROWS = 1024
DPBF16_SHARE_ROWS = 16
DPBF16_SMALL_MACS = 1 << 20


def dpbf16_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether moe_dpbf16_linear computes F.linear(x, w, bias): bfloat16 on a CPU with AVX512-BF16
    and no AMX (_dpbf16), N any, K a multiple of 32 and at least DPBF16_MIN_K, 2 to DPBF16_MAX_ROWS
    rows (DPBF16_HELPED_ROWS for a job the helper threads share, or one of DPBF16_SMALL_MACS or
    fewer multiply-adds)."""
    if not _dpbf16 or w.dim() != 2 or w.shape[1] % 32 or w.shape[1] < DPBF16_MIN_K:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    shared = _helpers and w.numel() * w.element_size() * -(-rows // DPBF16_SHARE_ROWS) >= HELPER_MIN_BYTES
    small = rows * w.numel() <= DPBF16_SMALL_MACS
    return few_rows(x, w, bias, torch.bfloat16, DPBF16_HELPED_ROWS if shared or small else DPBF16_MAX_ROWS)


def f32_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, weight: torch.dtype | None = None) -> bool:
    """Whether moe_linear_f32 computes F.linear(x, w, bias): float32 (the weight `weight`, where
    moe_linear_f32_bf16w reads a bfloat16 one), the kernels loaded on a CPU without AVX-512, a few
    rows (few_rows: up to f32_max_rows(w)), K a multiple of 8."""
    return (
        _lib is not None
        and not _avx512
        and few_rows(x, w, bias, torch.float32, f32_max_rows(w), weight)
        and w.shape[1] % 8 == 0
    )


def rows_linear(kernel, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) by a row kernel of the library (moe_amx_linear, moe_linear_f32: one
    signature), its checks made (amx_rows, f32_rows): x [..., K]."""
    N, K = w.shape
    rows = x if x.dim() == 2 else x.reshape(-1, K)  # (a step's rows are 2-D: no view to make)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    if kernel(
        rows.data_ptr(), rows.stride(0), M, w.data_ptr(), w.stride(0), N, K,
        None if bias is None else bias.data_ptr(), y.data_ptr(), N,
    ):  # fmt: skip
        raise MemoryError(f"{kernel.__name__}: {M} rows of {K}: more than it takes, or no memory to repack them")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


def amx_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) by moe_amx_linear (amx_rows checks the arguments): x [..., K] bfloat16."""
    return rows_linear(_lib.moe_amx_linear, x, w, bias)


def dpbf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) by moe_dpbf16_linear (dpbf16_rows checks the arguments): x [..., K] bfloat16."""
    return rows_linear(_lib.moe_dpbf16_linear, x, w, bias)


def f32_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) by moe_linear_f32 (f32_rows checks the arguments): x [..., K] float32."""
    return rows_linear(_lib.moe_linear_f32, x, w, bias)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; one float32 or bfloat16 row on the CPU (batch-1 decode) takes the streaming gemv
    kernel, a few bfloat16 rows the AMX kernel where the CPU has it (the AVX512-BF16 one where it
    has that and no AMX: dpbf16_rows), a few float32 rows the AVX2
    dot-product kernel, more rows oneDNN's / MKL's matmul with the rows padded to a bucket
    (kernels/shapes.py)."""
    if x.dtype == torch.float32 and w.dtype == torch.bfloat16:
        return narrow_linear(x, w, bias)
    if one_row(x) and kernel_rows(x.dtype, w):
        y = gemv(x, w)
        return y if bias is None else y + bias
    if amx_rows(x, w, bias):
        return amx_linear(x, w, bias)
    if dpbf16_rows(x, w, bias):
        return dpbf16_linear(x, w, bias)
    if f32_rows(x, w, bias):
        return f32_linear(x, w, bias)
    return shapes.linear(x, w, bias)


def narrow_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w.float(), bias) for float32 x and a weight kept as bfloat16 (narrow_linears): one
    row the gemv, 2 .. f32_max_rows(w) rows moe_linear_f32_bf16w (each reads the bfloat16 weight,
    widened as read: moe_gemv's and moe_linear_f32's sums), more rows MKL's sgemm on the weight
    widened for the call."""
    if one_row(x) and w.is_contiguous():
        y = gemv(x, w)
        return y if bias is None else y + bias
    if f32_rows(x, w, bias, weight=torch.bfloat16):
        return rows_linear(_lib.moe_linear_f32_bf16w, x, w, bias)
    return shapes.linear(x, w.float(), bias)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) for one row x [..., D] (w of x's dtype)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    scratch = torch.empty(x.shape[-1])
    _lib.moe_rmsnorm(
        x.data_ptr(), w.data_ptr(), y.data_ptr(), scratch.data_ptr(), eps, x.shape[-1], is_bf16(x)
    )
    return y


# ---- whole layers, prepared once (use_cpu_decode_kernels, below) ------------------------------
# Each holds its weights (keeping them alive) and their addresses, so a decode step pays one
# check and one C call per layer instead of a module lookup per weight.


class SwiGLU:
    """down @ (silu(gate @ x) * (up @ x)): a dense MLP or a shared expert, for one row x [1, D] of
    `dtype` (the weights', or float32 over weights kept as bfloat16: narrow_linears)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype | None = None):
        self.weights = (gate, up, down)
        self.dtype = dtype or gate.dtype  # the rows it takes (one_row's dtypes)
        self.wbf = is_bf16(gate)
        self.ptrs = tuple(w.data_ptr() for w in self.weights)
        self.I, self.D = gate.shape  # noqa: E741 (legend)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(1, self.D, dtype=self.dtype)
        scratch = torch.empty(2 * self.D + self.I)
        _lib.moe_swiglu(
            *self.ptrs, x.data_ptr(), y.data_ptr(), scratch.data_ptr(), self.D, self.I, is_bf16(y), self.wbf
        )  # fmt: skip
        return y


ROUTE_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


class MoE:
    """models.model.MoE for one token x [1, D]: route (cfg's scoring, top-k method, groups,
    scaling), the A chosen experts (gate_up [E, 2I, D], down [E, D, I], row-major or each expert's
    matrix column-major as grouped_experts_layout stores bfloat16 experts), the shared expert (its
    SwiGLU: gate, up [Is, D], down [D, Is]) scaled by sigmoid(shared_scale . x) when given; the choice is
    counted into tokens_per_expert [E] (int64, updated in place). `bias` (noaux_tc's) is read as
    float32 (a float32 copy is kept if it is not)."""

    def __init__(
        self,
        cfg,
        router: torch.Tensor,
        bias: torch.Tensor | None,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        shared: SwiGLU | None,
        shared_scale: torch.Tensor | None,
        tokens_per_expert: torch.Tensor,
    ):
        assert cfg.num_experts_per_tok <= 64  # the kernel's fixed-size choice arrays (callers check)
        bias = bias.float() if bias is not None else None
        self.weights = (router, bias, gate_up, down, *(shared.weights if shared else (None, None, None)), shared_scale)
        self.dtype = router.dtype
        self.counts = tokens_per_expert
        E, D = router.shape
        I = down.shape[-1]  # noqa: E741 (legend)
        Is = shared.I if shared is not None else 0
        self.D = D
        self.scratch_size = (
            2 * D + max(2 * I, Is) + 2 * E + cfg.n_group + E // 4 + 1  # E bytes of flags, then
            + cfg.num_experts_per_tok * (2 * I + D)  # each chosen expert's output (transposed experts)
        )
        self.args = (
            *(None if w is None else w.data_ptr() for w in self.weights),
            tokens_per_expert.data_ptr(),
        )
        self.config = (
            cfg.scoring_func == "sigmoid", ROUTE_METHODS[cfg.topk_method], cfg.norm_topk_prob,
            cfg.routed_scaling_factor, D, E, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, I, Is,
            int(self.dtype == torch.bfloat16), int(not gate_up.is_contiguous()), int(gate_up.dtype == torch.bfloat16),
            shared.wbf if shared is not None else 0,
        )  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(1, self.D, dtype=self.dtype)
        scratch = torch.empty(self.scratch_size)
        _lib.moe_moe_decode(x.data_ptr(), *self.args, y.data_ptr(), scratch.data_ptr(), *self.config)
        return y


# Up to this many tokens the routed experts of a bfloat16 MoE layer take moe_experts_bf16 rather
# than torch's grouped GEMM (one oneDNN matmul per expert, ~30-60 us each whatever its few rows):
# benchmarks/runtime_moe_experts.py measured the two on the benchmark checkpoints' layers.
EXPERTS_MAX_TOKENS = 64
# Up to this many tokens a float32 model's experts kept as bfloat16 (narrow_experts) take
# moe_experts_f32; more (a long prefill) widen each expert's matrices for MKL's sgemm, unless
# helper threads run: then moe_experts_f32 takes any number of float32 tokens, a chunk at a time
# (experts_chunk; Mixtral-big's 1024 tokens 137 ms against MKL's 174 on one thread).
NARROW_MAX_TOKENS = 256
EXPERTS_SCRATCH_BYTES = 32 << 20  # moe_experts_f32's scratch for a chunk of tokens, at most


def experts_chunk(A: int, D: int, I: int) -> int:  # noqa: E741 (legend)
    """Tokens a call of moe_experts_f32 takes (its scratch: a hidden and an output row per choice)."""
    return max(1, min(NARROW_MAX_TOKENS, EXPERTS_SCRATCH_BYTES // (4 * A * (D + 2 * I))))


def shared_experts(m: layers.Experts, bf16: bool) -> bool:
    """Whether helper threads share m's float32 experts (HELPER_MIN_BYTES of them or more), so that
    moe_experts_f32 takes a prefill's tokens too (decision 37; not on AVX-512, whose sgemm runs
    twice as wide as this kernel, as f32_rows)."""
    size = m.gate_up_proj.numel() * m.gate_up_proj.element_size() + m.down_proj.numel() * m.down_proj.element_size()
    return bool(_helpers) and not bf16 and not _avx512 and size >= HELPER_MIN_BYTES


def experts_kernel(m: layers.Experts, x: torch.Tensor) -> bool:
    """Whether moe_experts_bf16 (bfloat16, AVX-512F) or moe_experts_f32 (float32, AVX2) computes m's
    forward on x [N, D]: on the CPU, outside autograd, torch on one thread, 2 <= N <=
    EXPERTS_MAX_TOKENS (one token: moe_moe_decode, or the loop over its experts; a float32 model's
    experts stored as bfloat16 (narrow_experts): 1 <= N <= NARROW_MAX_TOKENS; float32 experts the
    helper threads share: any N, a chunk at a time), every expert on this
    rank, SiLU, the engine's column-major experts of x's dtype (experts_layout) or narrowed, D and
    I multiples of 16 (bfloat16) or 8 (float32)."""
    gate_up, down = m.gate_up_proj, m.down_proj
    bf16 = x.dtype == torch.bfloat16
    narrowed = m.compute_dtype is torch.float32 and x.dtype == torch.float32 and gate_up.dtype == torch.bfloat16
    return (
        (bf16 or x.dtype == torch.float32)
        and x.dim() == 2
        and (1 if narrowed else 2) <= x.shape[0]
        and (x.shape[0] <= (NARROW_MAX_TOKENS if narrowed else EXPERTS_MAX_TOKENS) or shared_experts(m, bf16))
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
        and torch.get_num_threads() == 1
        and _lib is not None
        and (_avx512 or not bf16)
        and m.num_local_experts == m.num_experts
        and m.act is F.silu
        and gate_up.dtype == down.dtype
        and (gate_up.dtype == x.dtype or narrowed)
        and gate_up.transpose(-1, -2).is_contiguous()
        and down.transpose(-1, -2).is_contiguous()
        and gate_up.shape[-1] % (16 if bf16 else 8) == 0
        and down.shape[-1] % (16 if bf16 else 8) == 0
    )


def routed_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    amx: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] bfloat16 or float32, weights / ids [N, A] -> (sum over a of weights[:, a] * expert
    ids[:, a] on x [N, D] of x's dtype, tokens per expert [E]); gate_up [E, 2I, D] and down [E, D, I]
    of x's dtype: by moe_experts_bf16 or moe_experts_f32 on each expert's matrix column-major
    (experts_kernel checks all this), or with `amx` by moe_amx_experts (moe_dpbf16_experts on a CPU
    with AVX512-BF16 and no AMX) on the bfloat16 experts row-major (amx_experts checks)."""
    N, A = ids.shape
    E, D, I = down.shape  # noqa: E741 (legend)
    x = x.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    y = torch.empty(N, D, dtype=x.dtype)
    counts = torch.empty(E, dtype=torch.int64)
    ptrs = (x, ids, weights, gate_up, down, y, counts)
    if amx:
        kernel = _lib.moe_amx_experts if _amx else _lib.moe_dpbf16_experts
        if kernel(*(t.data_ptr() for t in ptrs), N, A, D, E, I):
            raise MemoryError(f"{kernel.__name__}: no memory for the scratch of {N} tokens")
    else:
        if x.dtype == torch.bfloat16:
            scratch = torch.empty(N * D + N * A + E + 1 + N * (D + 2 * I))
            _lib.moe_experts_bf16(*(t.data_ptr() for t in ptrs), scratch.data_ptr(), N, A, D, E, I)
        else:  # the experts float32, or bfloat16 widened as read (narrow_experts); a chunk of tokens a call
            chunk = min(N, experts_chunk(A, D, I))
            scratch = torch.empty(chunk * A * (D + 2 * I) + 2 * chunk * A + 2 * E + 1)
            wbf = int(gate_up.dtype == torch.bfloat16)
            for n in range(0, N, chunk):
                part = counts if n == 0 else torch.empty(E, dtype=torch.int64)  # the C sets its counts
                _lib.moe_experts_f32(
                    x[n].data_ptr(), ids[n].data_ptr(), weights[n].data_ptr(), gate_up.data_ptr(), down.data_ptr(),
                    y[n].data_ptr(), part.data_ptr(), scratch.data_ptr(), min(chunk, N - n), A, D, E, I, wbf,
                )  # fmt: skip
                if n:
                    counts += part
    return y, counts


def amx_experts_layer(m: layers.Experts, any_intermediate: bool = False) -> bool:
    """Whether moe_amx_experts (or, on a CPU with AVX512-BF16 but no AMX, moe_dpbf16_experts: the
    same sums by dot products, decision 40) can take m's experts, once row-major: the CPU has AMX
    (_amx) or AVX512-BF16 (_dpbf16), bfloat16, every expert on this rank, SiLU, D and I multiples of
    32 (any I with `any_intermediate`: what pad_intermediate makes of it)."""
    D, I = m.down_proj.shape[1:]  # noqa: E741 (legend)
    return (
        (_amx or _dpbf16)
        and m.gate_up_proj.dtype is torch.bfloat16
        and m.down_proj.dtype is torch.bfloat16
        and m.num_local_experts == m.num_experts
        and m.act is F.silu
        and D % 32 == 0
        and (I % 32 == 0 or any_intermediate)
    )


def pad_intermediate(m: layers.Experts) -> int:
    """m's experts with their intermediate size I padded with zeros to a multiple of 32, the AMX
    tiles' K, row-major: gate_up [E, 2I, D] -> [E, 2Ip, D] (gate rows, zero rows, up rows, zero
    rows) and down [E, D, I] -> [E, D, Ip] (zero columns). Exact: a padded unit's gate and up are 0,
    silu(0) * 0 = 0, and its down column is 0. Returns the padded I (I where it already fits)."""
    E, D, I = m.down_proj.shape  # noqa: E741 (legend)
    Ip = -(-I // 32) * 32
    if Ip == I:
        return I
    gate_up = m.gate_up_proj.data.new_zeros(E, 2 * Ip, D)
    gate_up[:, :I] = m.gate_up_proj.data[:, :I]
    gate_up[:, Ip : Ip + I] = m.gate_up_proj.data[:, I:]
    down = m.down_proj.data.new_zeros(E, D, Ip)
    down[:, :, :I] = m.down_proj.data
    m.gate_up_proj.data, m.down_proj.data = gate_up, down
    return Ip


def amx_experts(m: layers.Experts, x: torch.Tensor) -> bool:
    """Whether moe_amx_experts (moe_dpbf16_experts without AMX) computes m's forward on x [N, D]: a layer it takes
    (amx_experts_layer) with its experts row-major as the checkpoint stores them (the engine's
    layout then: experts_layout), x bfloat16 on the CPU, N >= 2 (one token: moe_moe_decode, or the
    loop over its experts), outside autograd, torch on one thread."""
    return (
        (_amx or _dpbf16)
        and x.dtype is torch.bfloat16
        and x.dim() == 2
        and x.shape[0] >= 2
        and x.is_cpu
        and m.gate_up_proj.is_contiguous()
        and m.down_proj.is_contiguous()
        and amx_experts_layer(m)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and torch.get_num_threads() == 1
    )


def amx_routed_experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """routed_experts by moe_amx_experts (amx_experts checks the arguments): gate_up [E, 2I, D] and
    down [E, D, I] row-major."""
    return routed_experts(x, weights, ids, gate_up, down, amx=True)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for a [S, V] float32 tensor (the first index on ties, a NaN's if any);
    on the CPU with the kernels loaded, moe_argmax_rows (AVX-512F or AVX2; torch's runs ~2 ns an
    element on one thread: 0.6 ms for 32 x 8192 logits), else torch's."""
    if not (
        x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(1) == 1
        and x.shape[1] > 0 and available()
    ):  # fmt: skip
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _lib.moe_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out


class Route:
    """models.model.Router for the rows of x [N, D] (up to EXPERTS_MAX_TOKENS, x's dtype the
    router weight's): (weights [N, A] float32, ids [N, A] int64), ties to the lower expert. `bias`
    (noaux_tc's) is read as float32 (a float32 copy is kept if it is not)."""

    def __init__(self, cfg, router: torch.Tensor, bias: torch.Tensor | None):
        assert cfg.num_experts_per_tok <= 64
        bias = bias.float() if bias is not None else None
        self.weights = (router, bias)
        self.dtype = router.dtype
        E, D = router.shape
        self.A = cfg.num_experts_per_tok
        self.scratch_size = D + 2 * E + cfg.n_group + E // 4 + 1  # last E bytes: flags
        self.ptrs = (router.data_ptr(), None if bias is None else bias.data_ptr())
        self.config = (
            cfg.scoring_func == "sigmoid", ROUTE_METHODS[cfg.topk_method], cfg.norm_topk_prob,
            cfg.routed_scaling_factor, D, E, self.A, cfg.n_group, cfg.topk_group, int(self.dtype == torch.bfloat16),
        )  # fmt: skip

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        N = x.shape[0]
        ids = torch.empty(N, self.A, dtype=torch.int64)
        weights = torch.empty(N, self.A)
        scratch = torch.empty(self.scratch_size)
        _lib.moe_route_rows(
            x.data_ptr(), *self.ptrs, ids.data_ptr(), weights.data_ptr(), scratch.data_ptr(), N, *self.config
        )
        return weights, ids


class GQAttention:
    """models.model.Attention (grouped-query, optional qkv / o biases and q/k norms) for one new
    bfloat16 or float32 token x [1, D] over the paged cache, as C calls only but for the bias adds: the q, k,
    v projections (gemv), the q/k RMSNorms per head (Qwen3), the rope and cache writes
    (paged_attention.gqa_prepare's call), attention over the cache read in place
    (paged_attention.decode's) and o_proj. The same kernels, in the same order, as the torch path
    takes for one row (a bias added to the rounded gemv, as `linear` does), without its ~100 us of
    module calls and argument checks a layer. `qkv_bias`: (q's, k's, v's biases); `qk_norm`:
    (q_norm, k_norm) RMSNorm modules."""

    def __init__(self, q_proj, k_proj, v_proj, o_proj, heads: int, kv_heads: int, interleaved: bool, scale: float,
                 window: int | None, paged_lib, qkv_bias=None, o_bias=None, qk_norm=None, dtype=None):  # fmt: skip
        self.weights = (q_proj, k_proj, v_proj, o_proj)
        self.dtype = dtype or q_proj.dtype  # the layer's; float32 over weights kept as bfloat16 (narrow_linears)
        self.bf = int(self.dtype == torch.bfloat16)
        self.wbf = int(q_proj.dtype == torch.bfloat16)
        self.ptrs = tuple(w.data_ptr() for w in self.weights)
        self.H, self.K = heads, kv_heads
        self.Dh = q_proj.shape[0] // heads
        self.D = o_proj.shape[0]
        self.interleaved, self.scale, self.window = int(interleaved), scale, window or 0
        self.paged = paged_lib
        self.qkv_bias, self.o_bias, self.qk_norm = qkv_bias, o_bias, qk_norm

    def applies(self, x: torch.Tensor, cos: torch.Tensor, ctx, cache: torch.Tensor | None) -> bool:
        return (
            cache is not None
            and cache.dtype == self.dtype
            and cache.is_contiguous()
            and ctx.max_new == 1
            and cos.shape == (1, self.Dh // 2)
            and cos.dtype == self.dtype
            and ctx.block_tables.dtype == torch.int64
        )

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx, cache: torch.Tensor):
        H, K, Dh, D = self.H, self.K, self.Dh, self.D
        wq, wk, wv, wo = self.ptrs
        x = x.contiguous()
        qkv = torch.empty(H * Dh + 2 * K * Dh, dtype=self.dtype)  # q, then k, then v
        att = torch.empty(H * Dh, dtype=self.dtype)
        y = torch.empty(1, D, dtype=self.dtype)
        scratch = torch.empty(max(D, H * Dh) + H * Dh)
        size = qkv.element_size()
        q, k, v = qkv.data_ptr(), qkv.data_ptr() + size * H * Dh, qkv.data_ptr() + size * (H + K) * Dh
        for w, out, rows in ((wq, q, H * Dh), (wk, k, K * Dh), (wv, v, K * Dh)):
            _lib.moe_gemv(w, x.data_ptr(), out, scratch.data_ptr(), rows, D, self.bf, self.wbf)
        if self.qkv_bias is not None:
            for part, bias in zip(qkv.split((H * Dh, K * Dh, K * Dh)), self.qkv_bias, strict=True):
                part.add_(bias)
        if self.qk_norm is not None:  # each head's row normed in place (the kernel reads a row, then writes it)
            for ptr, rows, norm in ((q, H, self.qk_norm[0]), (k, K, self.qk_norm[1])):
                _lib.moe_rmsnorm_rows(ptr, Dh, norm.weight.data_ptr(), ptr, scratch.data_ptr(), norm.eps, rows, Dh, self.bf)
        tables, lens = ctx.block_tables.contiguous(), ctx.context_lens.contiguous()
        slots = ctx.slot_mapping.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        cache_stride = K * Dh  # cache [2, slots, K, Dh], contiguous
        kc, vc = cache.data_ptr(), cache.data_ptr() + size * cache.stride(0)
        prepare = self.paged.moe_gqa_prepare_bf16 if self.bf else self.paged.moe_gqa_prepare_f32
        prepare(
            q, k, v, cos.data_ptr(), sin.data_ptr(), kc, vc, cache_stride, slots.data_ptr(), 1, H, K, Dh, self.interleaved,
            H * Dh, K * Dh, K * Dh,
        )  # fmt: skip
        args = (
            q, H * Dh, Dh, None, 0, 0, Dh, kc, cache_stride, Dh, vc, cache_stride, Dh,
            tables.data_ptr(), tables.stride(0), lens.data_ptr(), att.data_ptr(), H * Dh, Dh,
            1, K, H // K, Dh, Dh, ctx.block_size, self.window, self.scale,
        )  # fmt: skip
        if self.bf:  # the AVX-512 build (the layer is built for bfloat16 only where it runs)
            self.paged.moe_paged_decode_bf16(*args)
        else:
            self.paged.moe_paged_decode_avx2(*args, 0)
        _lib.moe_gemv(wo, att.data_ptr(), y.data_ptr(), scratch.data_ptr(), D, H * Dh, self.bf, self.wbf)
        return y if self.o_bias is None else y.add_(self.o_bias)


class MLAttention:
    """models.model.MLAttention for one new token x [1, D] over the paged cache: q_a [Q, D] and its
    norm [Q] with q_b [H (P + R), Q] (or q_a None and q_b the full q_proj [H (P + R), D]); kv_a
    [C + R, D] (kv_a_proj_with_mqa), kv_a_norm [C]; w_kv [H, P + Dv, C] (kv_b_proj); o_proj [D, H Dv].
    The layer computes in `dtype` (its norms' and cache's): the projections' dtype, or float32 over
    projections kept as bfloat16 (narrow_linears)."""

    def __init__(
        self,
        q_a: torch.Tensor | None,
        q_a_norm: torch.Tensor | None,
        q_b: torch.Tensor,
        kv_a: torch.Tensor,
        kv_a_norm: torch.Tensor,
        w_kv: torch.Tensor,
        o_proj: torch.Tensor,
        interleaved: bool,
        scale: float,
        dtype: torch.dtype | None = None,
    ):
        self.weights = (q_a, q_a_norm, q_b, kv_a, kv_a_norm, w_kv, o_proj)
        self.dtype = dtype or q_b.dtype
        self.wbf = is_bf16(q_b)
        self.ptrs = tuple(None if w is None else w.data_ptr() for w in self.weights)
        H, P_Dv, C = w_kv.shape
        R = kv_a.shape[0] - C
        P = q_b.shape[0] // H - R
        Q = q_a.shape[0] if q_a is not None else 0
        self.D = o_proj.shape[0]
        self.interleaved, self.scale = interleaved, scale
        self.dims = (self.D, Q, H, P, R, C, P_Dv - P)
        self.scratch_size = 2 * self.D + Q + H * (P + R) + C + 3 * R + H * (P_Dv - P)

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        slot: int,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """x [1, D]; cos/sin [R/2] of its position; the new cache row at `slot` of cache
        [slots, C + R]; the context's rows `slots` [L] (int64, the new one last) -> [1, D]. x,
        cos, sin and the cache are of the weights' dtype."""
        x, slots, cos, sin = x.contiguous(), slots.contiguous(), cos.contiguous(), sin.contiguous()
        L = slots.shape[0]
        y = torch.empty(1, self.D, dtype=self.dtype)
        scratch = torch.empty(self.scratch_size)
        if _lib.moe_mla_attention(
            x.data_ptr(), *self.ptrs, cos.data_ptr(), sin.data_ptr(), cache.data_ptr(), slots.data_ptr(),
            y.data_ptr(), scratch.data_ptr(), self.interleaved, slot, self.scale, L, *self.dims, is_bf16(y), self.wbf,
        ):  # fmt: skip
            raise MemoryError(f"moe_mla_attention: no memory for the heads' rows over {L} tokens")
        return y


# ---- the transform: layers whose batch-1 decode takes the kernels ---------------------------------


class DecodeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# Up to this many rows RMSNorm takes moe_rmsnorm_rows (a decode step's rows); beyond, torch's ops,
# except for bfloat16 rows on AVX-512 (D a multiple of 16), whose vectorized kernel takes any
# number: a prefill's 1024 rows of D 1024 in 0.4 ms against torch's 3.4 (its float32 round trip).
NORM_MAX_ROWS = 256


def rmsnorm_rows(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """rmsnorm of each row of x [..., D] whose rows are D apart or one row apart (a [N, D] view of
    a wider matrix), or None (x not such, more than NORM_MAX_ROWS rows, or the kernels do not
    apply: torch's ops then)."""
    D = x.shape[-1]
    if x.dim() == 2 and x.stride(1) == 1:
        ld = x.stride(0)
    elif x.is_contiguous():
        ld = D
    else:
        return None
    rows = x.numel() // D if D else 0
    most = sys.maxsize if x.dtype is torch.bfloat16 and _avx512 and D % 16 == 0 else NORM_MAX_ROWS
    if not (0 < rows <= most and (rows == 1 or ld >= D)) or not kernel_rows(x.dtype, w):
        return None
    if x.dtype not in DTYPES or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if torch.get_num_threads() != 1 or _lib is None:
        return None
    y = torch.empty(x.shape, dtype=x.dtype)
    scratch = torch.empty(D)
    _lib.moe_rmsnorm_rows(x.data_ptr(), ld, w.data_ptr(), y.data_ptr(), scratch.data_ptr(), eps, rows, D, is_bf16(x))
    return y


class DecodeRMSNorm(layers.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_row(x) and kernel_rows(x.dtype, self.weight):  # batch-1 decode: the fewest checks
            return rmsnorm(x, self.weight, self.eps)
        y = rmsnorm_rows(x, self.weight, self.eps)  # a decode step's rows: one C call, not four ops
        return y if y is not None else super().forward(x)


class DecodeExperts(layers.Experts):
    def forward(self, x, weights, ids):
        if amx_experts(self, x):  # any number of tokens where the CPU has AMX or AVX512-BF16: one C call
            return amx_routed_experts(x, weights, ids, self.gate_up_proj, self.down_proj)
        if experts_kernel(self, x):  # a few tokens: one C call, not a oneDNN matmul per expert
            return routed_experts(x, weights, ids, self.gate_up_proj, self.down_proj)
        return super().forward(x, weights, ids)

    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.expert_weight(self.gate_up_proj, e, x)).chunk(2, dim=-1)  # [n, I] each
        return linear(self.act(gate).mul_(up), self.expert_weight(self.down_proj, e, x))


class DecodeMLP(layers.MLP):
    decode: SwiGLU

    def forward(self, x):
        if one_row(x) and x.dtype == self.decode.dtype:  # batch-1 decode: one C call
            return self.decode(x)
        return super().forward(x)


class DecodeMoE(layers.MoE):
    decode: MoE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_row(x) and x.dtype == self.decode.dtype:  # router, experts and shared expert: one C call
            return self.decode(x)
        return super().forward(x)


class DecodeRouter(layers.Router):
    decode: Route

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            x.dim() == 2 and 2 <= x.shape[0] <= EXPERTS_MAX_TOKENS and x.dtype == self.decode.dtype
            and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
            and torch.get_num_threads() == 1 and _lib is not None
        ):  # fmt: skip
            return self.decode(x)  # a decode step's tokens: one C call, not ~15 small ops
        return super().forward(x)


class DecodeAttention(layers.Attention):
    decode: GQAttention

    def forward(self, x, cos, sin, ctx, cache):
        if one_row(x) and x.dtype == self.decode.dtype and self.decode.applies(x, cos, ctx, cache):
            return self.decode(x, cos, sin, ctx, cache)  # C calls only
        return super().forward(x, cos, sin, ctx, cache)


def amx_heads_apply(x: torch.Tensor, N: int) -> bool:
    """Whether moe_amx_heads computes x [H, M, K] (rows contiguous) @ each head's [N, K]^T: bfloat16
    on the CPU with AMX (_amx), N a multiple of 16 and K of 32, outside autograd, torch on one
    thread."""
    return (
        _amx
        and x.dtype is torch.bfloat16
        and x.is_cpu
        and x.dim() == 3
        and x.stride(2) == 1
        and x.shape[1] > 0
        and N % 16 == 0
        and x.shape[2] % 32 == 0
        and not (torch.is_grad_enabled() and x.requires_grad)
        and torch.get_num_threads() == 1
    )


def amx_heads(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[h] = x[h] @ w[h]^T for each head h by moe_amx_heads (amx_heads_apply checks x): x [H, M, K]
    and out [H, M, N] any strides with rows contiguous, w [H, N, K] contiguous bfloat16."""
    H, M, K = x.shape
    N = w.shape[1]
    if _lib.moe_amx_heads(
        x.data_ptr(), x.stride(1), x.stride(0), w.data_ptr(), out.data_ptr(), out.stride(1), out.stride(0), H, M, N, K
    ):
        raise MemoryError(f"moe_amx_heads: no memory for {M} rows of {K}")
    return out


class DecodeMLAttention(layers.MLAttention):
    """MLA with the kernels: a one-token step is one C call (MLAttention); a step of several
    sequences takes the absorbed per-head products on AMX tiles where the CPU has them
    (moe_amx_heads: torch's bmm runs these small products at ~100 GFLOP/s), shared with the helper
    threads."""

    decode: MLAttention

    def forward(self, x, cos, sin, ctx, cache):
        if one_row(x) and x.dtype == self.decode.dtype and cache is not None and cache.dtype == x.dtype:
            # one C call
            slots = ctx.context_slots[0, : ctx.max_context]  # the one sequence's context, unpadded
            return self.decode(x, cos[0], sin[0], cache, int(ctx.slot_mapping[0]), slots)
        return super().forward(x, cos, sin, ctx, cache)

    def amx_absorbed(self, x: torch.Tensor, n: int) -> bool:
        return amx_heads_apply(x, n) and getattr(self.kv_b_proj, "dequantized", None) is None

    def latent_queries(self, q_nope: torch.Tensor) -> torch.Tensor:
        C = self.cfg.kv_lora_rank
        x = q_nope.transpose(0, 1)  # [H, N, P]
        if not self.amx_absorbed(x, C):
            return super().latent_queries(q_nope)
        w_uk_t, _ = self.absorbed_weights(q_nope.dtype, rows=True)  # [H, C, P]
        return amx_heads(x, w_uk_t, q_nope.new_empty(x.shape[0], x.shape[1], C))

    def absorbed_output(self, out_latent: torch.Tensor) -> torch.Tensor:
        H, N, _ = out_latent.shape
        Dv = self.cfg.v_head_dim
        if not self.amx_absorbed(out_latent, Dv):
            return super().absorbed_output(out_latent)
        _, w_uv = self.absorbed_weights(out_latent.dtype, rows=True)  # [H, Dv, C]
        out = out_latent.new_empty(N, H, Dv)  # o_proj's rows, written head by head
        amx_heads(out_latent, w_uv, out.transpose(0, 1))
        return self.o_proj(out.view(N, H * Dv))


# Every layer whose batch-1 decode the kernels take (with or without a prepared `decode`).
DECODE_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: DecodeLinear,
    layers.RMSNorm: DecodeRMSNorm,
    layers.Experts: DecodeExperts,
    layers.MLP: DecodeMLP,
    layers.MoE: DecodeMoE,
    layers.MLAttention: DecodeMLAttention,
    layers.Attention: DecodeAttention,
    layers.Router: DecodeRouter,
}
TORCH_CLASS = {decode: torch_class for torch_class, decode in DECODE_CLASS.items()}
LEAVES = (nn.Linear, layers.RMSNorm, layers.Experts)  # need nothing prepared: their forward checks each call


def use_cpu_decode_kernels(model: nn.Module) -> bool:
    """Hand the batch-1 decode step of every layer the C kernels can compute to them.

    A transform applied after the others (int8 quantization swaps in modules whose weights the
    kernels do not read): linear layers, RMSNorm and the experts' matmuls take the kernels' gemv
    and norm for one float32 or bfloat16 row; MLA attention, MoE layers and SwiGLU MLPs with float32
    or bfloat16 weights (one dtype per layer) and no biases get a prepared `decode` callable (one C
    call per layer). Every other case runs
    the torch code. Returns whether the kernels exist (False: the model is left as built).
    One rank's part of a tensor / expert parallel model is left to torch too: the layer kernels
    route and attend over the whole model's experts and heads.
    """
    for m in model.modules():
        if type(m) in TORCH_CLASS:  # a second call (after another transform) starts afresh
            m.__class__ = TORCH_CLASS[type(m)]
            m.__dict__.pop("decode", None)
    shard = getattr(model, "shard", None)
    if not available() or (shard is not None and shard.sharded):
        return False
    experts_layout(model)  # before the kernels take the expert weights' addresses
    narrow_linears(model)  # likewise, and before fusing (the fused matrix takes their dtype)
    fuse_projections(model)
    prepared = [(m, decode) for m in model.modules() if (decode := _layer_kernel(m)) is not None]
    for m in model.modules():
        if type(m) in LEAVES:
            m.__class__ = DECODE_CLASS[type(m)]
    for m, decode in prepared:
        m.__class__ = DECODE_CLASS[type(m)]
        m.decode = decode
    return True


def fuse_projections(model: nn.Module) -> int:
    """Each attention layer's q, k and v projections, and each SwiGLU MLP's gate and up (a dense
    layer or a shared expert), as one matrix (shapes.Fused): the linears' weights and biases become
    row views of it, so memory is unchanged and the one-row kernels read the same bytes, while a
    step's rows take one oneDNN matmul where they took two or three (its fixed cost, ~30-100 us a
    call at these sizes, is much of a 32-sequence step: Qwen2-MoE's had 33 linears). Plain
    nn.Linear of one dtype on the CPU only (not int8 / FP8); a layer already fused is left as it is.
    Returns how many layers it fused."""
    n = 0
    for m in model.modules():
        if type(m) is layers.Attention:
            n += _fuse(m, "qkv", [m.q_proj, m.k_proj, m.v_proj])
        elif type(m) is layers.MLP:
            n += _fuse(m, "gate_up", [m.gate_proj, m.up_proj])
    return n


def _fuse(module: nn.Module, name: str, linears: list[nn.Module]) -> bool:
    w0 = linears[0].weight
    done = shapes.fused(module, name)
    if done is not None and done.weight.data_ptr() == w0.data_ptr():
        return False
    if not (
        all(type(lin) in (nn.Linear, DecodeLinear) for lin in linears)
        and all(type(lin.weight) is nn.Parameter for lin in linears)
        and len({(lin.weight.dtype, lin.weight.device, lin.weight.shape[1]) for lin in linears}) == 1
        and w0.device.type == "cpu"
        and len({lin.bias is None for lin in linears}) == 1
    ):
        return False
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        biases = [lin.bias for lin in linears]
        bias = None if biases[0] is None else torch.cat(biases)
        sizes = [lin.weight.shape[0] for lin in linears]
        parts = bias.split(sizes) if bias is not None else [None] * len(linears)
        for lin, w, b in zip(linears, weight.split(sizes), parts, strict=True):
            lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
            if b is not None:
                lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
    module.__dict__.setdefault("fused", {})[name] = shapes.Fused(weight, bias, sizes, linear, linears)
    return True


def _layer_kernel(m: nn.Module):
    """The prepared kernel for one MLA attention, MoE or MLP layer, or None (torch runs it)."""
    if type(m) is layers.MLAttention:
        cfg = m.cfg
        lora = cfg.q_lora_rank is not None
        q = [m.q_a_proj, m.q_b_proj] if lora else [m.q_proj]
        if cfg.sliding_window is not None or not _no_bias(*q, m.kv_a_proj_with_mqa, m.kv_b_proj, m.o_proj):
            return None
        H, P, C, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        dtype = layer_dtype(q[-1])
        weights = [
            m.q_a_proj.weight if lora else None,
            m.q_a_layernorm.weight if lora else None,
            q[-1].weight,
            m.kv_a_proj_with_mqa.weight,
            m.kv_a_layernorm.weight,
            m.kv_b_proj.weight.view(H, P + Dv, C),
            m.o_proj.weight,
        ]
        norms = [w for w in (weights[1], weights[4]) if w is not None]
        projections = [w for i, w in enumerate(weights) if i not in (1, 4)]
        if not (_rows(*projections) and kernel_rows(dtype, *norms)):
            return None
        return MLAttention(*weights, cfg.rope_interleave, m.scale, dtype=dtype)
    if type(m) is layers.Attention:
        cfg = m.cfg
        dtype = layer_dtype(m.q_proj)
        bf16 = dtype == torch.bfloat16  # bfloat16: its AVX-512 prepare and decode
        paged_lib = paged_kernel.avx512_lib() if bf16 else paged_kernel._load()
        linears = (m.q_proj, m.k_proj, m.v_proj, m.o_proj)
        weights = [p.weight for p in linears]
        qkv_biases = [p.bias for p in linears[:3] if p.bias is not None]
        norms = [m.q_norm, m.k_norm] if cfg.qk_norm else []
        others = [t for t in (*qkv_biases, m.o_proj.bias, *(n.weight for n in norms)) if t is not None]
        if (
            paged_lib is None
            or any(type(p) is not nn.Linear for p in linears)
            or len(qkv_biases) not in (0, 3)
            or any(type(n) is not layers.RMSNorm for n in norms)
            or dtype not in (torch.bfloat16, torch.float32)
            or not _rows(*weights)
            or not kernel_rows(dtype, *others)
            or cfg.head_dim % 2
        ):
            return None
        return GQAttention(
            *weights, m.num_heads, m.num_kv_heads, cfg.rope_interleave, m.scale, cfg.sliding_window, paged_lib,
            dtype=dtype,
            qkv_bias=tuple(qkv_biases) or None,
            o_bias=m.o_proj.bias,
            qk_norm=tuple(norms) or None,
        )  # fmt: skip
    if type(m) is layers.MLP:
        return _swiglu(m)
    if type(m) is layers.Router:  # its one-token case is inside the MoE kernel; this one takes a few tokens
        ok = m.cfg.num_experts_per_tok <= 64 and _rows(m.weight)
        return Route(m.cfg, m.weight, getattr(m, "e_score_correction_bias", None)) if ok else None
    if (
        type(m) is layers.MoE
        and type(m.experts) is layers.Experts
        and m.experts.act is F.silu
        and m.gate.cfg.num_experts_per_tok <= 64
    ):
        shared = getattr(m, "shared_experts", None)
        shared_decode = _swiglu(shared) if shared is not None else None
        if shared is not None and shared_decode is None:
            return None
        gate = getattr(m, "shared_expert_gate", None)
        bias = getattr(m.gate, "e_score_correction_bias", None)
        weights = [m.gate.weight, bias, m.experts.gate_up_proj, m.experts.down_proj]
        dtype = m.gate.weight.dtype
        narrowed = m.experts.compute_dtype is dtype  # stored as bfloat16 (narrow_experts)
        if (
            (gate is None or _no_bias(gate))
            and _rows(m.gate.weight, gate.weight if gate is not None else None)
            and _experts_rows(m.experts.gate_up_proj, m.experts.down_proj, torch.bfloat16 if narrowed else dtype)
            and (shared_decode is None or shared_decode.dtype == dtype)
        ):
            return MoE(
                m.gate.cfg,
                *weights,
                shared_decode,
                gate.weight if gate is not None else None,
                m.tokens_per_expert,
            )
    return None


def layer_dtype(lin: nn.Module) -> torch.dtype:
    """The dtype a layer computes in, from one of its linears: its weight's, or float32 where
    narrow_linears kept a float32 weight as bfloat16."""
    return getattr(lin, "compute_dtype", None) or lin.weight.dtype


def _rows(*ws) -> bool:
    """Whether the given weights (None: absent) are of one kernel dtype with contiguous rows."""
    given = [w for w in ws if w is not None]
    return kernel_rows(given[0].dtype, *given)


def _experts_rows(gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether stacked expert weights are of `dtype`, all row-major or all column-major per expert."""
    if gate_up.dtype != dtype or down.dtype != dtype or dtype not in DTYPES:
        return False
    if gate_up.is_contiguous() and down.is_contiguous():
        return True
    return gate_up.transpose(-1, -2).is_contiguous() and down.transpose(-1, -2).is_contiguous()


def _no_bias(*linears) -> bool:
    return all(type(m) is nn.Linear and m.bias is None for m in linears)


def _swiglu(mlp: layers.MLP) -> SwiGLU | None:
    ok = mlp.act is F.silu and _no_bias(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    return SwiGLU(*weights, dtype=layer_dtype(mlp.gate_proj)) if ok and _rows(*weights) else None


# ---- without the kernels -----------------------------------------------------------------------


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same [..., out, in] values stored in-major (strides swapped on the last two dims)."""
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


def use_decode_layout(model: nn.Module) -> nn.Module:
    """Store in place, column-major, the weights whose BLAS matrix-vector product that makes faster.

    For when the C decode kernels are not available; they read row-major weights.
    A decode step multiplies one row per sequence by every weight, so it is bound by how fast the
    weights stream from memory. On the CPU, MKL's gemv for x @ W.T over a row-major W [out, in]
    reads about 12 GB/s on one thread; over the same W stored column-major (x @ Wt with Wt [in, out]
    contiguous) it reads 13-20 GB/s when out >= in, and less when out < in; for bfloat16 it is
    ~5x slower, so only float32 weights move. Values, names and shapes are unchanged (only
    strides), and larger matmuls (prefill, 32 sequences) run alike.
    kv_b_proj stays row-major: MLA views it per head for the absorbed attention.
    """
    keep = {id(m.kv_b_proj) for m in model.modules() if isinstance(m, layers.MLAttention)}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features >= m.in_features and id(m) not in keep:
                if m.weight.dtype == torch.float32:  # bf16/fp16 column-major gemv is ~5x slower
                    m.weight.data = column_major(m.weight.data)
            elif type(m) is layers.Experts and m.gate_up_proj.dtype == torch.float32:  # not int8 or bf16
                m.gate_up_proj.data = column_major(m.gate_up_proj.data)  # [E, 2I, D]: 2I >= D typically
                m.down_proj.data = column_major(m.down_proj.data)  # [E, D, I]
    return grouped_experts_layout(model)


def experts_layout(model: nn.Module) -> nn.Module:
    """The experts' layout for the kernels: bfloat16 / float16 row-major, as the checkpoint stores
    them, where moe_amx_experts takes the layer (amx_experts_layer), since it reads each expert's
    rows as its A tiles (a second call restores what grouped_experts_layout changed), their
    intermediate size padded with zeros to a multiple of 32 where it is not (pad_intermediate:
    exact, a few percent more bytes, rather than torch's grouped GEMM); column-major
    otherwise (grouped_experts_layout, for torch's grouped GEMM and moe_experts_bf16). float32
    column-major: what moe_experts_f32 reads, moe_moe_decode takes either, and MKL's per-expert
    sgemm runs alike; stored as bfloat16 where that is exact (narrow_experts)."""
    narrowed, saved, padded = 0, 0, collections.Counter()  # padded: (I, padded I) -> layers
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, layers.Experts) and m.plain_weights and m.gate_up_proj.dtype == torch.float32:
                narrow = narrow_experts(m)
                if narrow is not None:
                    saved += 2 * (m.gate_up_proj.numel() + m.down_proj.numel())
                    narrowed += 1
                    m.compute_dtype = torch.float32
                gate_up, down = narrow or (m.gate_up_proj.data, m.down_proj.data)
                m.gate_up_proj.data = column_major(gate_up)  # [E, 2I, D]
                m.down_proj.data = column_major(down)  # [E, D, I]
            elif (
                isinstance(m, layers.Experts) and m.plain_weights and m.compute_dtype is None
                and m.gate_up_proj.dtype in shapes.JIT_DTYPES
            ):  # fmt: skip
                if amx_experts_layer(m, any_intermediate=True):
                    m.gate_up_proj.data = m.gate_up_proj.data.contiguous()  # [E, 2I, D]
                    m.down_proj.data = m.down_proj.data.contiguous()  # [E, D, I]
                    I = m.down_proj.shape[2]  # noqa: E741 (legend)
                    Ip = pad_intermediate(m)
                    if Ip != I:
                        padded[I, Ip] += 1
                else:
                    grouped_experts_layout(m)
    for (I, Ip), n in padded.items():  # noqa: E741 (legend)
        log.info("the routed experts of %d layers padded with zeros from I = %d to %d (32: the kernel's K)", n, I, Ip)
    if narrowed:
        log.info(
            "float32: the routed experts of %d layers kept as the bfloat16 values they are (%.2f GiB less "
            "to read; they compute in float32)", narrowed, saved / 2**30,
        )  # fmt: skip
    return model


def narrow_linears(model: nn.Module) -> int:
    """Keep a float32 model's output head, each attention layer's projections (GQA's q, k, v and o;
    MLA's q_a, q_b or q, kv_a, kv_b and o; all of a layer's or none) and each SwiGLU MLP's gate, up
    and down (dense layers and shared experts; all three or none) as bfloat16 where that loses
    nothing and the kernels read them (narrow_linear; the layer kernels GQAttention, MLAttention,
    SwiGLU, MoE's shared expert; MLA's absorbed kv_b halves are widened once:
    models.model.MLAttention.absorbed_weights), as narrow_experts keeps the experts: each value a
    bfloat16 one, their own weights (the head not tied to the embedding), K a multiple of 8, on a
    CPU without AVX-512 (where moe_linear_f32 takes a step's rows; AVX-512 CPUs give them to MKL).
    The head is the largest matrix a decode step reads (vocabulary x D: 131 MB of float32 at 32000 x
    1024), once per token at one stream; read as bfloat16 and widened in registers, the outputs are
    the same sums. MOE_RUNTIME_NARROW_WEIGHTS=0 keeps them float32. Returns how many it kept."""
    if not (narrowing() and not _avx512):
        return 0
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    groups = []
    for m in model.modules():
        if type(m) is layers.Attention:
            groups.append([m.q_proj, m.k_proj, m.v_proj, m.o_proj])
        elif type(m) is layers.MLAttention:
            q = [m.q_a_proj, m.q_b_proj] if m.cfg.q_lora_rank is not None else [m.q_proj]
            groups.append([*q, m.kv_a_proj_with_mqa, m.kv_b_proj, m.o_proj])
        elif type(m) is layers.MLP:
            groups.append([m.gate_proj, m.up_proj, m.down_proj])
    head = getattr(model, "lm_head", None)
    groups += [[head]] if head is not None else []
    kept, saved = 0, 0
    with torch.no_grad():
        for linears in groups:
            if not all(_narrowable(lin, uses) for lin in linears):
                continue
            narrow = bf16_values(*(lin.weight for lin in linears))
            if narrow is None:
                continue
            for w, lin in zip(narrow, linears, strict=True):
                lin.weight.data = w
                lin.compute_dtype = torch.float32  # (kernels/shapes.py: nothing to warm up in bfloat16)
                saved += 2 * w.numel()
                kept += 1
    if kept:
        log.info("float32: %d linears (the output head, attention, dense MLPs, shared experts) kept as the bfloat16 "
                 "values they are (%.2f GiB less to read)", kept, saved / 2**30)  # fmt: skip
    return kept


def _narrowable(lin: nn.Module, uses: dict[int, int]) -> bool:
    return (
        type(lin) in (nn.Linear, DecodeLinear)
        and type(lin.weight) is nn.Parameter
        and lin.weight.dtype == torch.float32
        and lin.weight.device.type == "cpu"
        and lin.weight.is_contiguous()
        and lin.in_features % 8 == 0
        and uses.get(lin.weight.data_ptr()) == 1  # not tied (the head to the embedding)
    )


def narrow_experts(m: layers.Experts) -> list[torch.Tensor] | None:
    """m's float32 expert weights (gate_up, down) as bfloat16, where that loses nothing and the
    kernels read them (else None): each value a bfloat16 one (a checkpoint in bfloat16, as
    Mixtral's, DeepSeek's and Qwen's are published, loaded as float32), the kernels loaded, every
    expert on this rank, SiLU, D and I multiples of 8. A decode step's routed experts are bound by
    how fast their weights stream from memory; read as bfloat16 and widened in registers
    (moe_experts_f32, moe_moe_decode) they are the same float32 values, the same sums, from half
    the bytes. MOE_RUNTIME_NARROW_WEIGHTS=0 keeps them float32."""
    gate_up, down = m.gate_up_proj, m.down_proj
    if not (
        narrowing()
        and type(m) in (layers.Experts, DecodeExperts)
        and m.num_local_experts == m.num_experts
        and m.act is F.silu
        and gate_up.device.type == "cpu"
        and gate_up.shape[-1] % 8 == 0
        and down.shape[-1] % 8 == 0
    ):
        return None
    return bf16_values(gate_up, down)


def narrowing() -> bool:
    """Whether float32 weights of bfloat16 values may be kept as bfloat16 (narrow_experts,
    narrow_linears): the kernels that widen them are loaded and MOE_RUNTIME_NARROW_WEIGHTS is not 0."""
    return _lib is not None and os.environ.get("MOE_RUNTIME_NARROW_WEIGHTS", "1") != "0"


def bf16_values(*ws: torch.Tensor) -> list[torch.Tensor] | None:
    """The weights as bfloat16 if every value of each is a bfloat16 one (widened back, the same
    tensor), else None."""
    narrow = [w.data.to(torch.bfloat16) for w in ws]
    exact = all(torch.equal(b.to(w.dtype), w.data) for b, w in zip(narrow, ws, strict=True))
    return narrow if exact else None


def grouped_experts_layout(model: nn.Module) -> nn.Module:
    """Store in place, column-major, the bfloat16 / float16 expert weights that run as grouped
    GEMMs (layers.Experts.grouped): F.grouped_mm multiplies by each expert's transposed weight,
    which this makes row-major, and torch's CPU grouped GEMM reads that about twice as fast
    (32 tokens x top-2 of 8 experts, D 256, I 512, one thread: 0.6 ms against 1.2 ms). Values,
    names and shapes are unchanged (only strides)."""
    with torch.no_grad():
        for m in model.modules():
            if (
                isinstance(m, layers.Experts)
                and m.plain_weights
                and m.gate_up_proj.dtype in (torch.bfloat16, torch.float16)
            ):
                m.gate_up_proj.data = column_major(m.gate_up_proj.data)  # [E, 2I, D]
                m.down_proj.data = column_major(m.down_proj.data)  # [E, D, I]
    return model
