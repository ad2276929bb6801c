"""The CPU decode kernels (model_runtime/kernels/csrc/cpu_decode.c) against torch's own ops.

Each kernel computes what the model's torch code computes for one row; the model decodes the
same tokens with the kernels on and off; and without a compiler or with the switch off the
runtime falls back to torch with a log line instead of failing.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.runtime_moe_experts import reference as experts_in_float32  # each token and expert in float32
from model_runtime import load_model
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import SamplingParams
from model_runtime.kernels import cpu_decode, shapes
from model_runtime.kernels import paged_attention as paged_kernel
from model_runtime.kernels.cpu_decode import use_cpu_decode_kernels
from model_runtime.models.builtin import random_model
from model_runtime.models.config import ModelConfig
from model_runtime.models.model import MLP, Attention, Experts, MLAttention, MoE, PagedContext
from model_runtime.models.paged import build_paged_batch

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="no C compiler or no AVX2 here")


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("out,inn", [(1, 1), (7, 13), (64, 768), (288, 768), (1000, 63), (129, 200)])
def test_gemv_matches_linear(out, inn):
    g = torch.Generator().manual_seed(out * inn)
    w, x = torch.randn(out, inn, generator=g), torch.randn(1, inn, generator=g)
    assert close(cpu_decode.gemv(x, w), F.linear(x, w))


def test_swiglu_matches_the_torch_expression():
    g = torch.Generator().manual_seed(2)
    D, I = 40, 24  # noqa: E741 (legend)
    gate, up, down = (
        torch.randn(I, D, generator=g),
        torch.randn(I, D, generator=g),
        torch.randn(D, I, generator=g),
    )
    x = torch.randn(1, D, generator=g)
    assert close(cpu_decode.SwiGLU(gate, up, down)(x), F.linear(F.silu(x @ gate.T) * (x @ up.T), down))


def test_rmsnorm_matches_torch():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 300, generator=g) * 5, torch.randn(300, generator=g)
    assert close(cpu_decode.rmsnorm(x, w, 1e-6), w * F.rms_norm(x, (300,), eps=1e-6))


DECODE_BLOCK = 4


def one_decode_context(window: int | None) -> PagedContext:
    """One sequence whose 11th token is decoded; its blocks (of DECODE_BLOCK tokens) scattered."""
    return PagedContext.build(build_paged_batch([([5, 2, 7], 10, 1)], DECODE_BLOCK), window)


def random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)
    return module.eval()


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_attention_kernel_matches_the_torch_layer(interleaved, q_lora_rank):
    cfg = ModelConfig(
        architecture="DeepseekV3ForCausalLM",
        attention="mla",
        hidden_size=32,
        num_attention_heads=3,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        rope_interleave=interleaved,
    )
    attn = random_(MLAttention(cfg), 4)
    bs, ctx = DECODE_BLOCK, one_decode_context(None)
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(8 * bs, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=g)
    x = torch.randn(1, 32, generator=g)
    angle = torch.randn(1, 2, generator=g)
    cos, sin = angle.cos(), angle.sin()
    with torch.inference_mode():
        want_cache = cache.clone()
        want = attn(x, cos, sin, ctx, want_cache)  # the torch code
        assert use_cpu_decode_kernels(attn) and attn.decode is not None
        got = attn(x, cos, sin, ctx, cache)
    assert close(cache, want_cache)
    assert close(got, want)


def test_a_bf16_mla_layers_heads_are_shared_with_the_helpers_and_as_close_to_float32_as_torchs():
    """One bfloat16 token through MLA's kernel (decision 41): its heads shared with the helper
    threads (W_uk and W_uv of 16 heads, 2 MB), each head's bits the same with 0, 1 or 2 helpers,
    and the layer's output as close to the float32 layer's (same bfloat16 weights) as torch's own
    bfloat16 layer is (on AVX512-BF16 the heads' latent rows are rounded to bfloat16 and summed as
    pairs, as torch's layer rounds them)."""
    cfg = ModelConfig(
        architecture="DeepseekV3ForCausalLM", attention="mla", hidden_size=1024, num_attention_heads=16,
        q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
    )  # fmt: skip
    with torch.no_grad():
        attn = MLAttention(cfg)
        for p in attn.parameters():  # O(1) activations, as a trained layer's
            p.copy_(1 + 0.1 * torch.randn(p.shape) if p.dim() == 1 else torch.randn(p.shape) / p.shape[-1] ** 0.5)
    attn = attn.bfloat16().eval()
    reference = copy.deepcopy(attn).float()
    ctx = PagedContext.build(build_paged_batch([(list(range(16)), 60, 1)], DECODE_BLOCK), None)
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(16 * DECODE_BLOCK, 512 + 64, generator=g).bfloat16()
    x = torch.randn(1, 1024, generator=g).bfloat16()
    angle = torch.randn(1, 32, generator=g)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    with torch.inference_mode():
        want = reference(x.float(), cos.float(), sin.float(), ctx, cache.float())
        torch_bf16 = attn(x, cos, sin, ctx, cache.clone())
        assert use_cpu_decode_kernels(attn) and attn.decode is not None
        assert cpu_decode.start_helpers(0) == 0
        got = attn(x, cos, sin, ctx, cache.clone())
        same_bits_with_helpers(lambda: [attn(x, cos, sin, ctx, cache.clone())], [got])
        assert cpu_decode.start_helpers(0) == 0
    err, torch_err = (got.float() - want).abs().max(), (torch_bf16.float() - want).abs().max()
    assert err <= 1.5 * torch_err + 1e-3, (err, torch_err)


ROUTERS = {
    "mixtral": dict(architecture="MixtralForCausalLM", norm_topk_prob=True),
    "qwen2-moe": dict(
        architecture="Qwen2MoeForCausalLM", shared_expert_intermediate_size=20, shared_expert_gate=True
    ),
    "deepseek-v2": dict(
        architecture="DeepseekV2ForCausalLM",
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        shared_expert_intermediate_size=16,
    ),
    "deepseek-v3": dict(
        architecture="DeepseekV3ForCausalLM",
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        shared_expert_intermediate_size=16,
    ),
}


@pytest.mark.parametrize("name", ROUTERS)
def test_moe_kernel_matches_the_torch_layer(name):
    cfg = ModelConfig(
        hidden_size=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=12, **ROUTERS[name]
    )
    moe = random_(MoE(cfg), 6)
    with torch.inference_mode():
        want = [
            moe(torch.randn(1, 32, generator=torch.Generator().manual_seed(i)).expand(2, 32))[:1]
            for i in range(20)
        ]
        torch_counts = moe.tokens_per_expert.clone()
        moe.tokens_per_expert.zero_()
        assert use_cpu_decode_kernels(moe) and moe.decode is not None
        got = [moe(torch.randn(1, 32, generator=torch.Generator().manual_seed(i))) for i in range(20)]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert close(a, b, 1e-5), (name, i)
    assert torch.equal(moe.tokens_per_expert, torch_counts // 2)  # the torch runs routed two copies


def test_the_model_decodes_the_same_tokens_with_and_without_the_kernels(monkeypatch):
    model = load_model("builtin:tiny-deepseek-v3", dtype=torch.float32).eval()
    assert any(isinstance(m, MLAttention) for m in model.modules())
    calls = {"n": 0}
    real = cpu_decode.MLAttention.__call__

    def counting(self, *args):
        calls["n"] += 1
        return real(self, *args)

    def greedy() -> list[int]:
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=1, num_kv_blocks=64, block_size=4))
        engine.add_request(
            "r", list(range(3, 40)), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        )
        tokens = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
        return tokens

    monkeypatch.setattr(cpu_decode.MLAttention, "__call__", counting)
    with_kernels = greedy()
    assert calls["n"] > 0  # the decode steps took the kernel
    monkeypatch.setattr(cpu_decode, "_lib", None)  # what the code sees with the kernels off
    calls["n"] = 0
    assert greedy() == with_kernels
    assert calls["n"] == 0


@pytest.mark.parametrize(
    "env,expect",
    [
        ({"MOE_RUNTIME_CPU_KERNELS": "0"}, "off (MOE_RUNTIME_CPU_KERNELS=0)"),
        ({"CC": "/bin/false"}, "off ("),
    ],
)
def test_without_kernels_torch_runs_and_says_why(env, expect, tmp_path):
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "torch.set_num_threads(1)\n"
        "from model_runtime.kernels import cpu_decode\n"
        "from model_runtime.kernels.cpu_decode import linear\n"
        "assert not cpu_decode.available()\n"
        "x, w = torch.randn(1, 8), torch.randn(4, 8)\n"
        "assert torch.allclose(linear(x, w), x @ w.T)\n"
    )
    run_env = {**os.environ, "MOE_RUNTIME_KERNEL_CACHE": str(tmp_path), "TMPDIR": str(tmp_path), **env}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpu decode kernels: " + expect in proc.stderr, proc.stderr


# ---- bfloat16: weights, cache and rows in bfloat16, float32 sums ---------------------------------


@pytest.fixture(params=["avx512", "avx2"])
def simd(request):
    """Each bfloat16 test on both loops: AVX-512F (where this CPU has it) and AVX2."""
    used = cpu_decode._lib.moe_simd_select(int(request.param == "avx512"))
    if request.param == "avx512" and not used:
        pytest.skip("this CPU has no AVX-512F")
    yield request.param
    cpu_decode._lib.moe_simd_select(1)


def bf16_close(got: torch.Tensor, want: torch.Tensor, ulps: float = 2.0) -> bool:
    """Equal within a few bfloat16 roundings of the output's scale (torch rounds some intermediate
    values to bfloat16 that the kernels keep in float32)."""
    assert got.dtype == want.dtype == torch.bfloat16, (got.dtype, want.dtype)
    tol = ulps * 2.0**-8 * want.float().abs().max().item()
    return got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("out,inn", [(1, 1), (7, 13), (64, 768), (288, 768), (1000, 63), (129, 200)])
def test_bf16_gemv_matches_linear(out, inn, simd):
    g = torch.Generator().manual_seed(out * inn)
    w, x = torch.randn(out, inn, generator=g).bfloat16(), torch.randn(1, inn, generator=g).bfloat16()
    got = cpu_decode.linear(x, w)
    # the float32 product of the same bfloat16 values, rounded once: what the kernel computes
    assert torch.allclose(
        got.float(), F.linear(x.float(), w.float()).bfloat16().float(), rtol=1e-2, atol=1e-3
    )
    assert bf16_close(got, F.linear(x, w), ulps=1)


def test_bf16_rmsnorm_matches_the_torch_layer(simd):
    from model_runtime.models.model import RMSNorm

    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(300, 1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(300, generator=g))
    x = (torch.randn(1, 300, generator=g) * 5).bfloat16()
    want = norm(x)
    got = cpu_decode.rmsnorm(x, norm.weight, 1e-6)
    assert bf16_close(got, want, ulps=1)


