"""Matmul row counts in buckets, so that oneDNN's kernels for them are built once.

On the CPU torch runs bfloat16 and float16 matmuls through oneDNN, which builds (JIT-compiles) a
kernel for each new shape and keeps it in a cache of recent shapes. Building one costs about 1 ms
here (one thread, a [M, 256] x [256, 384] bfloat16 product takes 0.09 ms once built), and in
serving the row count M is new all the time: a step's token count, and in a prefill each routed
expert's share of the tokens. A 32 x 32-token prefill of the benchmark's Mixtral took 170-200 ms
with fresh expert row counts against 51 ms when the same counts came again.

So the rows are padded to a few sizes: exact up to 16 (a decode step's sequences, whose count
changes rarely), then multiples of 16 up to 256, and above that 8 sizes per doubling (at most
1/8 more rows; AMX works on 16-row tiles, so the padding up to 256 is mostly free). Up to 4096
rows that is 63 sizes per weight shape, within oneDNN's default cache of 1024 kernels for
these models' dozen weight shapes. float32 runs MKL's sgemm, which builds nothing, and is left
as it is (vLLM's CPU backend avoids the rebuilds with oneDNN kernels whose M is a runtime value,
which torch does not expose).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

JIT_DTYPES = (torch.bfloat16, torch.float16)  # the CPU dtypes whose matmuls oneDNN builds per shape
EXACT_ROWS = 16  # up to this many rows: no padding
# warm_up builds a product's kernel only while the product is at most this many multiply-adds
# (~1-2 ms here): above it the build (~1 ms) is a small part of the product's own time, and
# warming every bucket of a large model's weights would take minutes at start-up
WARM_MAX_MACS = 1 << 28


def padded_rows(n: int) -> int:
    """The bucket of n rows: n up to 16; multiples of 16 up to 256; then multiples of 1/8 of the
    power of two below n (256 -> 32 apart, 512 -> 64, ...)."""
    if n <= EXACT_ROWS:
        return n
    step = max(16, (1 << (n.bit_length() - 1)) // 8)
    return -(-n // step) * step


def buckets(x: torch.Tensor) -> bool:
    """Whether matmuls on x pay oneDNN's per-shape build (bfloat16 or float16 on the CPU)."""
    return x.dtype in JIT_DTYPES and x.device.type == "cpu"


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, ...] with zero rows appended up to `rows`."""
    n = x.shape[0]
    if rows == n:
        return x
    out = x.new_empty(rows, *x.shape[1:])
    out[:n] = x
    out[n:].zero_()
    return out


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) with x's rows (all but the last dimension) padded to their bucket
    on the CPU in bfloat16 / float16; the result has x's rows only."""
    if not buckets(x) or x.dim() < 2:
        return F.linear(x, w, bias)
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    m = padded_rows(n)
    if m == n:
        return F.linear(x, w, bias)
    return F.linear(pad_rows(rows, m), w, bias)[:n].view(*x.shape[:-1], w.shape[0])


class Fused:
    """Linears that read one input, as one matrix: `weight` [sum of outs, in] (and `bias`) whose row
    ranges the linears' own weights are views of, so a step's rows take one matmul rather than one
    per linear (oneDNN's fixed cost, ~30-100 us a call at these sizes, paid once). Called on x, it
    gives the linears' outputs in order. `linear` computes it (kernels/cpu_decode.py's: a gemv for
    one row, padded rows for more); `members`: the linear modules (warm_up builds their kernels
    for the whole matrix instead)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], linear, members):
        self.weight, self.bias, self.sizes, self.linear = weight, bias, sizes, linear
        self.members = list(members)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def fused(module: nn.Module, name: str) -> Fused | None:
    """module's fused linears `name` (kernels/cpu_decode.py: fuse_projections), if it has them."""
    return module.__dict__.get("fused", {}).get(name)


