"""FP8 block-quantized weights (DeepSeek-V3's published format), kept FP8 in memory.

A weight W [out, in] is stored as float8_e4m3fn with one float32 `weight_scale_inv` per block of
(b0, b1) = weight_block_size (128 x 128 in DeepSeek-V3): W ~= W_fp8 * scale_inv[i // b0, j // b1].
Edge blocks are partial when a dimension is not a multiple of the block.

Each matmul dequantizes its weight to the activations' dtype first (any device; on the CPU this is
the only path). On a GPU with FP8 tensor cores (compute capability 9.0+, Hopper) `torch._scaled_mm`
multiplies FP8 directly, the activations quantized per 1 x b1 group on the fly; that path is checked
against dequantization on its first call in each layer and abandoned (with a log line) if it is
unavailable or disagrees, so a torch build or GPU without it keeps serving correctly.

Which layers are FP8 is read from the checkpoint (the tensors that have a `weight_scale_inv`), so
`modules_to_not_convert` and per-architecture conventions need no table here; `use_fp8` swaps
those layers of a model built on the meta device before its weights are assigned.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from model_runtime.kernels import triton_moe
from model_runtime.models.model import Experts

log = logging.getLogger(__name__)


def cpu_kernels():
    """The C kernels' library (kernels/csrc/cpu_decode.c has moe_fp8_dequant), or None."""
    from model_runtime.kernels.cpu_decode import _load

    return _load()

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def scale_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def dequantize(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """W [rows, cols] (FP8) times its block scales [ceil(rows / b0), ceil(cols / b1)] -> `dtype`.
    On the CPU the C kernel does it (moe_fp8_dequant: the same bits, several times faster)."""
    if w.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and (lib := cpu_kernels()) is not None:
        w, scale_inv = w.contiguous(), scale_inv.to(torch.float32).contiguous()
        out = torch.empty(w.shape, dtype=dtype)
        lib.moe_fp8_dequant(w.data_ptr(), scale_inv.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1],
                            block[0], block[1], scale_inv.shape[1], int(dtype == torch.bfloat16))
        return out
    rows, cols = w.shape
    r, c = scale_inv.shape
    if rows == r * block[0] and cols == c * block[1]:  # whole blocks: the scales broadcast over a view
        blocks = w.view(r, block[0], c, block[1]).to(torch.float32)
        return blocks.mul_(scale_inv[:, None, :, None]).view(rows, cols).to(dtype)
    s = scale_inv.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return (w.to(torch.float32) * s).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale_inv per block) of a float weight [rows, cols]: each block's largest
    magnitude maps to FP8's largest finite value (how DeepSeek-V3's checkpoint was made)."""
    rows, cols = w.shape
    r, c = scale_shape(rows, cols, block)
    padded = torch.zeros(r * block[0], c * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(r, block[0], c, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [r, c]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).view_as(padded)[:rows, :cols].to(FP8)
    return q.contiguous(), scale_inv


class Fp8Linear(nn.Module):
    """nn.Linear's interface over an FP8 weight and its block scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block: tuple[int, int]):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape(out_features, in_features, self.block), dtype=torch.float32),
            requires_grad=False,
        )
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.native: bool | None = None  # None: not tried yet

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not False and x.is_cuda:
            y = self._native(x)
            if y is not None:
                return y
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _native(self, x: torch.Tensor) -> torch.Tensor | None:
        """FP8 x FP8 on the tensor cores, or None (then never again) where that is unavailable."""
        if self.native is None:
            self.native = native_fp8_available(x.device) and self.in_features % self.block[1] == 0
            if self.native:
                try:
                    got = scaled_mm(x, self.weight, self.weight_scale_inv, self.block)
                    want = F.linear(x, self.dequantized(x.dtype))
                    err = (got.float() - want.float()).abs().max().item()
                    tol = 0.05 * want.float().abs().max().item() + 1e-3
                    if not err <= tol:
                        raise RuntimeError(
                            f"native FP8 differs from dequantization by {err:.3g} (tolerance {tol:.3g})"
                        )
                except Exception as e:  # an older torch, a layout cuBLAS refuses, a wrong result
                    log.warning("FP8 on the tensor cores is not used (dequantizing per matmul): %s", e)
                    self.native = False
        if not self.native:
            return None
        y = scaled_mm(x, self.weight, self.weight_scale_inv, self.block)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 block={self.block}"


