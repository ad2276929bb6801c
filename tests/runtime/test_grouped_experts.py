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


def expert_parallel_ranks(full: Experts, cfg, world: int) -> list[Experts]:
    """full's experts cut into `world` expert-parallel ranks (each its contiguous range, whole)."""
    from model_runtime.distributed.shard import Shard

    ranks = []
    for rank in range(world):
        part = Experts(cfg, Shard(rank=rank, world=world, expert_parallel=True)).to(torch.bfloat16)
        e0, E = part.first_expert, part.num_local_experts
        with torch.no_grad():
            part.gate_up_proj.copy_(full.gate_up_proj[e0 : e0 + E])
            part.down_proj.copy_(full.down_proj[e0 : e0 + E])
        ranks.append(part)
    return ranks


class HostSync(Exception):
    pass


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek-v3"])
@pytest.mark.parametrize("tokens", [1, 5, 32])
def test_an_expert_parallel_ranks_grouped_experts_sum_to_the_whole_without_reading_the_counts(name, tokens, monkeypatch):
    """An expert-parallel rank's grouped GEMMs (what it runs on CUDA, local_grouped_forward) over
    only its own experts' assignments: the ranks' partial sums add up to the whole layer, each
    equals that rank's per-expert loop, and nothing is read back to the host on the way (the
    other ranks' assignments, past the last offset, are rows the GEMM leaves unwritten)."""
    model = load_model(f"builtin:{name}", dtype=torch.bfloat16)
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    weights, ids = moe.gate(x)
    ranks = expert_parallel_ranks(moe.experts, model.config, world=4 if model.config.num_experts % 4 == 0 else 2)
    assert all(not rank.grouped(x) for rank in ranks)  # on the CPU a rank keeps the loop (host counts)
    with monkeypatch.context() as patched:
        def sync(*_, **__):
            raise HostSync

        for method in ("tolist", "item", "__bool__", "__int__", "__float__"):
            patched.setattr(torch.Tensor, method, sync)
        partial = [rank.local_grouped_forward(x, weights, ids) for rank in ranks]
    for rank, got in zip(ranks, partial, strict=True):
        loop, _ = rank(x, weights, ids)
        torch.testing.assert_close(got.float(), loop.float(), rtol=2e-2, atol=2e-2)
        assert torch.isfinite(got).all()
    torch.testing.assert_close(
        sum(p.float() for p in partial), per_expert_loop(moe.experts, x, weights, ids), rtol=3e-2, atol=3e-2
    )
