"""The routed experts as two grouped GEMMs (bfloat16 on the CPU) compute what the per-expert loop
computes, in either weight layout, and run without a host sync."""

import pytest
import torch

from model_runtime import load_model
from model_runtime.kernels.cpu_decode import grouped_experts_layout
from model_runtime.models.model import Experts, MoE

pytestmark = pytest.mark.runtime


def per_expert_loop(experts: Experts, x, weights, ids):
    """The reference: each expert's matmul pair on its tokens, in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for n in range(ids.shape[0]):
        for a in range(ids.shape[1]):
            e = int(ids[n, a])
            gate, up = (x[n].float() @ experts.gate_up_proj[e].float().T).chunk(2)
            out[n] += weights[n, a].float() * (experts.act(gate) * up) @ experts.down_proj[e].float().T
    return out


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek-v3"])
@pytest.mark.parametrize("tokens", [1, 7, 32])
def test_grouped_experts_match_the_loop(name, tokens):
    model = load_model(f"builtin:{name}", dtype=torch.bfloat16)
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    weights, ids = moe.gate(x)
    assert moe.experts.grouped(x)
    grouped, counts = moe.experts(x, weights, ids)
    assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=model.config.num_experts).tolist()
    reference = per_expert_loop(moe.experts, x, weights, ids)
    torch.testing.assert_close(grouped.float(), reference, rtol=2e-2, atol=2e-2)  # bfloat16's tolerance

    grouped_experts_layout(model)  # what the engine does on the CPU: only strides change
    assert moe.experts.gate_up_proj.transpose(-2, -1).is_contiguous()
    relaid, _ = moe.experts(x, weights, ids)
    torch.testing.assert_close(relaid, grouped, rtol=0, atol=0)


def test_float32_and_quantized_experts_keep_the_loop():
    model = load_model("builtin:tiny-mixtral", dtype=torch.float32)
    experts = next(layer.mlp.experts for layer in model.layers if isinstance(layer.mlp, MoE))
    assert not experts.grouped(torch.zeros(2, model.config.hidden_size))
    from model_runtime.kernels.quant import quantize_int8

    quantized = quantize_int8(load_model("builtin:tiny-mixtral", dtype=torch.bfloat16))
    experts = next(layer.mlp.experts for layer in quantized.layers if isinstance(layer.mlp, MoE))
    assert not experts.grouped(torch.zeros(2, quantized.config.hidden_size, dtype=torch.bfloat16))