def warm_up(model: torch.nn.Module, max_rows: int, max_logit_rows: int) -> tuple[int, float]:
    """Build, at start-up, oneDNN's kernels for every bucket up to `max_rows` rows (a step's new
    tokens) of the model's bfloat16 / float16 linears on the CPU, the routed experts' grouped GEMM
    (one expert's run is at most a step's tokens) included, and up to `max_logit_rows` (a step's
    sequences) of the output head, so that no request pays a build later (~1 ms each; at 512 rows
    the benchmark's Mixtral has 173 of them, 0.25 s, its DeepSeek-V3 446, 0.7 s); products over
    WARM_MAX_MACS are left to their first use. (kernels built, seconds); none built where matmuls
    build nothing (float32, other devices) or where the AMX kernels take them (a few rows of a
    linear, the routed experts: kernels/cpu_decode.py)."""
    from model_runtime.kernels import cpu_decode  # here: both import this module
    from model_runtime.models import model as layers

    start = time.perf_counter()
    seen: set[tuple] = set()
    built = 0
    head = getattr(model, "lm_head", None)

    def build(w: torch.Tensor, bias: torch.Tensor | None, limit: int) -> int:
        key = (tuple(w.shape), w.stride(), w.dtype, bias is not None, limit)
        if not buckets(w) or key in seen:
            return 0
        seen.add(key)
        n = 0
        for rows in row_buckets(limit):
            if rows * w.numel() > WARM_MAX_MACS:
                break
            x = w.new_zeros(rows, w.shape[1])
            if not (cpu_decode.amx_rows(x, w, bias) or cpu_decode.dpbf16_rows(x, w, bias)):  # (theirs build nothing)
                F.linear(x, w, bias)
                n += 1
        return n

    groups = [f for m in model.modules() for f in m.__dict__.get("fused", {}).values()]
    in_groups = {id(lin) for f in groups for lin in f.members}  # their rows take the fused matmul
    with torch.no_grad():
        for f in groups:  # fused q/k/v, gate/up: a step's rows (not those of float32 linears kept as bfloat16)
            if not any(getattr(lin, "compute_dtype", None) for lin in f.members):
                built += build(f.weight, f.bias, max_rows)
        for m in model.modules():
            if (
                isinstance(m, nn.Linear) and type(m.weight) is torch.nn.Parameter and id(m) not in in_groups
                and getattr(m, "compute_dtype", None) is None  # (float32 kept as bfloat16: narrow_linears)
            ):  # fmt: skip
                built += build(m.weight, m.bias, max_logit_rows if m is head else max_rows)
            elif (
                isinstance(m, layers.Experts) and m.plain_weights and m.compute_dtype is None and buckets(m.gate_up_proj)
                and not cpu_decode.amx_experts(m, m.gate_up_proj.new_zeros(2, m.gate_up_proj.shape[-1]))
            ):  # fmt: skip (every token count of the AMX experts kernel: nothing to build)
                gate_up, down = m.gate_up_proj.transpose(-2, -1), m.down_proj.transpose(-2, -1)
                key = (tuple(gate_up.shape), gate_up.stride(), tuple(down.shape), down.stride(), gate_up.dtype)
                if key in seen:
                    continue
                seen.add(key)
                E = gate_up.shape[0]
                for rows in row_buckets(max_rows):  # every row to the first expert: its kernels are every expert's
                    if rows * gate_up[0].numel() > WARM_MAX_MACS:
                        break
                    offs = torch.full((E,), rows, dtype=torch.int32)
                    F.grouped_mm(gate_up.new_zeros(rows, gate_up.shape[1]), gate_up, offs=offs)
                    F.grouped_mm(down.new_zeros(rows, down.shape[1]), down, offs=offs)
                    built += 2
    return built, time.perf_counter() - start


def row_buckets(max_rows: int) -> list[int]:
    """Every bucket of 1 .. max_rows rows (padded_rows), the largest covering max_rows."""
    return sorted({padded_rows(n) for n in range(1, max_rows + 1)})
