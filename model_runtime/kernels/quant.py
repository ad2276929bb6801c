"""Weight-only int8 quantization: a transform applied to a built model.

Every linear layer and every expert weight becomes int8 with one float scale per output channel
(symmetric, max-abs / 127). Activations stay in the model's dtype. Left in full precision: the
router (its choice is discrete and cheap to compute), Qwen2-MoE's shared-expert gate (one row) and
MLA's kv_b_proj (absorbed into queries and outputs at attention time), embeddings and norms.

On the CPU the matmul is torch's int8-weight kernel (`_weight_int8pack_mm`), run with bfloat16
activations; elsewhere the weight is dequantized on the fly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model_runtime.models.model import Experts, Transformer

KEEP_FULL_PRECISION = ("kv_b_proj", "shared_expert_gate")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (int8 [..., out, in], float32 scale [..., out]) with w ≈ q * scale."""
    scale = w.float().abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.round(w.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    # Row-major whatever w's layout (the engine may have re-laid weights out column-major for decode).
    return q.contiguous(), scale.contiguous()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scale).T with q int8 [out, in], scale [out] -> [..., out] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()  # [M, in]; the int8 kernel needs rows contiguous
    if x.device.type == "cpu":
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), q, scale.to(torch.bfloat16)).to(x.dtype)
    else:
        y = F.linear(x2, q.to(x.dtype)) * scale.to(x.dtype)
    return y.view(*shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight.detach())
        self.register_buffer("weight", q)  # [out, in] int8
        self.register_buffer("weight_scale", scale.to(linear.weight.dtype))  # [out]
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias


class Int8Experts(Experts):
    """Experts with int8 stacked weights: gate_up [E, 2I, D], down [E, D, I], scales per row."""

    plain_weights = False

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        dtype = experts.gate_up_proj.dtype
        self.act, self.num_experts = experts.act, experts.num_experts
        self.first_expert, self.num_local_experts = experts.first_expert, experts.num_local_experts
        gate_up, gate_up_scale = quantize_per_channel(experts.gate_up_proj.detach())
        down, down_scale = quantize_per_channel(experts.down_proj.detach())
        self.register_buffer("gate_up_proj", gate_up)
        self.register_buffer("gate_up_proj_scale", gate_up_scale.to(dtype))  # [E, 2I]
        self.register_buffer("down_proj", down)
        self.register_buffer("down_proj_scale", down_scale.to(dtype))  # [E, D]

    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = int8_linear(x, self.gate_up_proj[e], self.gate_up_proj_scale[e]).chunk(2, dim=-1)
        return int8_linear(self.act(gate) * up, self.down_proj[e], self.down_proj_scale[e])


def quantize_int8(model: Transformer) -> Transformer:
    """Quantize `model` in place (weight-only int8) and return it."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Experts) and not isinstance(child, Int8Experts):
                setattr(parent, name, Int8Experts(child))
            elif isinstance(child, nn.Linear) and name not in KEEP_FULL_PRECISION:
                setattr(parent, name, Int8Linear(child))
    model.quantization = "int8"
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights (parameters and persistent buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def int8_report(model: Transformer, prompts: torch.Tensor | None = None) -> dict[str, Any]:
    """Memory saving and logit drift of int8 quantization, measured on a copy of `model`.

    prompts: [B, T] token ids (default: 4 random sequences of 64 tokens, seed 0).
    """
    if prompts is None:
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (4, 64), generator=gen)
    prompts = prompts.to(model.device)
    quantized = quantize_int8(copy.deepcopy(model))
    with torch.no_grad():
        ref, got = model(prompts), quantized(prompts)  # [B, T, V]
    drift = (got - ref).abs()
    before, after = model_bytes(model), model_bytes(quantized)
    return {
        "bytes_before": before,
        "bytes_after": after,
        "memory_saving": 1 - after / before,
        "logit_drift_max": drift.max().item(),
        "logit_drift_mean": drift.mean().item(),
        "logit_drift_relative": (drift.mean() / ref.std()).item(),
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }
