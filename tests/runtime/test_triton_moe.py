"""The GPU's FP8 routed experts (kernels/triton_moe.py, a Triton grouped GEMM on the FP8 weights
in place) against Fp8Experts' own per-expert loop (dequantize, then matmul), on the CPU under
Triton's interpreter (in a child pytest, as tests/runtime/test_triton_attention.py does); the
device-side sort (`align`) on its own; and the kernel compiled ahead of time for sm_80 / sm_90."""

import types

import child_pytest
import pytest
import torch
import torch.nn.functional as F
from test_fp8 import checkpoints  # noqa: F401 (the module-scoped fixture: FP8 and dequantized checkpoints)

from model_runtime.kernels import triton_attention, triton_moe
from model_runtime.kernels.fp8 import Fp8Experts, quantize
from model_runtime.models.loading import load_model

pytestmark = [
    pytest.mark.runtime,
    pytest.mark.skipif(not triton_attention.available(), reason="Triton does not import here"),
]

INTERPRETED = triton_attention.interpreting()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the child pytest under TRITON_INTERPRET=1")
PARENT = "the parent pytest's: Triton compiling, not interpreting"
parent = pytest.mark.skipif(INTERPRETED, reason=PARENT)


@parent
def test_the_kernel_passes_its_tests_under_tritons_interpreter(tmp_path):
    passed, skipped = child_pytest.run([__file__], {"TRITON_INTERPRET": "1"}, tmp_path / "report.xml", timeout=600)
    assert skipped and all(PARENT in why for why in skipped.values()), skipped  # only the parent's
    assert len(passed) >= 17, passed


def fp8_experts(E, D, I, block, first=0, local=None, seed=0):  # noqa: E741 (legend)
    """Fp8Experts of `local` (all E by default) experts from `first`, random weights quantized."""
    local = local or E
    gen = torch.Generator().manual_seed(seed)
    plain = types.SimpleNamespace(act=F.silu, num_experts=E, first_expert=first, num_local_experts=local,
                                  gate_up_proj=torch.empty(local, 2 * I, D))  # fmt: skip
    experts = Fp8Experts(plain, block)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name)
            q, s = [], []
            for _ in range(local):
                rows = w.shape[1]
                if name == "gate_up_proj":  # gate's and up's scales apart, as the checkpoint has them
                    parts = [quantize(torch.randn(I, D, generator=gen) * 0.1, block) for _ in range(2)]
                    q.append(torch.cat([p[0] for p in parts]))
                    s.append(torch.cat([p[1] for p in parts]))
                else:
                    qe, se = quantize(torch.randn(rows, w.shape[2], generator=gen) * 0.1, block)
                    q.append(qe)
                    s.append(se)
            setattr(experts, name, torch.nn.Parameter(torch.stack(q), requires_grad=False))
            setattr(experts, f"{name}_scale_inv", torch.nn.Parameter(torch.stack(s).contiguous(), requires_grad=False))
    return experts


def routing(N, A, E, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:A] for _ in range(N)])
    weights = torch.rand(N, A, generator=gen).softmax(-1)
    return weights, ids


def test_align_sorts_each_experts_assignments_into_whole_blocks():
    """align(): every local assignment once, in its expert's run of whole blocks, in order; the
    padding and the other ranks' assignments nowhere; each block named by its expert."""
    weights, ids = routing(13, 3, 8, seed=1)
    ids[0] = torch.tensor([0, 1, 2])  # experts 2.. on this rank: some assignments are others'
    sorted_ids, block_expert, local = triton_moe.align(ids, first=2, experts=4, block_m=4)
    flat = ids.reshape(-1)
    assert local.tolist() == [2 <= e < 6 for e in flat.tolist()]
    n = flat.numel()
    blocks = sorted_ids.view(-1, 4)
    seen = []
    for b, row in enumerate(blocks.tolist()):
        real = [i for i in row if i < n]
        if block_expert[b] < 4:
            assert all(flat[i] - 2 == block_expert[b] for i in real)
            assert real == sorted(real) and row[: len(real)] == real  # padding after, in order
        else:
            assert not real
        seen += real
    assert sorted(seen) == [i for i in range(n) if local[i]]
    assert block_expert.tolist() == sorted(block_expert.tolist())


@interpreted
@pytest.mark.parametrize("bits", [False, True])  # FP8 converted natively (sm_89+), or from its bytes (A100)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "choices"), [(1, 2), (5, 3), (40, 4)])
def test_fp8_experts_match_the_per_expert_loop(tokens, choices, dtype, bits):
    experts = fp8_experts(E=8, D=64, I=32, block=(16, 32))
    weights, ids = routing(tokens, choices, 8, seed=tokens)
    x = (torch.randn(tokens, 64, generator=torch.Generator().manual_seed(2))).to(dtype)
    assert experts.grouped(x)
    counts = torch.bincount(ids.reshape(-1), minlength=8)
    got = triton_moe.fp8_experts(experts, x, weights, ids, bits=bits)
    want = experts.looped_forward(x, weights, ids, counts)
    assert got.dtype == dtype and got.shape == (tokens, 64)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(experts(x, weights, ids)[0], triton_moe.fp8_experts(experts, x, weights, ids, bits=False))


