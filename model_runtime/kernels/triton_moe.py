"""FP8 block-quantized routed experts on the GPU as two grouped GEMMs: a Triton kernel.

DeepSeek-V3's published weights are FP8 with a float32 scale per 128 x 128 block (kernels/fp8.py).
`Fp8Experts` computed them one expert at a time: the counts read back to the host (a device sync
per layer), then each expert's three matrices dequantized into bfloat16 copies (reading the FP8
bytes, writing and reading back twice as many) and multiplied. On the GPU this does what vLLM's
fused MoE does for block-FP8 weights, from the same published design, not its code:

- the step's (token, choice) assignments to this rank's experts are sorted by expert on the
  device and each expert's run padded to whole blocks of BLOCK_M rows (`align`: torch ops, sizes
  bounded on the host, so no sync), a block's expert named in `block_expert`;
- one launch per projection: a program per (block of rows, BLOCK_N outputs) loads its rows of the
  activations (bfloat16) and its expert's FP8 weight tile, widens the weights in registers (where
  the GPU has no FP8 conversion, before Ada / Hopper, from their bytes: e4m3fn's bits moved into a
  float16's and scaled by 2^8, exact for every finite e4m3fn value, subnormals too), and
  accumulates `tl.dot`s in float32, each K tile's product scaled by its block's scale (a tile lies
  within one scale block: BLOCK_N divides b0, BLOCK_K divides b1); gate and up are one [2I, D]
  projection, SiLU(gate) * up between the launches, the down projection after, each choice's
  output weighted and summed per token after;
- assignments to other ranks' experts (expert parallel) sort past every local run and are never
  read; their output rows are masked out.

The FP8 weights are read once per step, as FP8: a decode step moves a quarter of what the
dequantizing loop moved. Checked as triton_attention.py is: under Triton's interpreter on the CPU
against Fp8Experts' own loop (tests/runtime/test_triton_moe.py), and compiled ahead of time for
sm_80 / sm_90; a launch that fails on a device is logged once and the loop serves from then on.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from model_runtime.kernels import triton_attention
from model_runtime.kernels.triton_attention import interpreting

log = logging.getLogger(__name__)
tl = None  # triton.language, bound on first use (_kernel): the kernel's body names it

BLOCK_M = 16  # rows (assignments) a program takes: a decode step's experts get 1-2 tokens each


def tiles(block: tuple[int, int]) -> tuple[int, int] | None:
    """(BLOCK_N, BLOCK_K) for FP8 scale blocks (b0, b1): powers of two of at least 16 that divide
    them (one scale per weight tile), at most 64 and 128; None where there are none."""
    b0, b1 = block
    bn = next((n for n in (64, 32, 16) if b0 % n == 0), None)
    bk = next((k for k in (128, 64, 32, 16) if b1 % k == 0), None)
    return (bn, bk) if bn and bk else None


def applies(experts, x: torch.Tensor) -> bool:
    """Whether fp8_experts() computes these Fp8Experts on x: bfloat16 or float16 activations on
    CUDA (or on the CPU under Triton's interpreter), outside autograd, blocks the tiles fit, each
    projection made of whole scale blocks (I a multiple of b0, D of both b0 and b1: gate's and up's
    scale rows then meet at a block edge), SiLU, the kernel not failed,
    MOE_RUNTIME_TRITON_MOE not 0."""
    b0, b1 = experts.block
    D = experts.down_proj.shape[1]
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and (x.device.type == "cuda" or (interpreting() and x.device.type == "cpu"))
        and not (torch.is_grad_enabled() and x.requires_grad)
        and tiles(experts.block) is not None
        and experts.rows % b0 == 0 and experts.rows % b1 == 0 and D % b0 == 0 and D % b1 == 0
        and experts.act is F.silu
        and os.environ.get("MOE_RUNTIME_TRITON_MOE", "1") != "0"
        and _failed is None
        and triton_attention.available()
    )  # fmt: skip


_failed: str | None = None


def align(ids: torch.Tensor, first: int, experts: int, block_m: int):
    """The step's assignments to experts first .. first + experts - 1, sorted by expert, each
    expert's run padded to whole blocks of block_m: (sorted [B * block_m] assignment index, or
    N * A past a run's end; block_expert [B]: the local expert of each block, `experts` past the
    last; local [N * A] whether each assignment is this rank's), B = the bound
    ceil((N * A + experts * (block_m - 1)) / block_m): all on the device."""
    n = ids.numel()
    key = ids.reshape(-1) - first
    local = (key >= 0) & (key < experts)
    key = torch.where(local, key, experts)  # [n] another rank's: after every local expert
    counts = torch.bincount(key, minlength=experts + 1)[:experts]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    pend = padded.cumsum(0)  # [E] end of each expert's padded run
    order = key.argsort(stable=True)  # [n] assignments, local ones first by expert
    skey = key[order]
    e = skey.clamp(max=experts - 1)
    starts = counts.cumsum(0) - counts  # [E] first sorted assignment of each expert
    blocks = -(-(n + experts * (block_m - 1)) // block_m)
    dest = torch.where(skey < experts, pend[e] - padded[e] + torch.arange(n, device=ids.device) - starts[e],
                       blocks * block_m)  # fmt: skip
    sorted_ids = torch.full((blocks * block_m + 1,), n, dtype=torch.int32, device=ids.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))  # the others land in the last slot, dropped
    block_expert = torch.searchsorted(pend, torch.arange(blocks, device=ids.device) * block_m, right=True)
    return sorted_ids[:-1], block_expert.to(torch.int32), local


def native_fp8(device: torch.device) -> bool:
    """Whether Triton converts FP8 (e4m3fn) natively on the device: compute capability 8.9+ (Ada,
    Hopper). Before that (A100) the kernel loads the bytes and decodes them (fp8_bits)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_experts(
    experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, bits: bool | None = None
) -> torch.Tensor | None:
    """Fp8Experts' output for x [N, D] with routing weights / ids [N, A]: this rank's partial sum
    [N, D] in x's dtype, its experts' FP8 weights read in place (`bits`: decoded from their bytes
    rather than converted natively; by default where the device has no native conversion). None
    where the kernel failed (logged once): the caller's loop serves."""
    global _failed
    if bits is None:
        bits = x.device.type == "cuda" and not native_fp8(x.device)
    N, A = ids.shape
    D = x.shape[1]
    I = experts.rows  # noqa: E741 (legend)
    x = x if x.stride(1) == 1 else x.contiguous()
    sorted_ids, block_expert, local = align(ids, experts.first_expert, experts.num_local_experts, BLOCK_M)
    try:
        up = _gemm(x, experts.gate_up_proj, experts.gate_up_proj_scale_inv, experts.block, sorted_ids, block_expert,
                   N * A, A, bits)  # fmt: skip  [N * A, 2I]
        hidden = F.silu(up[:, :I]).mul_(up[:, I:])  # [N * A, I]
        down = _gemm(hidden, experts.down_proj, experts.down_proj_scale_inv, experts.block, sorted_ids, block_expert,
                     N * A, 1, bits)  # fmt: skip  [N * A, D]
    except Exception as e:  # noqa: BLE001 (a kernel that does not build here: the loop, said once)
        if interpreting():
            raise
        _failed = f"{type(e).__name__}: {e}"
        log.warning("triton FP8 experts: off on %s (%s); the per-expert loop serves", x.device, _failed)
        return None
    down = torch.where(local[:, None], down, 0)  # another rank's rows: never written
    return (down.view(N, A, D) * weights.to(down.dtype)[:, :, None]).sum(dim=1)


def _gemm(x, w, scale, block, sorted_ids, block_expert, rows, per_row, bits):
    """y [rows, Nout] = each sorted assignment's input row (x row = assignment // per_row) times
    its expert's FP8 weight w [E, Nout, K]^T, scaled by block; rows of no local assignment
    unwritten."""
    E, Nout, K = w.shape
    if bits:
        w = w.view(torch.uint8)
    bn, bk = tiles(block)
    y = torch.empty(rows, Nout, dtype=x.dtype, device=x.device)
    grid = (block_expert.shape[0], -(-Nout // bn))
    _kernel()[grid](
        x, w, scale, sorted_ids, block_expert, y,
        x.stride(0), w.stride(0), w.stride(1), scale.stride(0), scale.stride(1), y.stride(0),
        K, Nout, rows, per_row, block[0], block[1],
        E=E, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk, BITS=bits, WIDEN=interpreting(),
    )  # fmt: skip
    return y


def _kernel():
    """The jitted _fp8_moe_gemm (triton_attention's cache and interpreter switch), this module's
    `tl` bound first."""
    global tl
    if not triton_attention._import():
        raise RuntimeError(triton_attention._failed)
    tl = triton_attention.tl
    return triton_attention._kernel(_fp8_moe_gemm)


def _fp8_moe_gemm(
    X, W, WS, IDS, BLOCK_EXPERT, Y,
    sx, sw_e, sw_n, sws_e, sws_n, sy,
    K, NOUT, ROWS, PER_ROW, B0, B1,
    E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
    WIDEN: tl.constexpr,
):  # fmt: skip
    # one program: block b of the sorted assignments (one expert's), outputs [nt * BLOCK_N, + BLOCK_N)
    b = tl.program_id(0)
    nt = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + b)
    ids = tl.load(IDS + b * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = (ids < ROWS) & (ids * 0 + e < E)  # a block past the last expert's run: no rows
    e = tl.minimum(e, E - 1).to(tl.int64)
    x_row = (ids // PER_ROW).to(tl.int64)
    n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < NOUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(X + x_row[:, None] * sx + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # (e clamped: a block past the last run reads expert E - 1's weights, and stores nothing)
        wt = tl.load(W + e * sw_e + n[:, None].to(tl.int64) * sw_n + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0)  # fmt: skip
        s = tl.load(WS + e * sws_e + (nt * BLOCK_N // B0) * sws_n + k0 // B1)  # this tile's one block scale
        if BITS:  # e4m3fn bytes as float16 bits (sign; exponent and mantissa 7 places up), times 2^(15 - 7)
            h = ((wt & 0x80).to(tl.int16) << 8) | ((wt & 0x7F).to(tl.int16) << 7)
            wt = h.to(tl.float16, bitcast=True) * 256.0
        if WIDEN:  # the interpreter's tl.dot wants float32
            part = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(xt, tl.trans(wt.to(xt.dtype)))
        acc += part * s
    tl.store(Y + ids[:, None].to(tl.int64) * sy + n[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])  # fmt: skip
