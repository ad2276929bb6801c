"""Batch-1 decode on the CPU: C kernels that read the weights at memory speed.

Decoding one token multiplies one row by every weight, so a step lasts as long as the weights take
to stream from memory, plus whatever the step spends around them. On one thread of the machines
this was measured on, BLAS's gemv (MKL) walks several rows at once, which makes several memory
streams, and reads 12-14 GB/s against 21-26 GB/s for a plain sum; and a decode step of torch ops
spends as long again in per-op overhead (a few microseconds each, ~25 ops per MoE layer).

`csrc/cpu_decode.c` has the batch-1 pieces of the model as plain C (AVX2 + FMA): a gemv that
walks the rows front to back (one sequential stream, read at the speed of a sum), a SwiGLU MLP,
RMSNorm, MLA's absorbed attention with its rope and cache write, and a whole MoE layer (router,
experts, shared expert). models/model.py's torch code stays the reference and serves every batch;
the kernels take over only for one float32 row on the CPU with torch on one thread (the runtime's
default on small machines; more threads stay with torch, which spreads over cores) and outside
autograd, in the layers that cpu_layers.use_cpu_decode_kernels swaps in after the model is built.
tests/runtime/test_cpu_decode.py checks each against the torch code.

The C is compiled once with the system's compiler (gcc, cc or $CC) into a cache directory keyed
by the source's hash, and called through ctypes. Without a compiler or AVX2, or with
`MOE_RUNTIME_CPU_KERNELS=0`, torch's ops run as before (one log line says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_decode.c"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib = None  # the loaded library (None: not loaded, or there is none)
_decided = False  # whether _load() has run


def cache_dir() -> Path:
    """Where the compiled kernel lives: $MOE_RUNTIME_KERNEL_CACHE, else the user's cache, else tmp."""
    if os.environ.get("MOE_RUNTIME_KERNEL_CACHE"):
        return Path(os.environ["MOE_RUNTIME_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe-runtime" / "kernels"


def _build() -> Path:
    """The shared library for SOURCE, compiled once per source and flags (atomic rename)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise RuntimeError("no C compiler (gcc, cc or $CC) on PATH")
    last_error: Exception | None = None
    for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"moe-runtime-kernels-{os.getuid()}"):
        lib = directory / f"cpu_decode-{key}.so"
        if lib.exists():
            return lib
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
            os.close(fd)
            try:
                subprocess.run(
                    [compiler, *CFLAGS, "-o", tmp, str(SOURCE)],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                os.replace(tmp, lib)  # concurrent builders (several pods on one node) race harmlessly
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return lib
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{compiler} failed on {SOURCE}: {e.stderr.strip()[-500:]}") from e
        except OSError as e:  # an unwritable cache: try the next place
            last_error = e
    raise RuntimeError(f"no writable kernel cache directory: {last_error}")


def _load():
    """The kernels' library, or None (with the reason logged once)."""
    global _lib, _decided
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
                lib.moe_gemv_f32.argtypes = [ptr] * 3 + [long] * 2
                lib.moe_swiglu_f32.argtypes = [ptr] * 6 + [f32, ctypes.c_int, long, long]
                lib.moe_rmsnorm_f32.argtypes = [ptr] * 3 + [f32, long]
                lib.moe_mla_attention_f32.argtypes = [ptr] * 14 + [ctypes.c_int, long, f32] + [long] * 8
                lib.moe_moe_decode_f32.argtypes = [ptr] * 12 + [ctypes.c_int] * 3 + [f32] + [long] * 7
                for fn in (
                    lib.moe_gemv_f32,
                    lib.moe_swiglu_f32,
                    lib.moe_rmsnorm_f32,
                    lib.moe_mla_attention_f32,
                    lib.moe_moe_decode_f32,
                ):
                    fn.restype = None
                log.info("cpu decode kernels: %s", path)
            except Exception as e:  # noqa: BLE001 (any failure means: torch's own ops)
                lib = None
                log.warning("cpu decode kernels: off (%s); torch's ops are used", e)
        _lib, _decided = lib, True
        return lib


def available() -> bool:
    """Whether the kernels are compiled and loaded (a given call may still not qualify); compiles
    them the first time. cpu_layers.use_cpu_decode_kernels calls it when an engine starts, so no
    forward pass ever waits for the compiler."""
    return _load() is not None


def one_row(x: torch.Tensor) -> bool:
    """Whether x [..., D] is one float32 row on the CPU, outside autograd, with torch on one
    thread and the kernels loaded (by `available`): the calls below then apply (weights float32,
    rows contiguous)."""
    return (
        x.numel() == x.shape[-1]
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
        and torch.get_num_threads() == 1
        and _lib is not None
    )


def f32_rows(*ws: torch.Tensor) -> bool:
    """Whether weights are float32 with contiguous rows, as the kernels read them."""
    return all(w.dtype == torch.float32 and w.is_contiguous() for w in ws)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] (one row) @ w [out, in].T -> [..., out]."""
    out, inn = w.shape
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out)
    _lib.moe_gemv_f32(w.data_ptr(), x.data_ptr(), y.data_ptr(), out, inn)
    return y


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; one float32 row on the CPU (batch-1 decode) takes the streaming gemv kernel."""
    if one_row(x) and f32_rows(w):
        y = gemv(x, w)
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) for one row x [..., D]."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _lib.moe_rmsnorm_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), eps, x.shape[-1])
    return y