@interpreted
def test_fp8_bytes_decode_to_every_e4m3fn_value():
    """The byte decode (before sm_89) gives each of the 254 finite e4m3fn values exactly, subnormals
    and both zeros included: a weight matrix of every byte times an identity's rows."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # e4m3fn's two NaNs left out
    values = codes.view(torch.float8_e4m3fn)
    w = torch.zeros(1, 16, 16, dtype=torch.float8_e4m3fn)
    x = torch.eye(16).bfloat16()
    got = []
    for chunk in values.split(16):
        w.zero_()
        w[0, : len(chunk), 0] = chunk  # output n's first input weight: the value under test
        sorted_ids, block_expert, _ = triton_moe.align(torch.zeros(16, 1, dtype=torch.long), 0, 1, triton_moe.BLOCK_M)
        y = triton_moe._gemm(x, w, torch.ones(1, 1, 1), (16, 16), sorted_ids, block_expert, 16, 1, True)
        got.append(y[0, : len(chunk)].float())
    torch.testing.assert_close(torch.cat(got), values.float(), atol=0, rtol=0)


@interpreted
def test_expert_parallel_ranks_sum_to_the_whole_layer():
    """Two expert-parallel ranks (experts 0-3 and 4-7) each compute their own assignments only;
    their partial sums add up to the whole layer's."""
    whole = fp8_experts(E=8, D=64, I=32, block=(16, 16), seed=3)
    weights, ids = routing(9, 2, 8, seed=4)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    parts = []
    for first in (0, 4):
        rank = fp8_experts(E=8, D=64, I=32, block=(16, 16), first=first, local=4, seed=3)
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv"):
            setattr(rank, name, torch.nn.Parameter(getattr(whole, name)[first : first + 4], requires_grad=False))
        assert rank.grouped(x)
        parts.append(rank(x, weights, ids)[0])
    want, _ = whole(x, weights, ids)
    torch.testing.assert_close((parts[0].float() + parts[1].float()), want.float(), atol=2e-2, rtol=2e-2)


def test_what_the_kernel_does_not_take_keeps_the_loop(monkeypatch):
    experts = fp8_experts(E=4, D=64, I=32, block=(16, 16))
    monkeypatch.setattr(triton_moe, "interpreting", lambda: True)
    x = torch.randn(3, 64).bfloat16()
    assert triton_moe.applies(experts, x)
    assert not triton_moe.applies(experts, x.float())  # float32 activations
    assert not triton_moe.applies(fp8_experts(E=4, D=64, I=24, block=(16, 16)), x)  # I not whole blocks
    assert not triton_moe.applies(fp8_experts(E=4, D=64, I=32, block=(12, 16)), x)  # no tile divides 12
    monkeypatch.setenv("MOE_RUNTIME_TRITON_MOE", "0")
    assert not triton_moe.applies(experts, x)


@parent
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_kernel_compiles_for_the_gpus_it_serves(capability, dtype):
    """DeepSeek-V3's blocks (128 x 128) compiled for sm_80 (the FP8 bytes decoded) and sm_90 (FP8
    converted natively) with the launch's constants."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton_moe._kernel()
    bn, bk = triton_moe.tiles((128, 128))
    bits = capability < 89
    constants = {"E": 16, "BLOCK_M": triton_moe.BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk, "BITS": bits, "WIDEN": False}
    signature = {"X": f"*{dtype}", "W": "*u8" if bits else "*fp8e4nv", "WS": "*fp32", "IDS": "*i32",
                 "BLOCK_EXPERT": "*i32", "Y": f"*{dtype}"}  # fmt: skip
    signature |= {name: "i32" for name in ("sx", "sw_e", "sw_n", "sws_e", "sws_n", "sy", "K", "NOUT", "ROWS",
                                           "PER_ROW", "B0", "B1")}  # fmt: skip
    signature |= {name: "constexpr" for name in constants}
    assert set(signature) == set(kernel.arg_names)
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", capability, 32))
    assert compiled.asm["cubin"] and compiled.metadata.shared <= 99 * 1024


@interpreted
def test_an_fp8_checkpoints_experts_take_the_kernel_with_the_loops_logits(checkpoints, monkeypatch):  # noqa: F811
    """A DeepSeek-V3-style FP8 checkpoint (128 x 128 blocks) in bfloat16: its MoE layer's experts run
    on the kernel, and the logits are those of the same model with the kernel off
    (MOE_RUNTIME_TRITON_MOE=0: the per-expert dequantizing loop)."""
    fp8, _ = checkpoints
    model = load_model(fp8, dtype=torch.bfloat16)
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    calls = []
    real = triton_moe.fp8_experts
    monkeypatch.setattr(triton_moe, "fp8_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = model(ids)
        assert len(calls) == 1  # the one MoE layer
        monkeypatch.setenv("MOE_RUNTIME_TRITON_MOE", "0")
        want = model(ids)
    assert len(calls) == 1
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