def test_bf16_swiglu_matches_the_torch_expression(simd):
    g = torch.Generator().manual_seed(2)
    D, I = 40, 24  # noqa: E741 (legend)
    gate, up, down = (torch.randn(*s, generator=g).bfloat16() for s in ((I, D), (I, D), (D, I)))
    x = torch.randn(1, D, generator=g).bfloat16()
    want = F.linear(F.silu(x @ gate.T) * (x @ up.T), down)
    assert bf16_close(cpu_decode.SwiGLU(gate, up, down)(x), want, ulps=4)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_bf16_mla_attention_kernel_matches_the_torch_layer(q_lora_rank, simd):
    cfg = ModelConfig(
        architecture="DeepseekV3ForCausalLM",
        attention="mla",
        hidden_size=64,
        num_attention_heads=3,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_interleave=True,
    )
    attn = random_(MLAttention(cfg), 4).bfloat16()
    bs, ctx = DECODE_BLOCK, one_decode_context(None)
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(8 * bs, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=g).bfloat16()
    x = torch.randn(1, 64, generator=g).bfloat16()
    angle = torch.randn(1, 4, generator=g)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    with torch.inference_mode():
        want_cache = cache.clone()
        want = attn(x, cos, sin, ctx, want_cache)  # the torch code, in bfloat16
        assert use_cpu_decode_kernels(attn) and attn.decode is not None
        got = attn(x, cos, sin, ctx, cache)
    assert cache.dtype == torch.bfloat16
    assert bf16_close(cache, want_cache, ulps=2)
    assert bf16_close(got, want, ulps=6)


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3"])
def test_bf16_moe_kernel_matches_the_torch_layer(name, layout, simd, monkeypatch):
    intermediate = 32 if layout == "row-major" else 24  # row-major: a whole AMX tile; 24: the loops' tails
    cfg = ModelConfig(
        hidden_size=64, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=intermediate, **ROUTERS[name]
    )
    moe = random_(MoE(cfg), 6).bfloat16()
    if layout == "column-major":  # as the engine keeps bfloat16 experts on CPUs without AMX
        monkeypatch.setattr(cpu_decode, "_amx", False)
        monkeypatch.setattr(cpu_decode, "_dpbf16", False)  # nor AVX512-BF16
        cpu_decode.grouped_experts_layout(moe)
        assert not moe.experts.gate_up_proj.is_contiguous()
    xs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(20)]
    with torch.inference_mode():
        want = [moe(x.expand(2, 64))[:1] for x in xs]
        torch_counts = moe.tokens_per_expert.clone()
        moe.tokens_per_expert.zero_()
        assert use_cpu_decode_kernels(moe) and moe.decode is not None
        assert moe.experts.gate_up_proj.is_contiguous() == cpu_decode.amx_experts_layer(moe.experts)  # the engine's
        got = [moe(x) for x in xs]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert bf16_close(a, b, ulps=6), (name, i)
    assert torch.equal(moe.tokens_per_expert, torch_counts // 2)


@pytest.mark.parametrize(
    ("window", "interleaved", "extras"),
    [
        (None, False, {}),  # Mixtral
        (5, True, {}),
        (None, False, {"qkv_bias": True}),  # Qwen2-MoE
        (None, False, {"qk_norm": True, "qkv_bias": True, "o_bias": True}),  # Qwen3-MoE with attention_bias
        (None, True, {"qk_norm": True}),  # Qwen3-MoE
    ],
)
def test_bf16_gqa_attention_layer_matches_the_torch_layer(window, interleaved, extras):
    """Grouped-query attention for one bfloat16 token as C calls only (projections, biases, q/k
    norms, rope and cache writes, attention read in place, o_proj): the torch layer's output and
    cache."""
    from model_runtime.kernels import paged_attention as paged_kernel

    if paged_kernel.avx512_lib() is None:
        pytest.skip("the one-token attention's C calls need AVX512-BF16")
    cfg = ModelConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=window,
        rope_interleave=interleaved, **extras,
    )  # fmt: skip
    attn = random_(Attention(cfg), 4).bfloat16()
    bs, ctx = DECODE_BLOCK, one_decode_context(window)
    g = torch.Generator().manual_seed(6)
    cache = torch.randn(2, 8 * bs, 2, 32, generator=g).bfloat16()
    x = torch.randn(1, 64, generator=g).bfloat16()
    angle = torch.randn(1, 16, generator=g)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    with torch.inference_mode():
        want_cache = cache.clone()
        want = attn(x, cos, sin, ctx, want_cache)  # the torch layer (oneDNN projections)
        assert use_cpu_decode_kernels(attn) and type(attn.decode) is cpu_decode.GQAttention
        got = attn(x, cos, sin, ctx, cache)
    assert (attn.decode.qkv_bias is not None) == cfg.qkv_bias and (attn.decode.qk_norm is not None) == cfg.qk_norm
    assert bf16_close(cache, want_cache, ulps=2)
    assert bf16_close(got, want, ulps=6)


@pytest.mark.parametrize(
    ("window", "interleaved", "extras"),
    [(None, False, {}), (5, True, {}), (None, False, {"qk_norm": True, "qkv_bias": True, "o_bias": True})],
)
def test_float32_gqa_attention_layer_matches_the_torch_layer(window, interleaved, extras):
    """The same C-only layer for one float32 token (the runtime's dtype on CPUs without native
    bfloat16 matmul; any CPU the kernels load on): the rope and cache writes hold torch's bits,
    and the output is the torch layer's to float32 rounding."""
    from model_runtime.kernels import paged_attention as paged_kernel

    if not paged_kernel.available():
        pytest.skip("no paged attention kernel on this CPU")
    cfg = ModelConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=window,
        rope_interleave=interleaved, **extras,
    )  # fmt: skip
    attn = random_(Attention(cfg), 4)
    bs, ctx = DECODE_BLOCK, one_decode_context(window)
    g = torch.Generator().manual_seed(7)
    cache = torch.randn(2, 8 * bs, 2, 32, generator=g)
    x = torch.randn(1, 64, generator=g)
    angle = torch.randn(1, 16, generator=g)
    cos, sin = angle.cos(), angle.sin()
    with torch.inference_mode():
        want_cache = cache.clone()
        want = attn(x, cos, sin, ctx, want_cache)
        assert use_cpu_decode_kernels(attn) and type(attn.decode) is cpu_decode.GQAttention
        got = attn(x, cos, sin, ctx, cache)
    assert not torch.equal(cache, torch.randn(2, 8 * bs, 2, 32, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(cache, want_cache, atol=1e-5, rtol=1e-5)  # the new row: gemv's sums, then rope
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extras", [{}, {"qk_norm": True, "qkv_bias": True, "o_bias": True}])
def test_float32_gqa_attention_layer_over_projections_kept_as_bfloat16_gives_the_same_bits(extras, monkeypatch):
    """A float32 attention layer whose projections are bfloat16 values keeps them as bfloat16 on a
    CPU without AVX-512 (narrow_linears; biases and q/k norms stay float32) and its one-token C
    layer (GQAttention) writes the same cache rows and output bits as over the float32 copy."""
    from model_runtime.kernels import paged_attention as paged_kernel

    if not (paged_kernel.available() and cpu_decode.available()) or cpu_decode._avx512:
        pytest.skip("the float32 kernels keep float32 projections on AVX-512 CPUs (or none here)")
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, **extras)
    layers_ = []
    for narrow in ("1", "0"):
        attn = bf16_valued(random_(Attention(cfg), 4))
        monkeypatch.setenv("MOE_RUNTIME_NARROW_WEIGHTS", narrow)
        assert use_cpu_decode_kernels(attn) and type(attn.decode) is cpu_decode.GQAttention
        layers_.append(attn)
    narrow, wide = layers_
    assert narrow.q_proj.weight.dtype == narrow.o_proj.weight.dtype == torch.bfloat16
    assert wide.q_proj.weight.dtype == torch.float32 and narrow.decode.dtype == torch.float32
    g = torch.Generator().manual_seed(8)
    cache = torch.randn(2, 8 * DECODE_BLOCK, 2, 32, generator=g)
    x = torch.randn(1, 64, generator=g)
    angle = torch.randn(1, 16, generator=g)
    ctx = one_decode_context(None)
    with torch.inference_mode():
        got_cache, want_cache = cache.clone(), cache.clone()
        got = narrow(x, angle.cos(), angle.sin(), ctx, got_cache)
        want = wide(x, angle.cos(), angle.sin(), ctx, want_cache)
    assert torch.equal(got_cache, want_cache) and not torch.equal(got_cache, cache)
    assert torch.equal(got, want)


def narrow_and_wide(build, monkeypatch) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same float32 layer of bfloat16 values prepared for the kernels twice: its weights kept
    as bfloat16 (narrow_linears) and kept float32 (MOE_RUNTIME_NARROW_WEIGHTS=0)."""
    if not cpu_decode.available() or cpu_decode._avx512:
        pytest.skip("the float32 kernels keep float32 weights on AVX-512 CPUs (or none here)")
    made = []
    for narrow in ("1", "0"):
        layer = bf16_valued(build())
        monkeypatch.setenv("MOE_RUNTIME_NARROW_WEIGHTS", narrow)
        assert use_cpu_decode_kernels(layer)
        made.append(layer)
    return made[0], made[1]


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_float32_mla_layer_over_projections_kept_as_bfloat16_gives_the_same_bits(q_lora_rank, monkeypatch):
    """A float32 MLA layer whose projections are bfloat16 values keeps all five as bfloat16 on a CPU
    without AVX-512 (narrow_linears; its norms stay float32). One token (the C layer, MLAttention),
    a decode step of three sequences (the rows kernel, the absorbed kv_b halves widened once) and a
    prefill (kv_b expanding the latents) write the same cache rows and give the same output bits
    as over the float32 copy."""
    cfg = ModelConfig(
        architecture="DeepseekV3ForCausalLM", attention="mla", hidden_size=32, num_attention_heads=3,
        q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    narrow, wide = narrow_and_wide(lambda: random_(MLAttention(cfg), 4), monkeypatch)
    projections = ["q_a_proj", "q_b_proj"] if q_lora_rank else ["q_proj"]
    projections += ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    assert all(getattr(narrow, p).weight.dtype == torch.bfloat16 for p in projections)
    assert all(getattr(wide, p).weight.dtype == torch.float32 for p in projections)
    assert narrow.kv_a_layernorm.weight.dtype == torch.float32
    assert type(narrow.decode) is cpu_decode.MLAttention and narrow.decode.dtype == torch.float32
    g = torch.Generator().manual_seed(9)
    cache = torch.randn(8 * DECODE_BLOCK, 20, generator=g)
    three = PagedContext.build(build_paged_batch([([5, 2, 7], 10, 1), ([1, 3], 6, 1), ([4], 2, 1)], DECODE_BLOCK), None)
    prefill = PagedContext.build(build_paged_batch([([0, 6], 0, 7)], DECODE_BLOCK), None)
    for ctx, rows in ((one_decode_context(None), 1), (three, 3), (prefill, 7)):
        x = torch.randn(rows, 32, generator=g)
        angle = torch.randn(rows, 2, generator=g)
        with torch.inference_mode():
            got_cache, want_cache = cache.clone(), cache.clone()
            got = narrow(x, angle.cos(), angle.sin(), ctx, got_cache)
            want = wide(x, angle.cos(), angle.sin(), ctx, want_cache)
        assert torch.equal(got_cache, want_cache) and not torch.equal(got_cache, cache), rows
        assert torch.equal(got, want), rows
        assert not torch.allclose(got, want.roll(1, -1)), rows


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen2-moe"])
def test_float32_mlps_and_shared_experts_kept_as_bfloat16_give_the_same_bits(name, monkeypatch):
    """A float32 dense SwiGLU MLP and a MoE layer's shared expert whose weights are bfloat16 values
    keep gate, up and down as bfloat16 on a CPU without AVX-512 (narrow_linears; Qwen2-MoE's shared
    expert gate stays float32): one token through the C layers (SwiGLU; MoE's shared expert read
    as bfloat16 beside the routed experts) and several rows through the rows kernel give the
    float32 weights' bits."""
    mlp_narrow, mlp_wide = narrow_and_wide(lambda: random_(MLP(64, 48, "silu"), 7), monkeypatch)
    assert mlp_narrow.down_proj.weight.dtype == torch.bfloat16 and mlp_wide.down_proj.weight.dtype == torch.float32
    assert type(mlp_narrow.decode) is cpu_decode.SwiGLU and mlp_narrow.decode.dtype == torch.float32
    cfg = ModelConfig(
        hidden_size=64, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48,
        **{**ROUTERS[name], "shared_expert_intermediate_size": 40},
    )  # fmt: skip
    moe_narrow, moe_wide = narrow_and_wide(lambda: random_(MoE(cfg), 6), monkeypatch)
    shared = moe_narrow.shared_experts
    assert shared.gate_proj.weight.dtype == shared.up_proj.weight.dtype == shared.down_proj.weight.dtype == torch.bfloat16
    assert moe_wide.shared_experts.gate_proj.weight.dtype == torch.float32
    assert type(moe_narrow.decode) is cpu_decode.MoE and moe_narrow.decode.config[-1] == 1  # shared_bf
    if name == "qwen2-moe":
        assert moe_narrow.shared_expert_gate.weight.dtype == torch.float32
    for rows in (1, 1, 5, 32):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows + 40))
        for narrow, wide in ((mlp_narrow, mlp_wide), (moe_narrow, moe_wide)):
            with torch.inference_mode():
                got, want = narrow(x), wide(x)
            assert got.dtype == torch.float32 and torch.equal(got, want), (type(narrow).__name__, rows)
            assert not torch.allclose(got, want.roll(1, -1))


