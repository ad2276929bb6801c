"""The runtime on CUDA: device placement per local rank, bf16 on the GPU against fp32 on the CPU,
and a replica over the GPUs (NCCL). Skipped without CUDA; `make gpu-check` runs these on a machine
with one or more GPUs.
"""

from __future__ import annotations

import multiprocessing
import socket

import pytest
import torch

from model_runtime import load_model
from model_runtime.models.paged import build_paged_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MODELS = ["builtin:tiny-mixtral", "builtin:tiny-qwen3-moe", "builtin:tiny-deepseek-v3"]


def prompt_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("src", MODELS)
def test_bf16_on_cuda_agrees_with_fp32_on_the_cpu(src):
    ref = load_model(src, dtype=torch.float32, device="cpu")
    gpu = load_model(src, dtype=torch.bfloat16, device="cuda")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    ids = prompt_ids(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(ids)
        got = gpu(ids.cuda()).float().cpu()
    # bf16 keeps ~3 significant digits (and may flip a near-tied expert choice): the same next
    # token at nearly every position, logits close on average (on the CPU in bf16: 0.7-2.2%)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"top-1 agreement {agree:.2f}"
    assert (got - want).abs().mean().item() < 0.1 * want.abs().mean().item()


@pytest.mark.parametrize("src", ["builtin:tiny-deepseek-v3", "builtin:tiny-mixtral"])  # MLA; GQA (Triton prefill too)
def test_paged_decode_on_cuda_matches_the_cpu_greedy_tokens(src):
    tokens = greedy_tokens(src)
    assert tokens["cuda"] == tokens["cpu"]


def greedy_tokens(src: str) -> dict[str, list[int]]:
    """16 greedy tokens after a 9-token prompt, paged, float32, on the CPU and on CUDA."""
    tokens = {}
    for device in ("cpu", "cuda"):
        model = load_model(src, dtype=torch.float32, device=device)
        blocks, block_size = list(range(8)), 8
        cache = model.allocate_kv_cache(len(blocks), block_size)
        seq = prompt_ids(model.config.vocab_size)[0, :9].tolist()
        out = []
        with torch.no_grad():
            batch = build_paged_batch([(blocks, 0, len(seq))], block_size, device)
            logits = model.forward_paged(torch.tensor(seq, device=device), batch, cache)
            for _ in range(16):
                out.append(int(logits[0].argmax()))
                seq.append(out[-1])
                batch = build_paged_batch([(blocks, len(seq) - 1, 1)], block_size, device)
                logits = model.forward_paged(torch.tensor(seq[-1:], device=device), batch, cache)
        tokens[device] = out
    return tokens


def _rank(rank, world, port, queue):
    from model_runtime.distributed.comm import device_for, init_comm
    from model_runtime.distributed.config import ParallelConfig

    parallel = ParallelConfig(tensor_parallel_size=world, enable_expert_parallel=True, master_port=port)
    device = device_for("cuda", parallel.local_rank(rank))
    comm = init_comm(parallel, rank, device)
    model = load_model(
        "builtin:tiny-mixtral", dtype=torch.float32, device=device, shard=comm.shard(True), comm=comm
    )
    with torch.no_grad():
        logits = model(prompt_ids(model.config.vocab_size).to(device)).cpu()
    queue.put((rank, str(device), {str(p.device) for p in model.parameters()}, logits))
    comm.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_each_rank_runs_on_the_gpu_of_its_local_rank_and_the_replica_computes_the_model():
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    procs = [context.Process(target=_rank, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, device, devices, logits = queue.get()
        results[rank] = (device, devices, logits)
    for p in procs:
        p.join(60)
    for rank, (device, devices, _) in results.items():
        assert device == f"cuda:{rank}" and devices == {device}
    ref = load_model("builtin:tiny-mixtral")
    with torch.no_grad():
        want = ref(prompt_ids(ref.config.vocab_size))
    torch.testing.assert_close(results[0][2], want, atol=1e-3, rtol=1e-3)


def test_serve_on_cuda_answers(server_process):
    import httpx

    server = server_process("--device", "cuda", "--seed", "0", model="builtin:tiny-mixtral")
    try:
        reply = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": "tiny-mixtral", "prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
        assert "cuda" in server.logs()
    finally:
        assert server.stop() == 0, server.logs()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs FP8 tensor cores (Hopper)",
)
def test_native_fp8_matmul_agrees_with_dequantization_on_hopper():
    from model_runtime.kernels.fp8 import Fp8Linear, quantize

    torch.manual_seed(0)
    w = torch.randn(512, 384) / 384**0.5
    layer = Fp8Linear(384, 512, bias=False, block=(128, 128)).cuda()
    q, scale_inv = quantize(w, (128, 128))
    layer.weight.data, layer.weight_scale_inv.data = q.cuda(), scale_inv.cuda()
    x = torch.randn(64, 384, device="cuda", dtype=torch.bfloat16)
    got = layer(x)  # the first call checks the native path against dequantization
    assert layer.native is True, "torch._scaled_mm with block scales was not used on this Hopper GPU"
    want = torch.nn.functional.linear(x, layer.dequantized(torch.bfloat16))
    assert (got.float() - want.float()).abs().max().item() < 0.05 * want.float().abs().max().item()


def test_an_expert_parallel_rank_on_cuda_groups_its_experts_and_matches_the_cpu_loop():
    """On CUDA an expert-parallel rank's experts run as two grouped GEMMs over its own experts'
    assignments (no counts read back per layer), with the result of the CPU's per-expert loop."""
    from model_runtime.distributed.shard import Shard
    from model_runtime.models.model import Experts, MoE

    model = load_model("builtin:tiny-deepseek-v3", dtype=torch.bfloat16)
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(9)).bfloat16()
    weights, ids = moe.gate(x)
    for rank in range(2):
        part = Experts(model.config, Shard(rank=rank, world=2, expert_parallel=True)).to(torch.bfloat16)
        e0, E = part.first_expert, part.num_local_experts
        with torch.no_grad():
            part.gate_up_proj.copy_(moe.experts.gate_up_proj[e0 : e0 + E])
            part.down_proj.copy_(moe.experts.down_proj[e0 : e0 + E])
        want, _ = part(x, weights, ids)  # the CPU's loop
        part.cuda()
        assert part.grouped(x.cuda())
        got, counts = part(x.cuda(), weights.cuda(), ids.cuda())
        torch.testing.assert_close(got.float().cpu(), want.float(), rtol=2e-2, atol=2e-2)
        assert counts.cpu().tolist() == torch.bincount(ids.reshape(-1), minlength=part.num_experts).tolist()


@pytest.mark.parametrize("splits", [None, 1, 5])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "rope"), [(32, 8, 128, 0), (16, 1, 512, 64), (12, 4, 40, 0)])
def test_triton_paged_decode_compiles_and_matches_the_gathered_path_on_cuda(heads, kv_heads, dim, rope, splits):
    """The Triton decode kernel compiled for the device (the CPU tier runs it interpreted): GQA,
    MLA's latent rows with the rope part apart, odd head sizes, one or several programs a context."""
    from model_runtime.kernels import triton_attention
    from model_runtime.models import model as layers

    gen = torch.Generator().manual_seed(heads + dim)
    lens, bs = [1, 15, 16, 17, 300, 2, 1000], 16
    perm = torch.randperm(256, generator=gen).tolist()
    seqs, used = [], 0
    for n in lens:
        nb = -(-n // bs)
        seqs.append((perm[used : used + nb], n - 1, 1))
        used += nb
    batch = build_paged_batch(seqs, bs, "cuda")
    cache = torch.randn(256 * bs, kv_heads, dim + rope, generator=gen).bfloat16().cuda()
    values = torch.randn(256 * bs, kv_heads, dim, generator=gen).bfloat16().cuda() if not rope else cache[..., :dim]
    q = torch.randn(len(lens), heads, dim + rope, generator=gen).bfloat16().cuda()
    got = triton_attention.decode(
        q[..., :dim], cache, values, batch.block_tables, batch.context_lens, bs, dim**-0.5, None,
        q_rope=q[..., dim:] if rope else None, splits=splits,
    )  # fmt: skip
    assert triton_attention._failed is None, triton_attention._failed
    ctx = layers.PagedContext.build(batch, None)
    k = layers.gather_slots(cache.float(), ctx.context_slots)
    v = layers.gather_slots(values.float(), ctx.context_slots)
    want = layers.paged_attention(q.float(), k, v, ctx, dim**-0.5)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_a_models_decode_on_cuda_reads_the_cache_in_place():
    """Every decode step's attention on CUDA, and a GQA model's prefill, are the Triton kernels'
    (no gathered context)."""
    from model_runtime.kernels import triton_attention

    calls = {"decode": 0, "prefill": 0}
    real = {name: getattr(triton_attention, name) for name in calls}
    for name in calls:
        setattr(triton_attention, name, lambda *a, name=name, **k: calls.__setitem__(name, calls[name] + 1) or real[name](*a, **k))
    try:
        tokens = greedy_tokens("builtin:tiny-mixtral")
    finally:
        for name, fn in real.items():
            setattr(triton_attention, name, fn)
    layers = load_model("builtin:tiny-mixtral", dtype=torch.float32).config.num_hidden_layers
    assert calls == {"decode": 16 * layers, "prefill": layers}
    assert tokens["cuda"] == tokens["cpu"]


@pytest.mark.parametrize("bits", [None, True])  # the device's own conversion, and the byte decode
def test_fp8_experts_on_cuda_take_the_triton_kernel_and_match_the_loop(bits):
    """DeepSeek-V3-shaped FP8 experts (128 x 128 blocks) on CUDA: the Triton grouped GEMM on the FP8
    weights in place gives the per-expert dequantizing loop's output."""
    import types

    import torch.nn.functional as F

    from model_runtime.kernels import triton_moe
    from model_runtime.kernels.fp8 import Fp8Experts, quantize

    E, D, I, block = 16, 512, 256, (128, 128)  # noqa: E741 (legend)
    gen = torch.Generator().manual_seed(3)
    plain = types.SimpleNamespace(act=F.silu, num_experts=E, first_expert=0, num_local_experts=E,
                                  gate_up_proj=torch.empty(E, 2 * I, D))  # fmt: skip
    experts = Fp8Experts(plain, block)
    for name, shape in (("gate_up_proj", (2 * I, D)), ("down_proj", (D, I))):
        q, s = zip(*(quantize(torch.randn(*shape, generator=gen) * 0.05, block) for _ in range(E)), strict=True)
        setattr(experts, name, torch.nn.Parameter(torch.stack(q), requires_grad=False))
        setattr(experts, f"{name}_scale_inv", torch.nn.Parameter(torch.stack(s), requires_grad=False))
    experts.cuda()
    for tokens in (1, 7, 64):
        ids = torch.stack([torch.randperm(E, generator=gen)[:4] for _ in range(tokens)]).cuda()
        weights = torch.rand(tokens, 4, generator=gen).softmax(-1).cuda()
        x = torch.randn(tokens, D, generator=gen).bfloat16().cuda()
        assert experts.grouped(x)
        got = triton_moe.fp8_experts(experts, x, weights, ids, bits=bits)
        assert triton_moe._failed is None, triton_moe._failed
        want = experts.looped_forward(x, weights, ids, torch.bincount(ids.reshape(-1), minlength=E))
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