def native_fp8_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def scaled_mm(
    x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ W.T with W [N, K] FP8 and 128 x 128 block scales, on the tensor
    cores: x is quantized per 1 x b1 group (DeepSeek-V3's activation scheme)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    M, K = x2.shape
    groups = x2.float().view(M, K // block[1], block[1])
    x_scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX  # [M, K / b1]
    x_fp8 = (groups / x_scale[..., None]).view(M, K).to(FP8)
    y = torch._scaled_mm(
        x_fp8,
        w.t(),  # [K, N] column-major
        scale_a=x_scale.contiguous(),
        scale_b=scale_inv.t().contiguous(),  # [K / b1, N / b0]
        out_dtype=x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16,
    )
    return y.to(x.dtype).view(*shape[:-1], w.shape[0])


class Fp8Experts(Experts):
    """Routed experts with FP8 stacked weights: gate_up [E, 2I, D] and down [E, D, I], each expert's
    gate, up and down keeping their own block scales (gate's scale rows, then up's)."""

    plain_weights = False

    def __init__(self, experts: Experts, block: tuple[int, int]):
        nn.Module.__init__(self)
        self.act, self.num_experts = experts.act, experts.num_experts
        self.first_expert, self.num_local_experts = experts.first_expert, experts.num_local_experts
        self.block = tuple(block)
        E, two_i, D = experts.gate_up_proj.shape
        I = two_i // 2  # noqa: E741 (legend)
        self.rows = I
        self.gate_up_proj = nn.Parameter(torch.empty(E, two_i, D, dtype=FP8), requires_grad=False)
        gr, gc = scale_shape(I, D, self.block)
        self.gate_up_proj_scale_inv = nn.Parameter(torch.empty(E, 2 * gr, gc), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, D, I, dtype=FP8), requires_grad=False)
        self.down_proj_scale_inv = nn.Parameter(
            torch.empty(E, *scale_shape(D, I, self.block)), requires_grad=False
        )

    def grouped(self, x: torch.Tensor) -> bool:
        """Whether the FP8 experts run as two grouped GEMMs on the FP8 weights in place (the GPU's
        Triton kernel, kernels/triton_moe.py) rather than a dequantized matmul pair per expert."""
        return triton_moe.applies(self, x)

    def grouped_forward(self, x, weights, ids, counts):
        out = triton_moe.fp8_experts(self, x, weights, ids)
        return out if out is not None else self.looped_forward(x, weights, ids, counts)  # the kernel failed

    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        I, dtype = self.rows, x.dtype  # noqa: E741 (legend)
        half = self.gate_up_proj_scale_inv.shape[1] // 2
        gate_w = dequantize(
            self.gate_up_proj[e, :I], self.gate_up_proj_scale_inv[e, :half], self.block, dtype
        )
        up_w = dequantize(self.gate_up_proj[e, I:], self.gate_up_proj_scale_inv[e, half:], self.block, dtype)
        down_w = dequantize(self.down_proj[e], self.down_proj_scale_inv[e], self.block, dtype)
        return F.linear(self.act(F.linear(x, gate_w)).mul_(F.linear(x, up_w)), down_w)


def use_fp8(model: nn.Module, fp8_params: set[str], block: tuple[int, int]) -> int:
    """Swap, in place, the layers whose weight is FP8 (`fp8_params`: our parameter names, e.g.
    `layers.0.self_attn.q_a_proj.weight` or `layers.3.mlp.experts.gate_up_proj`) for their FP8
    modules. For a model on the meta device, before its state is assigned. The count swapped."""
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and f"{full}.weight" in fp8_params:
                with torch.device("meta"):
                    setattr(
                        parent,
                        name,
                        Fp8Linear(child.in_features, child.out_features, child.bias is not None, block),
                    )
                swapped += 1
            elif type(child) is Experts and f"{full}.gate_up_proj" in fp8_params:
                with torch.device("meta"):
                    setattr(parent, name, Fp8Experts(child, block))
                swapped += 1
    return swapped