@pytest.mark.parametrize("builtin", ["tiny-deepseek-v3", "tiny-mixtral"])
def test_a_bf16_model_decodes_with_the_kernels_as_closely_as_torch(builtin, monkeypatch):
    """A bfloat16 model's decode steps take the kernels (one C call per MoE / MLA layer), and its
    logits are as close to the float32 model's (same bfloat16 weights) as torch's own bfloat16 run.
    (Greedy tokens of these random tiny models part ways after a few steps under any change of
    rounding, torch's bfloat16 against float32 too, so the logits are compared.)"""
    model = load_model(f"builtin:{builtin}", dtype=torch.bfloat16).eval()
    reference = load_model(f"builtin:{builtin}", dtype=torch.bfloat16).eval().float()
    layer = cpu_decode.MLAttention if builtin == "tiny-deepseek-v3" else cpu_decode.MoE
    calls = {"n": 0}
    real = layer.__call__

    def counting(self, *args):
        calls["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(layer, "__call__", counting)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=1, num_kv_blocks=64, block_size=4))
    engine.add_request("r", list(range(3, 40)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    assert len(tokens) == 8 and calls["n"] >= 7 * model.config.num_hidden_layers - 2  # every decode step
    assert type(model.lm_head) is cpu_decode.DecodeLinear
    with torch.inference_mode():  # one token each (a decode step without context): the kernels run
        ids = [torch.tensor([[t]]) for t in range(3, 13)]
        want = torch.cat([reference(i) for i in ids])
        got = torch.cat([model(i) for i in ids])
        monkeypatch.setattr(cpu_decode, "_lib", None)
        torch_bf16 = torch.cat([model(i) for i in ids])
    # per token; a router's near-tie (top scores 0.003 apart) can pick another expert for one token
    err, torch_err = (got - want).abs().amax(-1), (torch_bf16 - want).abs().amax(-1).max()
    assert (err <= 1.5 * torch_err).sum() >= 9, (err, torch_err)
    assert (got.argmax(-1) == want.argmax(-1)).sum() >= 9


def count_calls(monkeypatch, owner, name: str) -> dict[str, int]:
    """owner.name replaced by a wrapper that counts its calls (in the returned dict's "n")."""
    calls = {"n": 0}
    real = getattr(owner, name)

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(owner, name, counting)
    return calls


def routed_experts_case(
    name: str, tokens: int, seed: int = 7, hidden: int = 64, intermediate: int = 48, layout: str = "column-major",
    dtype: torch.dtype = torch.bfloat16,
):  # fmt: skip
    """A bfloat16 (or `dtype`) MoE layer with the kernels applied and `tokens` rows with their
    routing: the experts column-major as the engine keeps them on CPUs without AMX
    (moe_experts_bf16's layout, and float32's everywhere), or as the engine leaves them where the
    CPU has AMX ("engine": row-major there), or as loaded ("none": no kernels)."""
    cfg = ModelConfig(
        hidden_size=hidden, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=intermediate,
        **ROUTERS[name],
    )  # fmt: skip
    moe = random_(MoE(cfg), 6).to(dtype)
    with pytest.MonkeyPatch.context() as patched:
        if layout == "column-major":
            patched.setattr(cpu_decode, "_amx", False)  # as on a CPU without AMX
            patched.setattr(cpu_decode, "_dpbf16", False)  # nor AVX512-BF16
        if layout != "none":  # "none": the layer as loaded, no kernels
            assert use_cpu_decode_kernels(moe)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.inference_mode():
        weights, ids = moe.gate(x)
    return moe.experts, x, weights, ids


@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate"),
    [
        (2, 64, 48),
        (7, 64, 48),
        (32, 64, 48),
        (cpu_decode.EXPERTS_MAX_TOKENS, 64, 48),
        # weights taller than the kernel's 128-row chunks (sums carried across them) and wider
        # than its 64-column tiles with a 16-column tail; an expert with over 6 tokens (blocks)
        (40, 320, 144),
    ],
)
@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3"])
def test_bf16_routed_experts_kernel_matches_the_grouped_gemm(name, tokens, hidden, intermediate, monkeypatch):
    """At decode sizes the routed experts of a bfloat16 layer are one C call (moe_experts_bf16),
    with torch's grouped GEMM's output (within bfloat16 roundings: the kernel keeps the hidden
    activations and the sum over experts in float32) and its tokens per expert."""
    if not (cpu_decode.available() and cpu_decode._avx512):
        pytest.skip("this CPU has no AVX-512F")
    experts, x, weights, ids = routed_experts_case(name, tokens, hidden=hidden, intermediate=intermediate)
    calls = count_calls(monkeypatch, cpu_decode, "routed_experts")
    with torch.inference_mode():
        got, got_counts = experts(x, weights, ids)
        assert calls["n"] == 1
        want, want_counts = Experts.forward(experts, x, weights, ids)  # the torch code
        want32 = experts_in_float32(experts, x, weights, ids)
    assert calls["n"] == 1  # torch's forward did not call it
    assert torch.equal(got_counts, want_counts)
    assert bf16_close(got, want, ulps=6)
    # closer to float32 than torch's bfloat16 (which rounds every intermediate)
    assert (got.float() - want32).abs().max() <= (want.float() - want32).abs().max()


@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate"),
    [(2, 64, 48), (9, 64, 40), (32, 64, 48), (cpu_decode.EXPERTS_MAX_TOKENS, 64, 48), (40, 320, 144)],
)
@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3"])
def test_float32_routed_experts_kernel_matches_the_torch_code(name, tokens, hidden, intermediate, monkeypatch):
    """float32 (the runtime's dtype on CPUs without native bfloat16 matmul): the routed experts of a
    decode step are one C call (moe_experts_f32, AVX2) on the engine's column-major experts, with
    the torch code's output to float32 rounding and its tokens per expert; a prefill's rows, one
    row, row-major experts or two threads keep the torch code."""
    experts, x, weights, ids = routed_experts_case(
        name, tokens, hidden=hidden, intermediate=intermediate, dtype=torch.float32
    )
    assert not experts.gate_up_proj.is_contiguous() and not experts.down_proj.is_contiguous()  # column-major
    calls = count_calls(monkeypatch, cpu_decode, "routed_experts")
    with torch.inference_mode():
        got, got_counts = experts(x, weights, ids)
        assert calls["n"] == 1
        want, want_counts = Experts.forward(experts, x, weights, ids)  # the torch code
    assert calls["n"] == 1 and got.dtype == torch.float32
    assert torch.equal(got_counts, want_counts)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    exact = experts_in_float32(experts, x, weights, ids, dtype=torch.float64)
    assert (got - exact).abs().max() <= 2 * (want - exact).abs().max() + 1e-6  # as close as torch's float32
    assert not torch.allclose(got, want.roll(1, 0), atol=1e-2)  # each token its own experts
    with torch.inference_mode():
        assert not cpu_decode.experts_kernel(experts, x[:1])
        assert not cpu_decode.experts_kernel(experts, torch.cat([x] * (cpu_decode.EXPERTS_MAX_TOKENS // tokens + 1)))
        assert not cpu_decode.experts_kernel(experts, x.bfloat16())
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert not cpu_decode.experts_kernel(experts, x)
        monkeypatch.undo()
        experts.gate_up_proj.data = experts.gate_up_proj.data.contiguous()
        assert not cpu_decode.experts_kernel(experts, x)


def test_the_routed_experts_kernel_sums_an_expert_named_twice_for_a_token():
    """ids that name one expert twice for a token (not what top-k routing gives, but what the
    layer's torch code sums): the kernel takes such an expert's choices in more than one pass of
    its scratch and sums both, as torch's grouped GEMM does."""
    if not (cpu_decode.available() and cpu_decode._avx512):
        pytest.skip("this CPU has no AVX-512F")
    experts, x, weights, _ = routed_experts_case("mixtral", 5)
    ids = torch.tensor([[2, 2, 5]] * 5)  # expert 2: 10 choices for 5 tokens
    with torch.inference_mode():
        assert cpu_decode.experts_kernel(experts, x)
        got, got_counts = cpu_decode.routed_experts(x, weights, ids, experts.gate_up_proj, experts.down_proj)
        want, want_counts = Experts.forward(experts, x, weights, ids)
    assert torch.equal(got_counts, want_counts) and int(got_counts[2]) == 10
    assert bf16_close(got, want, ulps=6)


def test_the_routed_experts_kernel_takes_only_decode_sizes_of_the_engine_layout(monkeypatch):
    """One token (the batch-1 kernels' case), more than EXPERTS_MAX_TOKENS (a prefill: torch's
    grouped GEMM), row-major experts, float32 or autograd: torch's code runs."""
    if not (cpu_decode.available() and cpu_decode._avx512):
        pytest.skip("this CPU has no AVX-512F")
    experts, x, weights, ids = routed_experts_case("mixtral", cpu_decode.EXPERTS_MAX_TOKENS + 1)
    with torch.inference_mode():
        assert cpu_decode.experts_kernel(experts, x[:2])
        assert not cpu_decode.experts_kernel(experts, x)
        assert not cpu_decode.experts_kernel(experts, x[:1])
        assert not cpu_decode.experts_kernel(experts, x[:2].float())
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert not cpu_decode.experts_kernel(experts, x[:2])
        monkeypatch.undo()
        experts.gate_up_proj.data = experts.gate_up_proj.data.contiguous()
        assert not cpu_decode.experts_kernel(experts, x[:2])


def argmax_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    nan = torch.randn(4, 50, generator=g)
    nan[1, 17] = nan[2, 49] = float("nan")  # a NaN wins, as in torch
    nan[3, 3] = nan[3, 40] = float("inf")  # ties: the first
    late = torch.full((2, 20), -float("inf"))
    late[1, 18] = -5.0  # the maximum in the tail after 16 lanes of -inf
    lane = torch.full((2, 12), -float("inf"))
    lane[0, 9] = lane[1, 3] = 1.0  # one lane of 8 holds the maximum; a tail after 8 lanes
    return [
        torch.randn(32, 8192, generator=g),
        torch.randn(3, 7, generator=g),  # shorter than a vector
        torch.full((2, 40), -float("inf")),
        torch.zeros(4, 33),  # all tied
        nan,
        late,
        lane,
        torch.randn(64, 8192, generator=g)[:, :8000],  # rows apart by more than their length
        torch.randint(0, 3, (8, 1000), generator=g).float(),  # many ties
    ]


@pytest.mark.parametrize("case", range(len(argmax_cases())))
def test_argmax_is_torchs(case):
    """Greedy sampling's argmax (a C scan: AVX-512 or AVX2, whichever this CPU runs) gives torch's
    indices, ties and NaNs included."""
    x = argmax_cases()[case]
    assert torch.equal(cpu_decode.argmax(x), x.argmax(dim=-1))
    taken = torch.full((x.shape[0],), -1, dtype=torch.int64)  # the C scan itself, not a fallback
    cpu_decode._lib.moe_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), taken.data_ptr())
    assert torch.equal(taken, x.argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_of_a_decode_steps_rows_matches_the_torch_layer(dtype, simd):
    """RMSNorm over a few rows (a decode step of several sequences) is one C call, with torch's
    values (bfloat16: its bits on these rows): contiguous rows, a [N, D] view of a wider matrix
    (MLA's latent) and [N, H, Dh] heads; the AVX-512 and the portable loop."""
    from model_runtime.models.model import RMSNorm

    g = torch.Generator().manual_seed(4)
    norm = RMSNorm(48, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
    wide = (torch.randn(32, 48 + 16, generator=g) * 5).to(dtype)
    inputs = [wide[:, :48].contiguous(), wide[:, :48], wide[:, :48].reshape(32, 3, 16).contiguous()]
    norms = [norm, norm, random_(RMSNorm(16, 1e-6), 1).to(dtype)]
    for x, layer in zip(inputs, norms, strict=True):
        with torch.no_grad():
            want = layer(x)
            assert use_cpu_decode_kernels(layer) and type(layer) is cpu_decode.DecodeRMSNorm
            assert cpu_decode.rmsnorm_rows(x, layer.weight, layer.eps) is not None  # the kernel takes it
            got = layer(x)
        if dtype == torch.bfloat16:
            assert bf16_close(got, want, ulps=1)
            if simd == "avx512":
                assert torch.equal(got, want)
        else:
            assert close(got, want, 1e-5)
    assert cpu_decode.rmsnorm_rows(wide.t(), norm.weight, 1e-6) is None  # columns: torch's ops


def test_rmsnorm_of_a_prefills_bfloat16_rows_takes_the_avx512_kernel():
    """A prefill's rows (more than NORM_MAX_ROWS) of bfloat16 take the vectorized AVX-512 kernel
    too, within an ulp of torch's (which rounds through float32 ops); float32 rows beyond it, and
    bfloat16 ones on a CPU without AVX-512, keep torch's ops."""
    from model_runtime.models.model import RMSNorm

    if not (cpu_decode.available() and cpu_decode._avx512):
        pytest.skip("needs the kernels on an AVX-512 CPU")
    g = torch.Generator().manual_seed(9)
    norm = random_(RMSNorm(1024, 1e-6), 2).bfloat16()
    x = (torch.randn(1000, 1024, generator=g) * 3).bfloat16()
    with torch.no_grad():
        want = norm(x)
        assert use_cpu_decode_kernels(norm)
        got = norm(x)
        assert cpu_decode.rmsnorm_rows(x, norm.weight, norm.eps) is not None
        assert cpu_decode.rmsnorm_rows(x.float(), norm.weight.float(), norm.eps) is None
        for rows in (slice(0, 1), slice(0, 7), slice(500, 1000)):  # a row's bits as in a smaller step
            assert torch.equal(norm(x[rows]), got[rows])
    assert bf16_close(got, want, ulps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ROUTERS)
def test_router_of_a_decode_steps_tokens_matches_the_torch_layer(name, dtype):
    """A decode step's tokens are routed in one C call (moe_route_rows, the batch-1 MoE kernel's
    routing per token): torch's experts and weights for every routing method."""
    from model_runtime.models.model import Router

    cfg = ModelConfig(
        hidden_size=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=12, **ROUTERS[name]
    )
    router = random_(Router(cfg), 8).to(dtype)
    if cfg.topk_method == "noaux_tc":
        router.e_score_correction_bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(9)).to(dtype)
    with torch.inference_mode():
        want_w, want_ids = router(x)
        assert use_cpu_decode_kernels(router) and type(router) is cpu_decode.DecodeRouter
        got_w, got_ids = router(x)
        assert torch.equal(router(x[:1])[1], want_ids[:1])  # one token: torch's code (the MoE kernel routes it)
    assert got_ids.dtype == torch.int64 and got_w.dtype == torch.float32
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("builtin", ["tiny-mixtral", "tiny-deepseek-v3"])
def test_fused_projections_are_views_and_a_step_of_rows_takes_one_matmul_each(builtin, monkeypatch):
    """Attention's q/k/v and a SwiGLU MLP's gate/up (dense or a shared expert) become one matrix
    each: the linears' weights are row views of it (memory unchanged, in-place updates seen), a
    forward over several rows takes one matmul per group, and gives the unfused model's output."""
    model = load_model(f"builtin:{builtin}", dtype=torch.bfloat16).eval()
    reference = load_model(f"builtin:{builtin}", dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    assert use_cpu_decode_kernels(model)
    with monkeypatch.context() as patched:
        patched.setattr(cpu_decode, "fuse_projections", lambda m: 0)
        assert use_cpu_decode_kernels(reference)
    assert sum(p.numel() for p in model.parameters()) == params
    groups = [(m, "qkv", [m.q_proj, m.k_proj, m.v_proj]) for m in model.modules() if isinstance(m, Attention)]
    groups += [(m, "gate_up", [m.gate_proj, m.up_proj]) for m in model.modules() if isinstance(m, MLP)]
    assert groups and {name for _, name, _ in groups} == ({"qkv"} if builtin == "tiny-mixtral" else {"gate_up"})
    for m, name, linears in groups:
        fused = shapes.fused(m, name)
        assert fused is not None and fused.sizes == [lin.weight.shape[0] for lin in linears]
        at = fused.weight.data_ptr()
        for lin in linears:  # consecutive row ranges of the one matrix
            assert lin.weight.data_ptr() == at
            at += lin.weight.numel() * lin.weight.element_size()
    onednn = count_calls(monkeypatch, shapes, "linear")
    amx = count_calls(monkeypatch, cpu_decode, "amx_linear")  # a few bfloat16 rows, on AMX CPUs
    ids = torch.arange(3, 20)[None]  # 17 rows: the matmul path, not the one-row kernels
    with torch.inference_mode():
        got = model(ids)
        fused_calls = onednn["n"] + amx["n"]
        onednn["n"] = amx["n"] = 0
        want = reference(ids)
        assert fused_calls == onednn["n"] + amx["n"] - sum(len(linears) - 1 for _, _, linears in groups)
        assert torch.equal(got, want), (got - want).abs().max()  # the same products, one matmul
        m, name, linears = groups[0]
        linears[-1].weight.mul_(0.5)  # an in-place update of a linear is its rows of the matrix
        assert torch.equal(shapes.fused(m, name).weight[-linears[-1].weight.shape[0] :], linears[-1].weight)


@pytest.mark.skipif(paged_kernel.avx512_lib() is None, reason="gqa_prepare needs AVX512-BF16")
def test_a_paged_prefill_of_fused_qkv_ropes_and_writes_the_cache_in_one_c_call_a_layer(monkeypatch):
    """q/k/v fused into one projection: their rows are column ranges of its output, and the paged
    prefill still rotates q and k and writes the cache in one C call (gqa_prepare) per layer."""
    model = load_model("builtin:tiny-mixtral", dtype=torch.bfloat16).eval()
    assert use_cpu_decode_kernels(model)
    assert all(shapes.fused(m, "qkv") is not None for m in model.modules() if isinstance(m, Attention))
    taken, real_prepare = [], paged_kernel.gqa_prepare
    monkeypatch.setattr(paged_kernel, "gqa_prepare", lambda *a: taken.append(real_prepare(*a)) or taken[-1])
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=2, num_kv_blocks=64, block_size=4))
    engine.add_request("r", list(range(3, 20)), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    engine.step()
    assert len(taken) == model.config.num_hidden_layers and all(taken)


@pytest.mark.parametrize(
    "rows,out,inn,bias",
    [(2, 1, 8, False), (3, 7, 24, True), (5, 48, 64, True), (16, 1030, 256, False), (17, 96, 1032, True),
     (33, 81, 96, False), (64, 512, 1024, True)],
)  # fmt: skip
def test_float32_linear_kernel_matches_float64_and_a_row_is_the_same_in_any_step(rows, out, inn, bias):
    """A few float32 rows through moe_linear_f32 (called directly: the kernel runs on any AVX2 CPU):
    as close to the float64 product as torch's float32 matmul is, x's rows a strided view, the
    outputs past the last whole tile of weight rows too; and each row's result the same bits
    whatever else is in the step (a sequence's logits do not depend on its neighbours)."""
    g = torch.Generator().manual_seed(rows * out + inn)
    wide = torch.randn(rows, inn + 32, generator=g)
    x = wide[:, 16 : 16 + inn]  # rows inn + 32 apart
    w = torch.randn(out, inn, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    got = cpu_decode.f32_linear(x, w, b)
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch_error = (F.linear(x, w, b).double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * torch_error + 1e-6
    for part in (slice(0, 2), slice(rows - 2, rows), slice(1, rows)):  # the same rows in other steps
        assert torch.equal(cpu_decode.f32_linear(x[part], w, b), got[part])
    batched = cpu_decode.f32_linear(x.reshape(1, rows, inn), w, b)  # [..., in] as F.linear takes it
    assert batched.shape == (1, rows, out) and torch.equal(batched[0], got)


@pytest.mark.skipif(cpu_decode._avx512, reason="AVX-512 CPUs keep MKL's sgemm for float32 rows")
def test_linear_takes_the_float32_kernel_only_where_it_applies(monkeypatch):
    """One row: the streaming gemv; 2 .. F32_MAX_ROWS float32 rows, K a multiple of 8: the AVX2
    dot-product kernel; anything else (more rows, K not a multiple of 8, a strided bias, bfloat16,
    autograd, more threads): torch's matmul."""
    taken = count_calls(monkeypatch, cpu_decode, "f32_linear")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(60, 128, generator=g)

    def uses_kernel(x, w, bias=None):
        before = taken["n"]
        got = cpu_decode.linear(x, w, bias)
        torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        return taken["n"] > before

    rows = lambda n: torch.randn(n, 128, generator=g)  # noqa: E731
    with torch.inference_mode():
        assert not uses_kernel(rows(1), w)
        assert uses_kernel(rows(2), w) and uses_kernel(rows(cpu_decode.F32_MAX_ROWS), w)
        assert not uses_kernel(rows(cpu_decode.F32_MAX_ROWS + 1), w)
        assert not uses_kernel(rows(8)[:, :124], w[:, :124])  # 124 inputs: not whole vectors
        assert uses_kernel(rows(8), w, torch.randn(60, generator=g))
        assert not uses_kernel(rows(8), w, torch.randn(120, generator=g)[::2])  # a strided bias
        before = taken["n"]
        cpu_decode.linear(rows(8).bfloat16(), w.bfloat16())
        assert taken["n"] == before
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert not uses_kernel(rows(8), w)
    x = rows(8).requires_grad_()
    got = cpu_decode.linear(x, w)
    assert got.requires_grad and taken["n"] == before  # autograd: torch's op


amx = pytest.mark.skipif(not cpu_decode._amx, reason="this CPU (or OS) runs no AMX")
# the routed experts' row-major kernels: moe_amx_experts, or moe_dpbf16_experts where the CPU has
# AVX512-BF16 but no AMX (decision 40)
row_experts = pytest.mark.skipif(
    not (cpu_decode._amx or cpu_decode._dpbf16), reason="this CPU runs neither AMX nor AVX512-BF16"
)


@amx
@pytest.mark.parametrize(
    "rows,out,inn,bias",
    [(2, 16, 32, False), (5, 48, 64, True), (16, 1040, 256, False), (17, 96, 1024, True), (33, 80, 96, False),
     (64, 512, 1024, True), (500, 48, 2048, True),  # two passes of 256 rows (1 MB of K 2048)
     (5, 40, 64, True), (17, 7, 96, False), (40, 1001, 256, True)],  # outputs no multiple of 16
)  # fmt: skip
def test_amx_linear_matches_torch_and_a_row_is_the_same_in_any_step(rows, out, inn, bias):
    """bfloat16 rows through the AMX kernel (a decode step's few, a prefill's hundreds, in passes):
    what oneDNN computes (the float32 sum of the same products, rounded once), x's rows a strided
    view, the bias added before the rounding; and each row's result the same bits whatever else is
    in the step."""
    g = torch.Generator().manual_seed(rows * out + inn)
    wide = torch.randn(rows, inn + 32, generator=g).bfloat16()
    x = wide[:, 16 : 16 + inn]  # rows inn + 32 apart
    w = torch.randn(out, inn, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    assert cpu_decode.amx_rows(x, w, b)
    got = cpu_decode.linear(x, w, b)
    exact = (x.double() @ w.double().T + (b.double() if bias else 0)).bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
    assert bf16_close(got, F.linear(x, w, b), ulps=1)
    assert bf16_close(got, exact, ulps=1)
    for part in (slice(0, 2), slice(rows - 2, rows), slice(1, rows)):  # the same rows in other steps
        assert torch.equal(cpu_decode.linear(x[part], w, b), got[part])
    batched = cpu_decode.linear(x.reshape(1, rows, inn), w, b)  # [..., in] as F.linear takes it
    assert batched.shape == (1, rows, out) and torch.equal(batched[0], got)


@amx
def test_linear_takes_the_amx_kernel_only_where_it_applies(monkeypatch):
    """One row: the streaming gemv; 2 .. AMX_MAX_ROWS bfloat16 rows of a weight whose inputs the
    tiles take (K a multiple of 32; AMX_HELPED_ROWS rows where helper threads share them): AMX;
    anything else (more rows, other sizes, float32, autograd, more threads): oneDNN's matmul."""
    taken = count_calls(monkeypatch, cpu_decode, "amx_linear")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g).bfloat16()

    def uses_amx(x, w, bias=None):
        before = taken["n"]
        got = cpu_decode.linear(x, w, bias)
        assert bf16_close(got, F.linear(x, w, bias), ulps=1)
        return taken["n"] > before

    rows = lambda n: torch.randn(n, 128, generator=g).bfloat16()  # noqa: E731
    with torch.inference_mode():
        assert not uses_amx(rows(1), w)
        assert uses_amx(rows(2), w) and uses_amx(rows(cpu_decode.AMX_MAX_ROWS), w)
        assert not uses_amx(rows(cpu_decode.AMX_MAX_ROWS + 1), w)
        assert cpu_decode.start_helpers(1) == 1
        assert uses_amx(rows(cpu_decode.AMX_HELPED_ROWS), w)
        assert not uses_amx(rows(cpu_decode.AMX_HELPED_ROWS + 1), w)
        assert cpu_decode.start_helpers(0) == 0
        assert uses_amx(rows(8), w[:60])  # 60 outputs: the last 12 from a zero-padded tile
        assert not uses_amx(rows(8)[:, :120], w[:, :120])  # 120 inputs: not a whole tile
        assert uses_amx(rows(8), w, torch.randn(64, generator=g).bfloat16())
        assert not uses_amx(rows(8), w, torch.randn(128, generator=g).bfloat16()[::2])  # a strided bias
        before = taken["n"]
        cpu_decode.linear(rows(8).float(), w.float())
        assert taken["n"] == before
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert not uses_amx(rows(8), w)
    x = rows(8).requires_grad_()
    got = cpu_decode.linear(x, w)
    assert got.requires_grad and taken["n"] == before  # autograd: torch's op


@pytest.mark.skipif(not cpu_decode._dpbf16, reason="this CPU has AMX, or no AVX512-BF16")
@pytest.mark.parametrize(
    "rows,out,inn,bias",
    [(2, 16, 256, False), (5, 48, 512, True), (8, 1040, 256, False), (17, 1024, 512, True),
     (64, 512, 1024, True), (500, 256, 2048, True), (7, 4, 256, True),  # 500 rows: passes of 64 (256 KB)
     (6, 1, 512, True), (3, 4097, 256, False), (32, 2003, 512, True)],  # outputs not a multiple of 4
)  # fmt: skip
def test_dpbf16_linear_matches_torch_and_a_row_is_the_same_in_any_step(rows, out, inn, bias):
    """bfloat16 rows through the AVX512-BF16 kernel on a CPU without AMX (decision 40; up to
    DPBF16_HELPED_ROWS where a helper thread shares the weight rows): oneDNN's result within a
    rounding, and the exact one's; x's rows a strided view, the bias added before the rounding;
    each row the same bits whatever else is in the step, and with 0, 1 or 2 helpers."""
    g = torch.Generator().manual_seed(rows * out + inn)
    wide = torch.randn(rows, inn + 32, generator=g).bfloat16()
    x = wide[:, 16 : 16 + inn]  # rows inn + 32 apart
    w = torch.randn(out, inn, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    with torch.inference_mode():
        assert cpu_decode.start_helpers(1) == 1
        assert cpu_decode.dpbf16_rows(x, w, b)
        got = cpu_decode.linear(x, w, b)
        exact = (x.double() @ w.double().T + (b.double() if bias else 0)).bfloat16()
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
        assert bf16_close(got, F.linear(x, w, b), ulps=1)
        assert bf16_close(got, exact, ulps=1)
        for part in (slice(0, 2), slice(rows - 2, rows), slice(1, rows)):  # the same rows in other steps
            assert torch.equal(cpu_decode.linear(x[part], w, b), got[part])
        batched = cpu_decode.linear(x.reshape(1, rows, inn), w, b)  # [..., in] as F.linear takes it
        assert batched.shape == (1, rows, out) and torch.equal(batched[0], got)
        if out > 1:  # an output's bits the same in a block of 4 and in the last, partial one
            fewer = cpu_decode.dpbf16_linear(x, w[: out - 1], b[: out - 1] if bias else None)
            assert torch.equal(fewer, got[:, : out - 1])
        for n in (0, 2):
            assert cpu_decode.start_helpers(n) == n
            assert torch.equal(cpu_decode.dpbf16_linear(x, w, b), got), n
        assert cpu_decode.start_helpers(0) == 0


@pytest.mark.skipif(not cpu_decode._dpbf16, reason="this CPU has AMX, or no AVX512-BF16")
def test_linear_takes_the_dpbf16_kernel_only_where_it_applies(monkeypatch):
    """One row: the streaming gemv; 2 .. DPBF16_MAX_ROWS bfloat16 rows of a weight of any number
    of outputs and inputs a multiple of 32, at least DPBF16_MIN_K: the AVX512-BF16 kernel;
    up to DPBF16_HELPED_ROWS where helper threads share the job (1 MB of weights or more, counted
    once per DPBF16_SHARE_ROWS rows) or it is small (DPBF16_SMALL_MACS); anything else: oneDNN's
    matmul. The helpers take part."""
    taken = count_calls(monkeypatch, cpu_decode, "dpbf16_linear")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g).bfloat16()  # 16K multiply-adds a row: 64 rows are "small"
    mid = torch.randn(512, 256, generator=g).bfloat16()  # 128K a row
    big = torch.randn(1024, 512, generator=g).bfloat16()  # 1 MB: shared with the helpers

    def uses_kernel(x, w, bias=None):
        before = taken["n"]
        got = cpu_decode.linear(x, w, bias)
        assert bf16_close(got, F.linear(x, w, bias), ulps=1)
        return taken["n"] > before

    rows = lambda n, k=256: torch.randn(n, k, generator=g).bfloat16()  # noqa: E731
    with torch.inference_mode():
        assert cpu_decode.start_helpers(0) == 0
        assert not uses_kernel(rows(1), w)
        assert uses_kernel(rows(2), mid) and uses_kernel(rows(cpu_decode.DPBF16_MAX_ROWS), mid)
        assert not uses_kernel(rows(cpu_decode.DPBF16_MAX_ROWS + 1), mid)
        small = cpu_decode.DPBF16_SMALL_MACS // w.numel()  # rows of w within DPBF16_SMALL_MACS
        assert uses_kernel(rows(small), w) and not uses_kernel(rows(small + 1), w)
        assert uses_kernel(rows(32, 512), torch.randn(1, 512, generator=g).bfloat16())  # Qwen2-MoE's shared expert gate
        for n in (1, 2, 3, 61, 62, 63):  # outputs not a multiple of 4: the last ones a block of their own
            assert uses_kernel(rows(8), w[:n]) and uses_kernel(rows(5), w[:n], torch.randn(n, generator=g).bfloat16())
        assert not uses_kernel(rows(8)[:, :224], w[:, :224])  # 224 inputs: fewer than DPBF16_MIN_K
        assert not uses_kernel(rows(8, 288)[:, :280], torch.randn(64, 280, generator=g).bfloat16())  # not of 32
        assert uses_kernel(rows(8), w, torch.randn(64, generator=g).bfloat16())
        before = taken["n"]
        cpu_decode.linear(rows(8).float(), w.float())
        assert taken["n"] == before  # float32: not this kernel
        assert not uses_kernel(rows(32, 512), big)  # no helpers: oneDNN's from 9 rows
        assert cpu_decode.start_helpers(1) == 1
        assert uses_kernel(rows(cpu_decode.DPBF16_HELPED_ROWS, 512), big)
        assert not uses_kernel(rows(cpu_decode.DPBF16_HELPED_ROWS + 1, 512), big)
        assert not uses_kernel(rows(32), mid)  # 256 KB: not shared, so not 32 rows
        half = torch.randn(1024, 256, generator=g).bfloat16()  # 0.5 MB: shared from 17 rows
        assert not uses_kernel(rows(cpu_decode.DPBF16_SHARE_ROWS), half)
        before = cpu_decode.helper_rows()
        assert uses_kernel(rows(cpu_decode.DPBF16_SHARE_ROWS + 1), half) and uses_kernel(rows(32), half)
        if len(os.sched_getaffinity(0)) > 1:
            for _ in range(50):  # the C shares the job too (a helper takes rows when its core is free)
                if cpu_decode.helper_rows() > before:
                    break
                cpu_decode.dpbf16_linear(rows(32), half)
            assert cpu_decode.helper_rows() > before
        assert uses_kernel(rows(32), torch.randn(4096, 256, generator=g).bfloat16())  # 2 MB of K 256
        assert not uses_kernel(rows(32, 128), torch.randn(8192, 128, generator=g).bfloat16())  # K 128
        x = rows(32, 512)
        same_bits_with_helpers(lambda: [cpu_decode.dpbf16_linear(x, big)], [cpu_decode.dpbf16_linear(x, big)])
        assert cpu_decode.start_helpers(0) == 0
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert not uses_kernel(rows(8), w)
    x = rows(8).requires_grad_()
    before = taken["n"]
    got = cpu_decode.linear(x, w)
    assert got.requires_grad and taken["n"] == before  # autograd: torch's op


@row_experts
@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate"),
    [(2, 64, 64), (7, 64, 96), (33, 128, 32), (300, 64, 64)],  # decode steps, and a prefill
)
@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3"])
def test_row_major_routed_experts_match_the_torch_code_for_any_token_count(name, tokens, hidden, intermediate, monkeypatch):
    """Where the CPU has AMX or AVX512-BF16 the engine keeps bfloat16 experts row-major (as the
    checkpoint stores them), and a layer's routed experts on any number of tokens (a decode step, a
    prefill) are one C call (moe_amx_experts, moe_dpbf16_experts): torch's output within bfloat16 roundings (the hidden activations are
    rounded once, the sum over experts kept in float32), its tokens per expert, closer to float32
    than torch's bfloat16, and a token's output the same bits whatever else is in the step."""
    experts, x, weights, ids = routed_experts_case(name, tokens, hidden=hidden, intermediate=intermediate, layout="engine")
    assert experts.gate_up_proj.is_contiguous() and experts.down_proj.is_contiguous()  # row-major
    calls = count_calls(monkeypatch, cpu_decode, "amx_routed_experts")
    with torch.inference_mode():
        got, got_counts = experts(x, weights, ids)
        assert calls["n"] == 1
        want, want_counts = Experts.forward(experts, x, weights, ids)  # the torch code
        want32 = experts_in_float32(experts, x, weights, ids)
        last = slice(tokens - 2, tokens)  # the last two tokens in a step of their own
        alone, _ = experts(x[last], weights[last], ids[last])
    assert calls["n"] == 2  # torch's forward did not call it
    assert torch.equal(got_counts, want_counts)
    assert bf16_close(got, want, ulps=6)
    assert (got.float() - want32).abs().max() <= (want.float() - want32).abs().max()
    assert torch.equal(alone, got[last])


@row_experts
def test_row_major_routed_experts_take_an_experts_tokens_in_passes_and_sum_an_expert_named_twice():
    """More choices of one expert than a pass of the kernel's scratch takes (AMX_PASS_ROWS, 512;
    DOT_PASS_ROWS, 256),
    and ids naming an expert twice for a token (what the torch code sums): every choice counted
    and summed."""
    experts, x, weights, _ = routed_experts_case("mixtral", 300, intermediate=64, layout="engine")
    ids = torch.tensor([[2, 2, 5]] * 300)  # expert 2: 600 choices
    with torch.inference_mode():
        assert cpu_decode.amx_experts(experts, x)
        got, got_counts = cpu_decode.amx_routed_experts(x, weights, ids, experts.gate_up_proj, experts.down_proj)
        want, want_counts = Experts.forward(experts, x, weights, ids)
    assert torch.equal(got_counts, want_counts) and int(got_counts[2]) == 600
    assert bf16_close(got, want, ulps=6)


@row_experts
def test_row_major_routed_experts_take_only_what_the_kernel_reads(monkeypatch):
    """One token (the batch-1 kernels' case), column-major experts (moe_experts_bf16's), sizes the
    tiles do not take, float32, more threads or autograd: not the AMX kernel."""
    experts, x, weights, ids = routed_experts_case("mixtral", 40, intermediate=64, layout="engine")
    with torch.inference_mode():
        assert cpu_decode.amx_experts(experts, x) and cpu_decode.amx_experts(experts, x[:2])
        assert not cpu_decode.amx_experts(experts, x[:1])
        assert not cpu_decode.amx_experts(experts, x.float())
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert not cpu_decode.amx_experts(experts, x)
        monkeypatch.undo()
        cpu_decode.grouped_experts_layout(experts)
        assert not cpu_decode.amx_experts(experts, x) and cpu_decode.experts_kernel(experts, x)
    # D = 80, not a whole tile: the engine keeps such a layer column-major for the FMA kernel
    odd, x, _, _ = routed_experts_case("mixtral", 4, hidden=80, intermediate=48, layout="engine")
    assert not odd.gate_up_proj.is_contiguous() and not odd.down_proj.is_contiguous()
    assert not cpu_decode.amx_experts(odd, x) and cpu_decode.experts_kernel(odd, x)
    assert not cpu_decode.amx_experts(experts, x.requires_grad_())


@row_experts
@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3"])
def test_row_major_experts_of_any_intermediate_size_are_padded_with_zeros(name):
    """An intermediate size the tiles do not take (I = 48, 200) is padded with zeros to a multiple
    of 32 when the engine lays the experts out (pad_intermediate), so moe_amx_experts takes a step
    and a prefill of such a layer too: the outputs of the unpadded layer's torch code (the padded
    units add nothing), its counts, and the one-token kernels' too."""
    for intermediate, padded in ((48, 64), (200, 224)):
        plain, x, weights, ids = routed_experts_case(name, 40, hidden=64, intermediate=intermediate, layout="none")
        experts, _, _, _ = routed_experts_case(name, 40, hidden=64, intermediate=intermediate, layout="engine")
        assert tuple(experts.down_proj.shape) == (8, 64, padded) and experts.gate_up_proj.shape[1] == 2 * padded
        assert torch.equal(experts.gate_up_proj[:, :intermediate], plain.gate_up_proj[:, :intermediate])
        assert torch.equal(experts.gate_up_proj[:, padded : padded + intermediate], plain.gate_up_proj[:, intermediate:])
        assert not experts.gate_up_proj[:, intermediate:padded].any() and not experts.down_proj[..., intermediate:].any()
        with torch.inference_mode():
            assert cpu_decode.amx_experts(experts, x)
            got, counts = experts(x, weights, ids)
            want, want_counts = Experts.forward(plain, x, weights, ids)
            padded_torch, _ = Experts.forward(experts, x, weights, ids)  # the torch code on the padded weights
            one, _ = experts(x[:1], weights[:1], ids[:1])  # one token: the batch-1 path
        assert torch.equal(counts, want_counts)
        assert bf16_close(got, want, ulps=6) and bf16_close(padded_torch, want, ulps=2)
        assert bf16_close(one, want[:1], ulps=6)


def kernels_in_a_fresh_process(env: dict[str, str], report: str) -> tuple[list[str], str]:
    """builtin:tiny-mixtral in bfloat16 with the kernels applied, in a new process (this one's
    environment and `env`), then `report` run there (Python; `experts`: its first Experts layer):
    (what that printed, split; the process's log)."""
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from model_runtime import load_model\n"
        "from model_runtime.kernels import cpu_decode\n"
        "model = load_model('builtin:tiny-mixtral', dtype=torch.bfloat16)\n"
        "assert cpu_decode.use_cpu_decode_kernels(model)\n"
        "experts = next(m for m in model.modules() if isinstance(m, cpu_decode.layers.Experts))\n"
        + report
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(), proc.stderr


@amx
@pytest.mark.parametrize("switch", ["1", "0"])
def test_the_amx_kernels_say_so_at_start_and_turn_off_with_the_switch(switch):
    """The kernels' log line names AMX where they use it; MOE_RUNTIME_AMX=0 turns the AMX kernels
    off: the CPU then runs what one with AVX512-BF16 and no AMX runs (every AMX CPU has it: the
    experts stay row-major for moe_dpbf16_experts), and with MOE_RUNTIME_DPBF16=0 too the bfloat16
    experts go column-major as on a CPU with neither."""
    show = "print('amx', cpu_decode._amx, 'dpbf16', cpu_decode._dpbf16, 'row-major', experts.gate_up_proj.is_contiguous())\n"
    printed, log = kernels_in_a_fresh_process({"MOE_RUNTIME_AMX": switch}, show)
    on = switch == "1"
    assert printed == ["amx", str(on), "dpbf16", str(not on), "row-major", "True"]
    assert ("routed experts on AMX tiles" in log) == on, log
    assert ("routed experts by AVX512-BF16 dot products" in log) == (not on), log
    if not on:
        printed, log = kernels_in_a_fresh_process({"MOE_RUNTIME_AMX": "0", "MOE_RUNTIME_DPBF16": "0"}, show)
        assert printed == ["amx", "False", "dpbf16", "False", "row-major", "False"]


dpbf16 = pytest.mark.skipif(not cpu_decode._dpbf16, reason="this CPU has AMX, or no AVX512-BF16")


@dpbf16
@pytest.mark.parametrize("switch", ["1", "0"])
def test_the_dpbf16_experts_say_so_at_start_and_turn_off_with_the_switch(switch):
    """On a CPU with AVX512-BF16 and no AMX (AMD Zen 4) the kernels' log line says the routed
    experts take its dot products, and the engine keeps bfloat16 experts row-major for them;
    MOE_RUNTIME_DPBF16=0 turns that off (column-major, for moe_experts_bf16 and torch)."""
    printed, log = kernels_in_a_fresh_process(
        {"MOE_RUNTIME_DPBF16": switch},
        "x = torch.randn(4, experts.gate_up_proj.shape[-1]).bfloat16()\n"
        "torch.set_num_threads(1)  # as the server runs on 2 cores\n"
        "print('dpbf16', cpu_decode._dpbf16, 'row-major', experts.gate_up_proj.is_contiguous(),\n"
        "      'takes', cpu_decode.amx_experts(experts, x))\n",
    )
    on = str(switch == "1")
    assert printed == ["dpbf16", on, "row-major", on, "takes", on]
    assert ("routed experts by AVX512-BF16 dot products" in log) == (switch == "1"), log


@dpbf16
@pytest.mark.parametrize(("hidden", "intermediate"), [(256, 256), (1024, 96)])
def test_helper_threads_share_the_dpbf16_experts_and_give_the_same_bits(hidden, intermediate):
    """moe_dpbf16_experts' experts are the helper threads' jobs, each choice its own float32 row
    summed in choice order: the same bits with 0, 1 or 2 helpers, for a decode step and a prefill
    (an expert's tokens in passes of DOT_PASS_ROWS), close to torch's code; the helpers take part."""
    steps = [routed_experts_case("deepseek-v3", n, hidden=hidden, intermediate=intermediate, layout="engine")
             for n in (48, 700)]  # fmt: skip
    experts = steps[0][0]

    def run() -> list[torch.Tensor]:
        return [cpu_decode.amx_routed_experts(x, w, ids, experts.gate_up_proj, experts.down_proj)[0]
                for _, x, w, ids in steps]  # fmt: skip

    with torch.inference_mode():
        assert all(cpu_decode.amx_experts(experts, x) for _, x, _, _ in steps)
        assert cpu_decode.start_helpers(0) == 0
        alone = run()
        for (_, x, w, ids), got in zip(steps, alone, strict=True):
            assert bf16_close(got, Experts.forward(experts, x, w, ids)[0], ulps=6)
        same_bits_with_helpers(run, alone, what="expert")
        assert cpu_decode.start_helpers(0) == 0


def bf16_valued(module: torch.nn.Module) -> torch.nn.Module:
    """module in float32 with every parameter a bfloat16 value: a bfloat16 checkpoint loaded as
    float32 (Mixtral's, DeepSeek's and Qwen's are published in bfloat16)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return module


def moe_with_kernels(cfg: ModelConfig, narrow: bool, monkeypatch) -> MoE:
    moe = bf16_valued(random_(MoE(cfg), 6))
    with monkeypatch.context() as patched:
        patched.setattr(cpu_decode, "_amx", False)
        patched.setenv("MOE_RUNTIME_NARROW_WEIGHTS", "1" if narrow else "0")
        assert use_cpu_decode_kernels(moe)
    return moe


@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3"])
def test_float32_experts_kept_as_bfloat16_compute_the_float32_sums(name, monkeypatch):
    """A float32 layer whose expert weights are bfloat16 values keeps them as bfloat16
    (narrow_experts: half the bytes a decode step reads) and computes what the float32 experts
    compute: for 2-64 tokens moe_experts_f32's very bits, for more than NARROW_MAX_TOKENS (a long
    prefill: each expert widened for MKL) the torch code's, for one token (the batch-1 MoE kernel)
    the float32 kernel's, and in between within float32 rounding. Weights that are not bfloat16
    values stay float32."""
    if not cpu_decode.available():
        pytest.skip("the CPU kernels are not available here")
    cfg = ModelConfig(hidden_size=64, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, **ROUTERS[name])
    narrow, wide = moe_with_kernels(cfg, True, monkeypatch), moe_with_kernels(cfg, False, monkeypatch)
    assert narrow.experts.gate_up_proj.dtype == narrow.experts.down_proj.dtype == torch.bfloat16
    assert narrow.experts.compute_dtype is torch.float32 and wide.experts.compute_dtype is None
    assert wide.experts.gate_up_proj.dtype == torch.float32
    assert torch.equal(narrow.experts.gate_up_proj.float(), wide.experts.gate_up_proj)  # the same values
    calls = count_calls(monkeypatch, cpu_decode, "routed_experts")
    most = cpu_decode.NARROW_MAX_TOKENS
    for tokens in (2, 9, cpu_decode.EXPERTS_MAX_TOKENS, cpu_decode.EXPERTS_MAX_TOKENS + 1, most, most + 1):
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
        with torch.inference_mode():
            weights, ids = narrow.gate(x)
            calls["n"] = 0
            got, got_counts = narrow.experts(x, weights, ids)
            assert calls["n"] == (1 if tokens <= most else 0), tokens
            want, want_counts = wide.experts(x, weights, ids)
        assert torch.equal(got_counts, want_counts)
        if tokens <= cpu_decode.EXPERTS_MAX_TOKENS or tokens > most:
            assert torch.equal(got, want), tokens  # the same kernel (or MKL) on the same values
        else:
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)  # as the float32 kernel test
        assert not torch.allclose(got, want.roll(1, 0), atol=1e-2)
    with torch.inference_mode():  # one token: the MoE kernel reads the bfloat16 experts in place
        for i in range(8):
            x = torch.randn(1, 64, generator=torch.Generator().manual_seed(100 + i))
            assert torch.equal(narrow(x), wide(x))
    assert narrow.decode is not None and torch.equal(narrow.tokens_per_expert, wide.tokens_per_expert)

    moe = random_(MoE(cfg), 6)  # float32 values: nothing to narrow
    assert use_cpu_decode_kernels(moe) and moe.experts.gate_up_proj.dtype == torch.float32


@pytest.mark.parametrize("builtin", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_a_bfloat16_valued_float32_model_decodes_the_same_with_its_experts_kept_as_bfloat16(builtin, monkeypatch):
    """The engine on a float32 model of bfloat16 values: the experts, the output head, the attention
    projections (GQA's, MLA's) and the SwiGLU MLPs (DeepSeek's dense layer and shared experts) kept
    as bfloat16 (the layer kernels still take a token's layer; norms float32) give the same greedy
    tokens, one sequence or several a step, as the float32 weights."""
    if not cpu_decode.available():
        pytest.skip("the CPU kernels are not available here")

    def greedy(narrow: bool) -> list[list[int]]:
        monkeypatch.setenv("MOE_RUNTIME_NARROW_WEIGHTS", "1" if narrow else "0")
        model = bf16_valued(load_model(f"builtin:{builtin}", dtype=torch.float32).eval())
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=3, num_kv_blocks=64, block_size=4))
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert experts and all((m.gate_up_proj.dtype == torch.bfloat16) == narrow for m in experts)
        linears = not cpu_decode._avx512 and narrow  # the head and attention: where moe_linear_f32 runs
        assert (model.lm_head.weight.dtype == torch.bfloat16) == (linears and not model.config.tie_word_embeddings)
        attention = [m for m in model.modules() if isinstance(m, Attention | MLAttention)]
        assert attention and all((m.o_proj.weight.dtype == torch.bfloat16) == linears for m in attention)
        kernel = cpu_decode.MLAttention if model.config.attention == "mla" else cpu_decode.GQAttention
        assert all(type(m.decode) is kernel and m.decode.dtype == torch.float32 for m in attention)
        mlps = [m for m in model.modules() if isinstance(m, MLP)]
        assert all((m.down_proj.weight.dtype == torch.bfloat16) == linears for m in mlps)
        assert all(type(m.decode) is cpu_decode.SwiGLU and m.decode.dtype == torch.float32 for m in mlps)
        if builtin == "tiny-deepseek-v3":  # a dense first layer and a shared expert in each MoE layer
            assert len(mlps) == 3
            assert all(type(m.decode) is cpu_decode.MoE for m in model.modules() if isinstance(m, MoE))
        for r, prompt in enumerate([list(range(3, 40)), list(range(50, 61)), list(range(7, 30))]):
            params = SamplingParams(max_tokens=16 + 4 * r, temperature=0, ignore_eos=True)
            engine.add_request(f"r{r}", prompt, params)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return [tokens[f"r{r}"] for r in range(3)]

    narrow = greedy(True)
    assert [len(t) for t in narrow] == [16, 20, 24]
    assert narrow == greedy(False)


@pytest.mark.parametrize("rows", [1, 2, 3, 17, 32, cpu_decode.F32_MAX_ROWS, cpu_decode.F32_MAX_ROWS + 1])
def test_a_float32_head_kept_as_bfloat16_gives_the_float32_logits(rows, monkeypatch):
    """The output head of a float32 model of bfloat16 values is kept as bfloat16 (narrow_linears): one
    row through the gemv, a step's rows through moe_linear_f32_bf16w (called directly too: it runs
    on any AVX2 CPU), more rows through MKL on the widened weight; each gives what the float32
    weight gives, the same bits where the float32 path runs the same loop."""
    if not cpu_decode.available():
        pytest.skip("the CPU kernels are not available here")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1030, 256, generator=g).to(torch.bfloat16)  # 1030 outputs: a partial tile of W rows
    x = torch.randn(rows, 256, generator=g)
    with torch.inference_mode():
        got = cpu_decode.linear(x, w)
        want = cpu_decode.linear(x, w.float())
        assert got.dtype == torch.float32 and got.shape == (rows, 1030)
        if rows == 1 and cpu_decode._avx512:  # its bfloat16 gemv sums 16 lanes, the float32 one 8
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want)
        if 2 <= rows <= cpu_decode.F32_MAX_ROWS:
            direct = cpu_decode.rows_linear(cpu_decode._lib.moe_linear_f32_bf16w, x, w, None)
            assert torch.equal(direct, cpu_decode.f32_linear(x, w.float()))
            assert torch.equal(cpu_decode.rows_linear(cpu_decode._lib.moe_linear_f32_bf16w, x[1:], w, None), direct[1:])


def test_narrow_linears_keeps_only_an_untied_bfloat16_valued_head(monkeypatch):
    """narrow_linears takes the head where it is exact and read by the kernels: not a head of float32
    values, not one tied to the embedding, not with MOE_RUNTIME_NARROW_WEIGHTS=0, not on AVX-512
    CPUs (MKL takes their float32 rows)."""
    if not cpu_decode.available():
        pytest.skip("the CPU kernels are not available here")
    monkeypatch.setattr(cpu_decode, "_avx512", False)

    def model(tied: bool = False, values: str = "bf16") -> torch.nn.Module:
        m = torch.nn.Module()
        m.embed_tokens = torch.nn.Embedding(64, 32)
        m.lm_head = torch.nn.Linear(32, 64, bias=False)
        if tied:
            m.lm_head.weight = m.embed_tokens.weight
        return bf16_valued(m) if values == "bf16" else m

    m = model()
    assert cpu_decode.narrow_linears(m) == 1 and m.lm_head.weight.dtype == torch.bfloat16
    x = torch.randn(3, 32)
    with torch.inference_mode():
        assert torch.equal(cpu_decode.linear(x, m.lm_head.weight), cpu_decode.linear(x, m.lm_head.weight.float()))
    assert not cpu_decode.narrow_linears(model(values="float32"))
    assert not cpu_decode.narrow_linears(model(tied=True))
    monkeypatch.setenv("MOE_RUNTIME_NARROW_WEIGHTS", "0")
    assert not cpu_decode.narrow_linears(model())
    monkeypatch.delenv("MOE_RUNTIME_NARROW_WEIGHTS")
    monkeypatch.setattr(cpu_decode, "_avx512", True)
    assert not cpu_decode.narrow_linears(model())


def helper_cases() -> list[tuple[str, torch.nn.Module, list[torch.Tensor]]]:
    """Layers whose matrices are large enough (>= 1 MB a job) for the helpers to share, with inputs."""
    g = torch.Generator().manual_seed(21)
    dense = random_(MLP(256, 1024, "silu"), 3)  # SwiGLU: gate / up rows, then down rows
    head = torch.nn.Linear(256, 2000, bias=False)  # a gemv's rows
    head_bf = torch.nn.Linear(256, 4096, bias=False).bfloat16()
    moe = random_(MoE(ModelConfig(hidden_size=256, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=256,
                                  **dict(ROUTERS["deepseek-v3"], shared_expert_intermediate_size=256))), 7)  # fmt: skip
    mla = random_(MLAttention(ModelConfig(
        architecture="DeepseekV3ForCausalLM", attention="mla", hidden_size=512, num_attention_heads=8,
        q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=16, v_head_dim=64,
    )), 8)  # fmt: skip
    for layer in (dense, head, head_bf, moe, mla):
        assert use_cpu_decode_kernels(layer)
    assert not moe.experts.gate_up_proj.is_contiguous()  # float32 experts column-major: an expert per thread
    cases = [("swiglu", dense, 256), ("gemv", head, 256), ("bf16 gemv", head_bf, 256), ("moe", moe, 256)]
    out = [(name, layer, [torch.randn(1, d, generator=g).to(layer.weight.dtype if name == "bf16 gemv" else
                                                             torch.float32) for _ in range(6)])
           for name, layer, d in cases]  # fmt: skip
    return out + [("mla", mla, [torch.randn(1, 512, generator=g) for _ in range(6)])]


def run_layer(name: str, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if name != "mla":
        return layer(x)
    g = torch.Generator().manual_seed(9)
    cache = torch.randn(8 * DECODE_BLOCK, 64 + 16, generator=g)
    angle = torch.randn(1, 8, generator=g)
    out = layer(x, angle.cos(), angle.sin(), one_decode_context(None), cache)
    return torch.cat([out.flatten(), cache.flatten()])


def same_bits_with_helpers(run, alone: list[torch.Tensor], counts=(1, 2, 1), what: str = "row") -> None:
    """run() gives `alone`'s bits with each number of helper threads in `counts`, and the helpers
    do take part (where the process has a second core)."""
    for n in counts:
        assert cpu_decode.start_helpers(n) == n
        before = cpu_decode.helper_rows()
        for _ in range(20):
            assert all(torch.equal(got, want) for got, want in zip(run(), alone, strict=True)), n
            if cpu_decode.helper_rows() > before:
                break
        if len(os.sched_getaffinity(0)) > 1:
            assert cpu_decode.helper_rows() > before, f"{n} helper(s) never took a {what}"


def greedy_tokens(
    model, prompts: list[list[int]], helpers: int | None = None, max_tokens: int = 12, num_kv_blocks: int = 128
) -> tuple[list[list[int]], int]:
    """The greedy tokens an engine streams for each prompt (with `helpers` helper threads, or as
    they run), and how many rows the helpers took meanwhile. `model`: a model, or a function
    making one."""
    if helpers is not None:
        assert cpu_decode.start_helpers(helpers) == helpers
    before = cpu_decode.helper_rows()
    engine = LLMEngine(model() if callable(model) and not isinstance(model, torch.nn.Module) else model, None,
                       EngineConfig(max_num_seqs=4, num_kv_blocks=num_kv_blocks))  # fmt: skip
    for r, prompt in enumerate(prompts):
        engine.add_request(f"r{r}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[f"r{r}"] for r in range(len(prompts))], cpu_decode.helper_rows() - before


@row_experts
def test_row_major_routed_experts_take_a_long_prefill_in_rounds_with_every_token_as_alone():
    """The kernel keeps each choice's output row (float32) until a token's are summed, at most
    AMX_EXPERTS_BYTES (32 MB) of them at a time: a prefill of more tokens goes in rounds, every
    token counted, close to torch, and each token's output the bits it has in a step of its own."""
    experts, x, weights, ids = routed_experts_case("mixtral", 45000, hidden=64, intermediate=32, layout="engine")
    assert 45000 * 3 * 64 * 4 > 32 << 20  # two rounds
    with torch.inference_mode():
        got, counts = cpu_decode.amx_routed_experts(x, weights, ids, experts.gate_up_proj, experts.down_proj)
        want, want_counts = Experts.forward(experts, x, weights, ids)
        for rows in (slice(0, 2), slice(43685, 43700), slice(44998, 45000)):  # across the rounds' border
            alone, _ = cpu_decode.amx_routed_experts(x[rows], weights[rows], ids[rows], experts.gate_up_proj,
                                                     experts.down_proj)  # fmt: skip
            assert torch.equal(alone, got[rows])
    assert torch.equal(counts, want_counts) and int(counts.sum()) == 45000 * 3
    assert bf16_close(got, want, ulps=6)


@amx
def test_helper_threads_share_the_amx_kernels_and_give_the_same_bits():
    """Where the CPU has AMX (decision 38), a step of several bfloat16 sequences shares its
    matrices with the helper threads too: moe_amx_linear's weight rows, 32 at a time, and
    moe_amx_experts' experts, each choice its own output row summed in choice order. The same
    bits with 0, 1 or 2 helpers, and the helpers do take part."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 512, generator=g).bfloat16()
    w = (torch.randn(1568, 512, generator=g) / 20).bfloat16()  # 1.5 MB, not a whole number of 32-row chunks
    bias = torch.randn(1568, generator=g).bfloat16()
    experts, xe, weights, ids = routed_experts_case("deepseek-v3", 48, hidden=256, intermediate=256, layout="engine")

    def run() -> list[torch.Tensor]:
        return [
            cpu_decode.amx_linear(x, w, bias),
            cpu_decode.amx_routed_experts(xe, weights, ids, experts.gate_up_proj, experts.down_proj)[0],
        ]

    with torch.inference_mode():
        assert cpu_decode.amx_rows(x, w, bias) and cpu_decode.amx_experts(experts, xe)
        assert cpu_decode.start_helpers(0) == 0
        alone = run()
        assert bf16_close(alone[0], F.linear(x, w, bias), ulps=1)
        assert bf16_close(alone[1], Experts.forward(experts, xe, weights, ids)[0], ulps=6)
        same_bits_with_helpers(run, alone)


def test_helper_threads_share_a_one_token_step_and_give_the_same_bits():
    """With helper threads (decision 36) the one-row kernels split each large matrix's rows (a
    routed expert per thread where the experts are stored transposed) and give the bits they give
    alone; the helpers do take part (their count of rows grows); stopping and restarting them
    is clean."""
    cases = helper_cases()
    with torch.inference_mode():
        assert cpu_decode.start_helpers(0) == 0
        alone = {name: [run_layer(name, layer, x) for x in xs] for name, layer, xs in cases}
        for n in (1, 2, 1):
            assert cpu_decode.start_helpers(n) == n
            before = cpu_decode.helper_rows()
            for _ in range(20):
                for name, layer, xs in cases:
                    for x, want in zip(xs, alone[name], strict=True):
                        assert torch.equal(run_layer(name, layer, x), want), (name, n)
                if cpu_decode.helper_rows() > before:
                    break
            if len(os.sched_getaffinity(0)) > 1:
                assert cpu_decode.helper_rows() > before, f"{n} helper(s) never took a row"
        assert cpu_decode.start_helpers(0) == 0
        for name, layer, xs in cases:
            assert all(torch.equal(run_layer(name, layer, x), w) for x, w in zip(xs, alone[name], strict=True))


def test_helper_count_comes_from_the_cores_or_the_environment(monkeypatch):
    monkeypatch.delenv("MOE_RUNTIME_DECODE_HELPERS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_decode.default_helpers() == 1  # the core the server leaves to its event loop
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cpu_decode.default_helpers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 15)  # torch's threads: the kernels do not run
    assert cpu_decode.default_helpers() == 0
    monkeypatch.setenv("MOE_RUNTIME_DECODE_HELPERS", "3")
    assert cpu_decode.default_helpers() == 3
    monkeypatch.setenv("MOE_RUNTIME_DECODE_HELPERS", "two")
    with pytest.raises(ValueError, match="MOE_RUNTIME_DECODE_HELPERS.*'two'"):
        cpu_decode.default_helpers()


def test_helper_threads_share_a_step_of_several_rows_and_give_the_same_bits():
    """A step of several sequences: moe_linear_f32 (float32 or bfloat16 weights) splits W's rows
    among the threads, moe_experts_f32 gives each thread whole experts (each choice its own output
    row, a token's rows summed in choice order). The same bits with 0, 1 or 2 helpers, a token's
    experts' output the same alone as among 31 others, and the helpers do take part."""
    if not cpu_decode.available():
        pytest.skip("the CPU kernels are not available here")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 512, generator=g)
    w = torch.randn(1536, 512, generator=g) / 20  # 3 MB float32, 1.5 MB bfloat16: a job the helpers share
    w_bf, bias = w.bfloat16(), torch.randn(1536, generator=g)
    experts, xe, weights, ids = routed_experts_case("deepseek-v3", 32, hidden=256, intermediate=256, dtype=torch.float32)
    narrow = [experts.gate_up_proj.bfloat16(), experts.down_proj.bfloat16()]  # the strides kept (column-major)

    def run() -> list[torch.Tensor]:
        return [
            cpu_decode.rows_linear(cpu_decode._lib.moe_linear_f32, x, w, bias),
            cpu_decode.rows_linear(cpu_decode._lib.moe_linear_f32_bf16w, x, w_bf, None),
            cpu_decode.routed_experts(xe, weights, ids, experts.gate_up_proj, experts.down_proj)[0],
            cpu_decode.routed_experts(xe, weights, ids, *narrow)[0],
        ]

    with torch.inference_mode():
        assert cpu_decode.start_helpers(0) == 0
        alone = run()
        torch.testing.assert_close(alone[0], torch.nn.functional.linear(x, w, bias), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(alone[1], torch.nn.functional.linear(x, w_bf.float()), atol=1e-4, rtol=1e-4)
        want, _ = Experts.forward(experts, xe, weights, ids)
        torch.testing.assert_close(alone[2], want, atol=1e-3, rtol=1e-4)  # as the float32 kernel test
        for t in (0, 17):  # one token's experts computed alone: the same bits
            one = cpu_decode.routed_experts(xe[t : t + 1], weights[t : t + 1], ids[t : t + 1], *narrow)[0]
            assert torch.equal(one[0], alone[3][t])
        same_bits_with_helpers(run, alone)


def test_with_helper_threads_a_prefill_takes_the_float32_kernels_with_each_row_as_in_a_decode_step(monkeypatch):
    """With helper threads running (decision 37), a prefill's float32 rows take the rows kernels
    too, 64 rows of a linear at a time and the experts a chunk of tokens a call, rather than MKL
    on torch's one thread: each row's result is the bits it has in a step of a few rows (or
    alone), and close to torch's. Without helpers, or for matrices too small to share (under 1 MB),
    the long prefill keeps MKL."""
    if not cpu_decode.available() or cpu_decode._avx512:
        pytest.skip("the float32 rows kernels take steps only on CPUs without AVX-512")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 256, generator=g)
    w = (torch.randn(2080, 256, generator=g) / 16).bfloat16()  # a float32 model's weight kept as bfloat16, 1 MB
    experts, xe, weights, ids = routed_experts_case("mixtral", 300, hidden=128, intermediate=256, dtype=torch.float32)
    small, _, _, _ = routed_experts_case("mixtral", 300, hidden=64, intermediate=48, dtype=torch.float32)
    linears = count_calls(monkeypatch, cpu_decode, "rows_linear")
    routed = count_calls(monkeypatch, cpu_decode, "routed_experts")
    with torch.inference_mode():
        cpu_decode.start_helpers(0)
        assert not cpu_decode.f32_rows(x, w, None, weight=torch.bfloat16)
        assert not cpu_decode.experts_kernel(experts, xe)
        assert cpu_decode.start_helpers(1) == 1
        assert cpu_decode.f32_rows(x, w, None, weight=torch.bfloat16) and cpu_decode.experts_kernel(experts, xe)
        assert not cpu_decode.f32_rows(x, w[:1000], None, weight=torch.bfloat16)  # 0.5 MB: one thread's, MKL's
        assert not cpu_decode.experts_kernel(small, xe[:, :64])  # 8 experts of 64 x 48: 0.3 MB
        got = cpu_decode.linear(x, w)
        assert linears["n"] == 1
        monkeypatch.setattr(cpu_decode, "EXPERTS_SCRATCH_BYTES", 4 * 3 * (128 + 512) * 70)  # chunks of 70 tokens
        assert cpu_decode.experts_chunk(3, 128, 256) == 70
        got_e, counts = experts(xe, weights, ids)
        assert routed["n"] == 1
        want_e, want_counts = Experts.forward(experts, xe, weights, ids)  # the torch code (helpers don't matter)
        for rows in (slice(0, 3), slice(64, 96), slice(298, 300)):  # rows in a step of their own
            assert torch.equal(cpu_decode.linear(x[rows], w), got[rows])
            assert torch.equal(cpu_decode.routed_experts(xe[rows], weights[rows], ids[rows],
                                                         experts.gate_up_proj, experts.down_proj)[0], got_e[rows])  # fmt: skip
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w.float()), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_e, want_e, atol=1e-3, rtol=1e-4)
    assert torch.equal(counts, want_counts) and int(counts.sum()) == 300 * 3


def test_an_engine_with_helper_threads_streams_the_tokens_it_streams_without_them():
    """What a client sees (decisions 36, 37): a float32 model large enough for the helpers to share
    its matrices (a 4 MB head, 1.5 MB experts a layer) gives the same greedy tokens with 1 and 2
    helpers, prompts of 150 tokens (a prefill through the rows kernels) and a step of several
    sequences included, and the same as with none where every step stays within the rows kernels'
    sizes alone (prompts of 60 tokens in all); the helpers do take rows."""
    if not cpu_decode.available() or cpu_decode._avx512:
        pytest.skip("the float32 rows kernels take steps only on CPUs without AVX-512")
    cfg = dataclasses.replace(
        ModelConfig.from_name("tiny-mixtral"), hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
        vocab_size=4096,
    )  # fmt: skip

    def greedy(helpers: int, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        return greedy_tokens(lambda: random_model(cfg, seed=4), prompts, helpers)

    with torch.inference_mode():
        short = [list(range(3, 23)), list(range(100, 115)), list(range(400, 425))]  # 60 rows in all
        long = [list(range(3, 153)), list(range(1000, 1150))]
        alone, _ = greedy(0, short)
        assert [len(t) for t in alone] == [12, 12, 12]
        one, took = greedy(1, short)
        assert one == alone
        if len(os.sched_getaffinity(0)) > 1:
            assert took > 0, "the helper never took a row"
        assert greedy(1, long)[0] == greedy(2, long)[0]
        assert greedy(1, long)[0] != greedy(1, [p[::-1] for p in long])[0]  # the tokens do depend on the prompts


@row_experts
def test_an_engine_on_amx_streams_the_same_tokens_with_and_without_helper_threads():
    """What a client sees on an AMX CPU (decision 38), or one with AVX512-BF16 (decision 40): a
    bfloat16 model whose head (2 MB, on AMX) and routed experts the helpers share gives the same
    greedy tokens with 0, 1 and 2 helpers, for short prompts in steps of several sequences and for
    150-token prompts (a prefill's experts through moe_amx_experts / moe_dpbf16_experts); the
    helpers do take rows."""
    cfg = dataclasses.replace(
        ModelConfig.from_name("tiny-mixtral"), hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
        vocab_size=4096,
    )  # fmt: skip
    model = random_model(cfg, seed=5).to(torch.bfloat16)

    def greedy(helpers: int, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        return greedy_tokens(model, prompts, helpers)

    with torch.inference_mode():
        short = [list(range(3, 23)), list(range(100, 115)), list(range(400, 425))]
        long = [list(range(3, 153)), list(range(1000, 1150))]
        for prompts in (short, long):
            alone, _ = greedy(0, prompts)
            assert all(len(t) == 12 for t in alone)
            for n in (1, 2):
                got, took = greedy(n, prompts)
                assert got == alone, (n, len(prompts[0]))
                if len(os.sched_getaffinity(0)) > 1:
                    assert took > 0, "the helpers never took a row"
        assert greedy(1, long)[0] != greedy(1, [p[::-1] for p in long])[0]  # the tokens do depend on the prompts


@amx
def test_amx_heads_match_torchs_bmm_and_a_row_is_the_same_in_any_step():
    """moe_amx_heads (MLA's absorbed per-head products on AMX tiles): each head's x @ w^T as the
    float32 sum rounded once (torch's bmm within an ulp), x a strided view as the layer passes it,
    more rows than one pass (64) takes; a row's bits the same whatever else is in the step and
    with 0, 1 or 2 helper threads (the heads shared)."""
    g = torch.Generator().manual_seed(11)
    H, M, K, N = 16, 70, 64, 512
    q = torch.randn(M, H, K + 32, generator=g).bfloat16()  # [N, H, P + R] as the layer holds it
    x = q[..., :K].transpose(0, 1)  # [H, M, K], rows strided
    w = (torch.randn(H, N, K, generator=g) / 8).bfloat16()  # 1 MB: the helpers share it
    assert cpu_decode.amx_heads_apply(x, N)
    with torch.inference_mode():
        cpu_decode.start_helpers(0)
        got = cpu_decode.amx_heads(x, w, torch.empty(H, M, N, dtype=torch.bfloat16))
        exact = torch.bmm(x.double(), w.double().transpose(1, 2)).bfloat16()
        assert bf16_close(got, exact, ulps=1) and bf16_close(got, torch.bmm(x, w.transpose(1, 2)), ulps=1)
        for part in (slice(0, 1), slice(5, 37), slice(64, 70)):
            alone = cpu_decode.amx_heads(x[:, part], w, torch.empty(H, part.stop - part.start, N, dtype=torch.bfloat16))
            assert torch.equal(alone, got[:, part])
        out = torch.empty(M, H, N, dtype=torch.bfloat16)  # written through a transposed view
        cpu_decode.amx_heads(x, w, out.transpose(0, 1))
        assert torch.equal(out.transpose(0, 1), got)
        same_bits_with_helpers(
            lambda: [cpu_decode.amx_heads(x, w, torch.full((H, M, N), float("nan")).bfloat16())], [got], (1, 2), "head"
        )
    assert not cpu_decode.amx_heads_apply(x.float(), N) and not cpu_decode.amx_heads_apply(x[..., :48], N)
    assert not cpu_decode.amx_heads_apply(x, 40)


@amx
def test_an_mla_decode_step_of_several_sequences_takes_the_absorbed_products_on_amx(monkeypatch):
    """A DeepSeek-style layer's absorbed products (the queries into the latent space, the latent
    output back through W_uv) on AMX tiles: torch's bmm's results within an ulp, and o_proj's
    within bfloat16 roundings; an engine's decode steps of several sequences take them in every
    layer, and none without AMX."""
    cfg = dataclasses.replace(
        ModelConfig.from_name("tiny-deepseek-v3"), hidden_size=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=32, v_head_dim=32, vocab_size=512,
    )  # fmt: skip
    attn = random_(MLAttention(cfg), 7).bfloat16()
    assert use_cpu_decode_kernels(attn) and type(attn) is cpu_decode.DecodeMLAttention
    g = torch.Generator().manual_seed(2)
    H, P, C = attn.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    q = torch.randn(9, H, P + cfg.qk_rope_head_dim, generator=g).bfloat16()
    latent = torch.randn(9, H, C + 32, generator=g).bfloat16()[..., :C].transpose(0, 1)  # [H, N, C], strided
    calls = count_calls(monkeypatch, cpu_decode, "amx_heads")
    with torch.inference_mode():
        got_q, got_o = attn.latent_queries(q[..., :P]), attn.absorbed_output(latent)
        assert calls["n"] == 2
        want_q = MLAttention.latent_queries(attn, q[..., :P])  # the torch code (bmm)
        want_o = MLAttention.absorbed_output(attn, latent)
    assert bf16_close(got_q, want_q, ulps=1) and bf16_close(got_o, want_o, ulps=4)

    model = random_model(cfg, seed=3).to(torch.bfloat16)

    def greedy() -> list[list[int]]:
        prompts = [list(range(3, 20)), list(range(40, 52)), list(range(100, 130))]
        return greedy_tokens(model, prompts, max_tokens=10, num_kv_blocks=64)[0]

    with torch.inference_mode():
        before = calls["n"]
        assert all(len(t) == 10 for t in greedy())
        assert calls["n"] - before >= 2 * cfg.num_hidden_layers * 9  # both products, every layer, 9 steps of 3
        monkeypatch.setattr(cpu_decode, "_amx", False)
        before = calls["n"]
        greedy()
        assert calls["n"] == before  # without AMX: torch's bmm