# ---- whole layers, prepared once (cpu_layers.use_cpu_decode_kernels) ------------------------------
# Each holds its weights (keeping them alive) and their addresses, so a decode step pays one
# check and one C call per layer instead of a module lookup per weight.


class SwiGLU:
    """down @ (silu(gate @ x) * (up @ x)): a dense MLP or a shared expert, for one row x [1, D]."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        self.weights = (gate, up, down)
        self.ptrs = tuple(w.data_ptr() for w in self.weights)
        self.I, self.D = gate.shape  # noqa: E741 (legend)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(1, self.D)
        h = torch.empty(self.I)
        _lib.moe_swiglu_f32(*self.ptrs, x.data_ptr(), y.data_ptr(), h.data_ptr(), 1.0, 0, self.D, self.I)
        return y


ROUTE_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


class MoE:
    """models.model.MoE for one token x [1, D]: route (cfg's scoring, top-k method, groups,
    scaling), the A chosen experts (gate_up [E, 2I, D], down [E, D, I]), the shared expert (gate,
    up [Is, D], down [D, Is]) scaled by sigmoid(shared_scale . x) when given; the choice is
    counted into tokens_per_expert [E] (int64, updated in place)."""

    def __init__(
        self,
        cfg,
        router: torch.Tensor,
        bias: torch.Tensor | None,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        shared_scale: torch.Tensor | None,
        tokens_per_expert: torch.Tensor,
    ):
        assert cfg.num_experts_per_tok <= 64  # the kernel's fixed-size choice arrays (callers check)
        self.weights = (router, bias, gate_up, down, *(shared or (None, None, None)), shared_scale)
        self.counts = tokens_per_expert
        E, D = router.shape
        I = down.shape[-1]  # noqa: E741 (legend)
        Is = shared[0].shape[0] if shared is not None else 0
        self.D, self.scratch_size = D, max(I, Is) + 2 * E + cfg.n_group + E // 4 + 1  # last E bytes: flags
        self.args = (
            *(None if w is None else w.data_ptr() for w in self.weights),
            tokens_per_expert.data_ptr(),
        )
        self.config = (
            cfg.scoring_func == "sigmoid", ROUTE_METHODS[cfg.topk_method], cfg.norm_topk_prob,
            cfg.routed_scaling_factor, D, E, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, I, Is,
        )  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(1, self.D)
        scratch = torch.empty(self.scratch_size)
        _lib.moe_moe_decode_f32(x.data_ptr(), *self.args, y.data_ptr(), scratch.data_ptr(), *self.config)
        return y


class MLAttention:
    """models.model.MLAttention for one new token x [1, D] over the paged cache: q_a [Q, D] and its
    norm [Q] with q_b [H (P + R), Q] (or q_a None and q_b the full q_proj [H (P + R), D]); kv_a
    [C + R, D] (kv_a_proj_with_mqa), kv_a_norm [C]; w_kv [H, P + Dv, C] (kv_b_proj); o_proj [D, H Dv]."""

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
    ):
        self.weights = (q_a, q_a_norm, q_b, kv_a, kv_a_norm, w_kv, o_proj)
        self.ptrs = tuple(None if w is None else w.data_ptr() for w in self.weights)
        H, P_Dv, C = w_kv.shape
        R = kv_a.shape[0] - C
        P = q_b.shape[0] // H - R
        Q = q_a.shape[0] if q_a is not None else 0
        self.D = o_proj.shape[0]
        self.interleaved, self.scale = interleaved, scale
        self.dims = (self.D, Q, H, P, R, C, P_Dv - P)
        self.scratch_size = Q + H * (P + R) + 3 * C + 2 * R + H * (P_Dv - P)

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
        [slots, C + R] (float32); the context's rows `slots` [L] (the new one last) -> [1, D]."""
        x, slots, cos, sin = x.contiguous(), slots.contiguous(), cos.contiguous(), sin.contiguous()
        L = slots.shape[0]
        y = torch.empty(1, self.D)
        scratch = torch.empty(self.scratch_size + L)
        _lib.moe_mla_attention_f32(
            x.data_ptr(), *self.ptrs, cos.data_ptr(), sin.data_ptr(), cache.data_ptr(), slots.data_ptr(),
            y.data_ptr(), scratch.data_ptr(), self.interleaved, slot, self.scale, L, *self.dims,
        )  # fmt: skip
        return y
