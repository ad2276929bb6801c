"""The decode kernel that reads the paged KV cache in place (kernels/paged_attention.py) against the
torch path it replaces (gather the context, then attend): GQA and MLA shapes, ragged contexts that
end on, before and after block boundaries, scattered blocks, a sliding window, and whole bfloat16
and float32 models decoding after a cached prefix; each build of the kernel this CPU runs (AVX-512
with AMX or FMA scores, AVX2)."""

import os

import pytest
import torch

from model_runtime import load_model
from model_runtime.kernels import paged_attention as paged_kernel
from model_runtime.models import model as layers
from model_runtime.models.paged import build_paged_batch

pytestmark = [
    pytest.mark.runtime,
    pytest.mark.skipif(not paged_kernel.available(), reason="needs AVX2 and a C compiler"),
]
avx512 = pytest.mark.skipif(paged_kernel.avx512_lib() is None, reason="needs AVX512-BF16")


@pytest.fixture(autouse=True)
def one_thread():
    """The kernel serves torch on one thread (the runtime's setting on small machines)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["amx", "fma", "avx2"])
def scores(request, monkeypatch):
    """Each kernel test with the bfloat16 kernel's scores on AMX tiles (where the CPU has them; for E
    a multiple of 32 and 8 or more query heads a kv head), with its AVX-512 FMAs, and on the AVX2
    build (what CPUs without AVX512-BF16 run, and float32 everywhere)."""
    lib = paged_kernel._load()
    if request.param == "avx2":
        monkeypatch.setattr(paged_kernel, "_avx512", False)
        yield request.param
        return
    if paged_kernel.avx512_lib() is None:
        pytest.skip("this CPU has no AVX512-BF16")
    if not lib.moe_paged_amx_select(int(request.param == "amx")) and request.param == "amx":
        lib.moe_paged_amx_select(1)
        pytest.skip("this CPU (or OS) runs no AMX")
    yield request.param
    lib.moe_paged_amx_select(int(os.environ.get("MOE_RUNTIME_AMX", "1") != "0"))


def decode_batch(lens, block_size, num_blocks, seed):
    """A decode step: sequence s has lens[s] tokens cached, its last one new, in scattered blocks."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    seqs, used = [], 0
    for n in lens:
        nb = -(-n // block_size)
        seqs.append((perm[used : used + nb], n - 1, 1))
        used += nb
    return build_paged_batch(seqs, block_size)


def gathered(q, keys, values, batch, scale, window):
    """The torch path: gather each sequence's context, attend it (in q's dtype)."""
    ctx = layers.PagedContext.build(batch, window)
    k = layers.gather_slots(keys, ctx.context_slots).to(q.dtype)
    v = layers.gather_slots(values, ctx.context_slots).to(q.dtype)
    return layers.paged_attention(q, k, v, ctx, scale)


LENS = [1, 15, 16, 17, 33, 70, 2, 48]  # on, before and after block boundaries (16), one token, ragged


GQA_SHAPES = [
    (8, 4, 32, None, 16),  # Mixtral-style GQA
    (8, 8, 64, None, 16),  # one query head per kv head
    (6, 2, 40, None, 16),  # head_dim not a multiple of 32 (masked loads)
    (8, 4, 32, 20, 16),  # sliding window shorter than some contexts
    (8, 4, 32, None, 5),  # odd block size
    (16, 2, 64, None, 16),  # 8 query heads a kv head (AMX scores where the CPU has them)
    (16, 1, 32, 20, 5),  # 16, a window, an odd block size
    (12, 4, 20, None, 16),  # head_dim not a multiple of 8 (the AVX2 build's columns one at a time)
]


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "block_size"), GQA_SHAPES)
def test_gqa_decode_matches_gathered_attention(heads, kv_heads, dim, window, block_size, scores):
    gen = torch.Generator().manual_seed(heads * dim + (window or 0) + block_size)
    num_blocks = 64
    batch = decode_batch(LENS, block_size, num_blocks, seed=block_size)
    cache = torch.randn(2, num_blocks * block_size, kv_heads, dim, generator=gen).to(torch.bfloat16)
    q = torch.randn(len(LENS), heads, dim, generator=gen).to(torch.bfloat16)
    scale = dim**-0.5
    got = paged_kernel.decode(
        q, cache[0], cache[1], batch.block_tables, batch.context_lens, block_size, scale, window
    )
    exact = gathered(q.float(), cache[0].float(), cache[1].float(), batch, scale, window)
    ref = gathered(q, cache[0], cache[1], batch, scale, window)
    assert got.shape == ref.shape == (len(LENS), heads, dim) and got.dtype == torch.bfloat16
    # float32 scores and softmax: at least as close to the exact result as the bfloat16 torch path
    torch.testing.assert_close(got.float(), exact, atol=8e-3, rtol=8e-3)
    assert (got.float() - exact).abs().max() <= (ref.float() - exact).abs().max() + 4e-3
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "block_size"), GQA_SHAPES)
def test_float32_gqa_decode_matches_gathered_attention(heads, kv_heads, dim, window, block_size):
    """float32 queries and cache (the runtime's dtype on CPUs without native bfloat16 matmul): the
    AVX2 build, float32 throughout, gives the gathered float32 path's output to float32 rounding."""
    gen = torch.Generator().manual_seed(heads * dim + (window or 0) + block_size)
    num_blocks = 64
    batch = decode_batch(LENS, block_size, num_blocks, seed=block_size)
    cache = torch.randn(2, num_blocks * block_size, kv_heads, dim, generator=gen) * 2
    q = torch.randn(len(LENS), heads, dim, generator=gen) * 2
    scale = dim**-0.5
    got = paged_kernel.decode(q, cache[0], cache[1], batch.block_tables, batch.context_lens, block_size, scale, window)
    want = gathered(q, cache[0], cache[1], batch, scale, window)
    assert got.dtype == torch.float32 and got.shape == want.shape == (len(LENS), heads, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    exact = gathered(q.double(), cache[0].double(), cache[1].double(), batch, scale, window)
    assert (got - exact).abs().max() <= 2 * (want - exact).abs().max() + 1e-6  # as close as torch's float32
    wrong = decode_batch(LENS, block_size, num_blocks, seed=block_size + 1)  # other blocks: far off
    assert not torch.allclose(gathered(q, cache[0], cache[1], wrong, scale, window), got, atol=1e-3)


def test_float32_mla_decode_and_mismatched_dtypes():
    C, R, H, bs = 512, 64, 16, 16
    gen = torch.Generator().manual_seed(8)
    batch = decode_batch(LENS, bs, 64, seed=4)
    cache = torch.randn(64 * bs, C + R, generator=gen)
    q = torch.randn(len(LENS), H, C + R, generator=gen) * 0.2
    rows = cache[:, None, :]
    out = torch.full((H, len(LENS), C), float("nan"))
    got = paged_kernel.decode(
        q[..., :C], rows, rows[..., :C], batch.block_tables, batch.context_lens, bs, 0.07, None,
        out=out.transpose(0, 1), q_rope=q[..., C:],
    )  # fmt: skip
    want = gathered(q, rows, rows, batch, 0.07, None)[..., :C]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(out.transpose(0, 1), got)
    with pytest.raises(ValueError, match="not all bfloat16 or float32"):
        paged_kernel.decode(q.bfloat16(), rows, rows[..., :C], batch.block_tables, batch.context_lens, bs, 0.07, None)
    with pytest.raises(ValueError, match="out"):
        paged_kernel.decode(q, rows, rows[..., :C], batch.block_tables, batch.context_lens, bs, 0.07, None,
                            out=out.transpose(0, 1).bfloat16())  # fmt: skip


def test_mla_decode_reads_latent_rows_in_place(scores):
    """MLA's absorbed decode: one kv head whose keys are whole [C + R] rows and whose values are
    their first C columns (a strided view of the cache, not copied)."""
    C, R, H, bs = 512, 64, 8, 16
    gen = torch.Generator().manual_seed(7)
    batch = decode_batch(LENS, bs, 64, seed=3)
    cache = torch.randn(64 * bs, C + R, generator=gen).to(torch.bfloat16)
    q = torch.randn(len(LENS), H, C + R, generator=gen).to(torch.bfloat16)
    rows = cache[:, None, :]
    scale = 0.07
    got = paged_kernel.decode(q, rows, rows[..., :C], batch.block_tables, batch.context_lens, bs, scale, None)
    exact = gathered(q.float(), rows.float(), rows.float(), batch, scale, None)[..., :C]
    assert got.shape == (len(LENS), H, C)
    torch.testing.assert_close(got.float(), exact, atol=8e-3, rtol=8e-3)
    # q and the output as strided views (MLA's layer passes head-major buffers): the same values
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # [S, H, E], heads apart by S * E
    out = torch.full((H, len(LENS), C), float("nan"), dtype=torch.bfloat16)
    paged_kernel.decode(
        q_t, rows, rows[..., :C], batch.block_tables, batch.context_lens, bs, scale, None, out=out.transpose(0, 1)
    )
    assert torch.equal(out.transpose(0, 1), got)
    # the latent and rope parts of q apart (MLA's layer passes them where they lie): the same values
    latent, rope = q_t[..., :C], q[..., C:].clone()
    split = paged_kernel.decode(
        latent, rows, rows[..., :C], batch.block_tables, batch.context_lens, bs, scale, None, q_rope=rope
    )
    assert torch.equal(split, got)
    with pytest.raises(ValueError, match="out"):
        paged_kernel.decode(
            q, rows, rows[..., :C], batch.block_tables, batch.context_lens, bs, scale, None, out=out[:, :, :16]
        )


def mla_prepare_by_torch(q, kv, cos, sin, norm, cache, slots, interleaved):
    """What the torch path of model.MLAttention.write_latent leaves: q with its rope part rotated,
    and the cache with the normed latent and the rotated rope key at `slots` (copies of both)."""
    R = cos.shape[1] * 2
    C = kv.shape[1] - R
    P = q.shape[2] - R
    want_q, want_cache = q.clone(), cache.clone()
    with torch.no_grad():
        c, k_rope = kv.split([C, R], dim=-1)
        k_rope = layers.apply_rope(k_rope[:, None, :], cos, sin, interleaved)[:, 0]
        want_cache[slots] = torch.cat([norm(c), k_rope], dim=-1)
        want_q[..., P:] = layers.apply_rope(want_q[..., P:], cos, sin, interleaved)
    return want_q, want_cache


@avx512
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize(("R", "C"), [(64, 512), (32, 64), (16, 40)])  # AVX-512 loops; (16, 40): scalar
def test_mla_prepare_writes_the_bits_torch_writes(interleaved, R, C):
    """MLA's norm, rope and cache write before the in-place decode, one C call: the cache rows and
    the rotated queries are torch's bit for bit (a different rounding would move a router's
    near-tie downstream)."""
    N, H, P = 5, 4, 16
    gen = torch.Generator().manual_seed(int(interleaved))
    q = torch.randn(N, H, P + R, generator=gen).to(torch.bfloat16)
    kv = (torch.randn(N, C + R, generator=gen) * 3).to(torch.bfloat16)
    angle = torch.randn(N, R // 2, generator=gen) * 5
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    norm = layers.RMSNorm(C, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(C, generator=gen))
    slots = torch.tensor([3, 9, 17, 40, 41])
    cache = torch.zeros(64, C + R, dtype=torch.bfloat16)
    want_q, want_cache = mla_prepare_by_torch(q, kv, cos, sin, norm, cache, slots, interleaved)
    with torch.no_grad():
        assert paged_kernel.mla_prepare(q, kv, cos, sin, norm.weight, norm.eps, cache, slots, interleaved)
    assert torch.equal(cache, want_cache)
    assert torch.equal(q, want_q)
    assert not paged_kernel.mla_prepare(q.float(), kv, cos, sin, norm.weight, norm.eps, cache, slots, interleaved)


@avx512
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("D", [128, 32, 24])  # AVX-512 loops; 24: scalar
def test_gqa_prepare_writes_the_bits_torch_writes(interleaved, D):
    """Grouped-query attention's rope and cache writes before attention, one C call: the rotated
    queries and the cache's key and value rows are torch's bit for bit."""
    N, H, K = 5, 8, 2
    gen = torch.Generator().manual_seed(D + int(interleaved))
    q, k, v = ((torch.randn(N, h, D, generator=gen) * 3).to(torch.bfloat16) for h in (H, K, K))
    angle = torch.randn(N, D // 2, generator=gen) * 5
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    slots = torch.tensor([3, 9, 17, 40, 0])
    cache = torch.zeros(2, 64, K, D, dtype=torch.bfloat16)
    want_cache = cache.clone()
    want_q = layers.apply_rope(q, cos, sin, interleaved)
    want_cache[0][slots] = layers.apply_rope(k, cos, sin, interleaved)
    want_cache[1][slots] = v
    # q, k, v as column ranges of one fused projection's output (cpu_decode.fuse_projections): the
    # same bits from rows (H + 2K) D apart
    fused = torch.cat([t.reshape(N, -1) for t in (q, k, v)], dim=1)
    fq, fk, fv = (t.view(N, -1, D) for t in fused.split((H * D, K * D, K * D), dim=1))
    fused_cache = cache.clone()
    assert paged_kernel.gqa_prepare(q, k, v, cos, sin, cache, slots, interleaved)
    assert torch.equal(q, want_q)
    assert torch.equal(cache, want_cache)
    assert not fq.is_contiguous() and paged_kernel.gqa_prepare(fq, fk, fv, cos, sin, fused_cache, slots, interleaved)
    assert torch.equal(fq, want_q)
    assert torch.equal(fused_cache, want_cache)
    # not such inputs: nothing done, torch's ops run
    assert not paged_kernel.gqa_prepare(q, k, v, cos, sin, cache.float(), slots, interleaved)
    assert not paged_kernel.gqa_prepare(q, k, v, cos[:, :4], sin[:, :4], cache, slots, interleaved)  # partial rope
    assert not paged_kernel.gqa_prepare(q.transpose(0, 1), k, v, cos, sin, cache, slots, interleaved)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize(("R", "C"), [(64, 512), (16, 40)])
def test_float32_mla_prepare_matches_torch(interleaved, R, C):
    """MLA's norm, rope and cache write in float32, one C call (any CPU the library loads on): the
    rotated queries and the cache's rope columns are torch's float32 bits, the normed latent within
    float32 rounding of torch's RMSNorm; other cache rows untouched."""
    N, H, P = 5, 4, 16
    gen = torch.Generator().manual_seed(7 + R + int(interleaved))
    q = torch.randn(N, H, P + R, generator=gen)
    kv = torch.randn(N, C + R, generator=gen) * 3
    angle = torch.randn(N, R // 2, generator=gen) * 5
    cos, sin = angle.cos(), angle.sin()
    norm = layers.RMSNorm(C, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(C, generator=gen))
    slots = torch.tensor([3, 9, 17, 40, 41])
    cache = torch.full((64, C + R), 7.0)
    want_q, want_cache = mla_prepare_by_torch(q, kv, cos, sin, norm, cache, slots, interleaved)
    with torch.no_grad():
        assert paged_kernel.mla_prepare(q, kv, cos, sin, norm.weight, norm.eps, cache, slots, interleaved)
    assert torch.equal(q, want_q)
    assert torch.equal(cache[:, C:], want_cache[:, C:])
    torch.testing.assert_close(cache[:, :C], want_cache[:, :C], rtol=2e-6, atol=1e-6)
    assert torch.equal(cache[torch.tensor([0, 10, 63])], want_cache[torch.tensor([0, 10, 63])])
    bf = cache.bfloat16()
    assert not paged_kernel.mla_prepare(q, kv, cos, sin, norm.weight, norm.eps, bf, slots, interleaved)


@pytest.mark.parametrize("interleaved", [True, False])
def test_float32_gqa_prepare_writes_the_bits_torch_writes(interleaved):
    """float32 rope and cache writes in one C call (any CPU the library loads on): the rotated
    queries and the cache's rows are torch's float32 ops' bits."""
    N, H, K, D = 5, 8, 2, 64
    gen = torch.Generator().manual_seed(5 + int(interleaved))
    q, k, v = (torch.randn(N, h, D, generator=gen) * 3 for h in (H, K, K))
    angle = torch.randn(N, D // 2, generator=gen) * 5
    cos, sin = angle.cos(), angle.sin()
    slots = torch.tensor([3, 9, 17, 40, 0])
    cache = torch.zeros(2, 64, K, D)
    want_cache = cache.clone()
    want_q = layers.apply_rope(q, cos, sin, interleaved)
    want_cache[0][slots] = layers.apply_rope(k, cos, sin, interleaved)
    want_cache[1][slots] = v
    fused = torch.cat([t.reshape(N, -1) for t in (q, k, v)], dim=1)  # column ranges of one output
    fq, fk, fv = (t.view(N, -1, D) for t in fused.split((H * D, K * D, K * D), dim=1))
    assert paged_kernel.gqa_prepare(fq, fk, fv, cos, sin, cache, slots, interleaved)
    assert torch.equal(fq, want_q)
    assert torch.equal(cache, want_cache)
    assert not paged_kernel.gqa_prepare(q, k, v, cos, sin, cache.bfloat16(), slots, interleaved)


def test_mismatched_shapes_are_refused():
    cache = torch.zeros(2, 64, 4, 32, dtype=torch.bfloat16)
    q = torch.zeros(2, 6, 32, dtype=torch.bfloat16)  # 6 heads over 4 kv heads
    tables, lens = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit"):
        paged_kernel.decode(q, cache[0], cache[1], tables, lens, 16, 1.0, None)


@pytest.fixture(scope="module", params=["builtin:tiny-mixtral", "builtin:tiny-deepseek-v3"])
def bf16_model(request):
    return load_model(request.param).to(torch.bfloat16)


def decode_logits(model, prompts, follow, use_kernel, monkeypatch):
    """Prefill each prompt (the second one after a cached prefix: its first 8 tokens written by an
    earlier step), then decode the tokens of `follow` [steps, 2] one step at a time (the same
    inputs whichever path runs); the logits of every decode step [steps, 2, V]."""
    if not use_kernel:
        monkeypatch.setattr(paged_kernel, "applies", lambda *a: False)
    bs = 4
    cache = model.allocate_kv_cache(96, bs)
    tables = [list(range(0, 40, 2)), list(range(1, 41, 2))]  # interleaved blocks
    done, out = [0, 0], []
    with torch.no_grad():
        prefix = build_paged_batch([(tables[1], 0, 8)], bs)
        model.forward_paged(torch.tensor(prompts[1][:8]), prefix, cache)
        done[1] = 8
        batch = build_paged_batch([(tables[0], 0, len(prompts[0])), (tables[1], 8, len(prompts[1]) - 8)], bs)
        tokens = torch.tensor(prompts[0] + prompts[1][8:])
        logits = model.forward_paged(tokens, batch, cache)
        done = [len(p) for p in prompts]
        for nxt in follow:
            batch = build_paged_batch([(tables[s], done[s], 1) for s in range(2)], bs)
            logits = model.forward_paged(nxt, batch, cache)
            out.append(logits)
            done = [d + 1 for d in done]
    monkeypatch.undo()
    return torch.stack(out)


def test_bf16_model_decode_matches_gathered_path(bf16_model, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 13)]
    follow = torch.randint(0, 256, (12, 2), generator=gen)  # contexts cross several 4-token blocks
    calls = []
    real = paged_kernel.decode
    monkeypatch.setattr(paged_kernel, "decode", lambda *a: calls.append(1) or real(*a))
    got = decode_logits(bf16_model, prompts, follow, True, monkeypatch)
    assert len(calls) == 12 * bf16_model.config.num_hidden_layers, (
        "the in-place kernel did not serve every decode step"
    )
    ref = decode_logits(bf16_model, prompts, follow, False, monkeypatch)
    exact = decode_logits(bf16_model.float(), prompts, follow, True, monkeypatch)  # float32: torch path
    bf16_model.to(torch.bfloat16)
    # bfloat16 noise: both paths' logits are up to ~0.8 from float32's on these random models; the
    # kernel stays as close to float32 as the gathered bfloat16 path (a wrong block, position or
    # head would be far off)
    err, ref_err = (got - exact).abs(), (ref - exact).abs()
    assert err.mean() <= 1.15 * ref_err.mean() and err.max() <= 1.5 * ref_err.max()


@pytest.mark.parametrize("name", ["builtin:tiny-mixtral", "builtin:tiny-deepseek-v3"])
def test_float32_model_decode_matches_gathered_path(name, monkeypatch):
    """A float32 model (what `--dtype auto` runs on CPUs without native bfloat16 matmul): every
    decode step's attention is the kernel's, and the logits are the gathered path's to float32
    rounding."""
    model = load_model(name)
    assert next(model.parameters()).dtype == torch.float32
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 14)]
    follow = torch.randint(0, 256, (10, 2), generator=gen)
    calls = []
    real = paged_kernel.decode
    monkeypatch.setattr(paged_kernel, "decode", lambda *a: calls.append(a[0].dtype) or real(*a))
    got = decode_logits(model, prompts, follow, True, monkeypatch)
    assert calls == [torch.float32] * 10 * model.config.num_hidden_layers
    ref = decode_logits(model, prompts, follow, False, monkeypatch)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def same_with_helpers(run, alone: torch.Tensor) -> None:
    """run() gives `alone`'s bits with 1 and 2 helper threads (decisions 37, 38), which do take
    sequences (where the process has a second core), and again with none."""
    from model_runtime.kernels import cpu_decode

    for n in (1, 2):
        assert cpu_decode.start_helpers(n) == n
        before = cpu_decode.helper_rows()
        for _ in range(20):
            assert torch.equal(run(), alone), n
            if cpu_decode.helper_rows() > before:
                break
        if len(os.sched_getaffinity(0)) > 1:
            assert cpu_decode.helper_rows() > before, f"{n} helper(s) never took a sequence"
    cpu_decode.start_helpers(0)
    assert torch.equal(run(), alone)


def test_float32_decode_shares_its_sequences_with_the_helper_threads():
    """With the CPU kernels' helper threads running (decision 37), the AVX2 kernel's sequences are
    shared among them, a sequence per thread: the same bits as alone, and the helpers take part."""
    from model_runtime.kernels import cpu_decode

    if not cpu_decode.available():
        pytest.skip("the CPU kernels are not available here")
    gen = torch.Generator().manual_seed(3)
    lens, block_size, num_blocks = [300, 17, 150, 64, 1, 200, 90, 33], 16, 64
    batch = decode_batch(lens, block_size, num_blocks, seed=2)
    cache = torch.randn(2, num_blocks * block_size, 8, 128, generator=gen)  # ~3.5 MB of context read
    q = torch.randn(len(lens), 16, 128, generator=gen)

    def run():  # into NaNs: a sequence no thread wrote shows
        out = torch.full((len(lens), 16, 128), float("nan"))
        return paged_kernel.decode(q, cache[0], cache[1], batch.block_tables, batch.context_lens, block_size, 0.1, None, out)

    cpu_decode.start_helpers(0)
    alone = run()
    torch.testing.assert_close(alone, gathered(q, cache[0], cache[1], batch, 0.1, None), atol=1e-5, rtol=1e-4)
    same_with_helpers(run, alone)


@avx512
@pytest.mark.parametrize("amx", [False, True])
def test_bfloat16_decode_shares_its_sequences_with_the_helper_threads(amx):
    """The AVX512-BF16 kernel (scores by FMAs, or on AMX tiles where the CPU has them) shares its
    sequences with the helper threads as the AVX2 one does (decision 38): the same bits as alone,
    and the helpers take part."""
    from model_runtime.kernels import cpu_decode

    lib = paged_kernel.avx512_lib()
    if lib.moe_paged_amx_select(int(amx)) != amx:
        lib.moe_paged_amx_select(int(os.environ.get("MOE_RUNTIME_AMX", "1") != "0"))
        pytest.skip("this CPU (or OS) runs no AMX")
    gen = torch.Generator().manual_seed(4)
    lens, block_size, num_blocks = [300, 17, 150, 64, 1, 200, 90, 33], 16, 64
    batch = decode_batch(lens, block_size, num_blocks, seed=5)
    cache = torch.randn(2, num_blocks * block_size, 4, 128, generator=gen).bfloat16()  # ~1.8 MB of context read
    q = torch.randn(len(lens), 32, 128, generator=gen).bfloat16()

    def run():  # into NaNs: a sequence no thread wrote shows
        out = torch.full((len(lens), 32, 128), float("nan")).bfloat16()
        return paged_kernel.decode(q, cache[0], cache[1], batch.block_tables, batch.context_lens, block_size, 0.1, None, out)

    try:
        cpu_decode.start_helpers(0)
        alone = run()
        torch.testing.assert_close(alone.float(), gathered(q.float(), cache[0].float(), cache[1].float(), batch, 0.1, None),
                                   atol=2e-2, rtol=2e-2)  # fmt: skip
        same_with_helpers(run, alone)
    finally:
        lib.moe_paged_amx_select(int(os.environ.get("MOE_RUNTIME_AMX", "1") != "0"))


# -- prefill: several new tokens a sequence ---------------------------------------------------------


def prefill_batch(seqs, block_size, num_blocks, seed):
    """A prefill step: sequence s has seqs[s] = (cached, new) tokens, its blocks scattered."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    out, used = [], 0
    for cached, new in seqs:
        nb = -(-(cached + new) // block_size)
        out.append((perm[used : used + nb], cached, new))
        used += nb
    return build_paged_batch(out, block_size)


# fresh prompts, chunks after a cached prefix (across blocks), a one-token sequence among them
PREFILL_SEQS = [(0, 33), (15, 17), (0, 1), (40, 30), (7, 2), (0, 16)]


@avx512
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "block_size"), GQA_SHAPES)
def test_gqa_prefill_matches_gathered_attention(heads, kv_heads, dim, window, block_size):
    """A step's new tokens (several a sequence, after cached context or not) attend the cache in
    place: what the torch path computes over the gathered, padded context (bfloat16 noise), and
    each sequence's result the same bits as in a step of its own."""
    gen = torch.Generator().manual_seed(heads * dim + (window or 0) + block_size)
    batch = prefill_batch(PREFILL_SEQS, block_size, 64, seed=1)
    cache = torch.randn(2, 64 * block_size, kv_heads, dim, generator=gen).bfloat16()
    N = int(batch.query_start[-1])
    q = torch.randn(N, heads, dim, generator=gen).bfloat16()
    scale = dim**-0.5
    with torch.inference_mode():
        assert layers.PagedContext.build(batch, window).in_place_prefill(q, cache)
        got = paged_kernel.prefill(q, cache[0], cache[1], batch.block_tables, batch.context_lens, batch.query_start,
                                   block_size, scale, window)  # fmt: skip
        want = gathered(q.float(), cache[0].float(), cache[1].float(), batch, scale, window)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
        for s, (cached, new) in enumerate(PREFILL_SEQS):
            rows = slice(int(batch.query_start[s]), int(batch.query_start[s + 1]))
            alone = build_paged_batch([(batch.block_tables[s].tolist(), cached, new)], block_size)
            mine = paged_kernel.prefill(q[rows], cache[0], cache[1], alone.block_tables, alone.context_lens,
                                        alone.query_start, block_size, scale, window)  # fmt: skip
            assert torch.equal(mine, got[rows]), s


@avx512
def test_bfloat16_prefill_shares_its_heads_with_the_helper_threads():
    """The prefill kernel's jobs (a sequence's kv head each) are shared with the helper threads:
    the same bits as alone, and the helpers take part."""
    gen = torch.Generator().manual_seed(6)
    seqs, block_size = [(0, 64), (30, 40), (0, 100), (5, 60)], 16
    batch = prefill_batch(seqs, block_size, 64, seed=7)
    cache = torch.randn(2, 64 * block_size, 4, 64, generator=gen).bfloat16()
    q = torch.randn(int(batch.query_start[-1]), 16, 64, generator=gen).bfloat16()

    def run():  # into NaNs: a head no thread wrote shows
        out = torch.full(q.shape, float("nan")).bfloat16()
        return paged_kernel.prefill(q, cache[0], cache[1], batch.block_tables, batch.context_lens, batch.query_start,
                                    block_size, 0.125, None, out)  # fmt: skip

    from model_runtime.kernels import cpu_decode

    cpu_decode.start_helpers(0)
    with torch.inference_mode():
        alone = run()
        assert not alone.isnan().any()
        same_with_helpers(run, alone)


@avx512
@pytest.mark.parametrize("window", [None, 20])
def test_mla_prefill_attends_the_expanded_context_without_concatenating_it(window):
    """MLA's prefill over its expanded context (kv_b_proj's keys and values per head, the cache's
    one rope key for every head), views as the layer has them: the attention of the concatenated
    keys, causal within each sequence's new tokens after its cached ones (and within the window)."""
    gen = torch.Generator().manual_seed(8)
    S, L, H, P, R, Dv, C = 3, 48, 4, 32, 16, 24, 64
    kvb = torch.randn(S, L, H, P + Dv, generator=gen).bfloat16()
    latents = torch.randn(S, L, C + R, generator=gen).bfloat16()
    k_nope, v = kvb.split([P, Dv], dim=-1)
    k_rope = latents[..., C:]
    lens, new = [40, 17, 48], [40, 5, 1]  # a fresh prompt, a chunk after 12 cached, a one-token sequence
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
    q = torch.randn(sum(new), H, P + R, generator=gen).bfloat16()
    with torch.inference_mode():
        got = paged_kernel.prefill_expanded(q, k_nope, k_rope, v, torch.tensor(lens), starts, 0.2, window)
    want = expanded_attention(q, k_nope, k_rope, v, lens, new, 0.2, window)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="does not fit"):  # the no-rope part not a multiple of 16
        paged_kernel.prefill_expanded(q[..., 8:], k_nope[..., 8:], k_rope, v, torch.tensor(lens), starts, 0.2)


def expanded_attention(q, k_nope, k_rope, v, lens, new, scale, window):
    """MLA's prefill over an expanded context by the definition, in float64: each of sequence s's
    new tokens (q's rows in order) attends its positions up to its own (within the window), the
    keys k_nope [S, L, H, P] with the rope key k_rope [S, L, R] every head shares. -> [N, H, Dv]"""
    H = q.shape[1]
    out, row = [], 0
    for s in range(len(lens)):
        keys = torch.cat([k_nope[s, : lens[s]], k_rope[s, : lens[s], None].expand(-1, H, -1)], -1).double()
        for i in range(new[s]):
            p = lens[s] - new[s] + i
            first = 0 if window is None else max(0, p - window + 1)
            scores = torch.einsum("he,the->ht", q[row].double(), keys[first : p + 1]) * scale
            out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v[s, first : p + 1].double()))
            row += 1
    return torch.stack(out)


@avx512
def test_prefill_refuses_what_it_does_not_take():
    cache = torch.zeros(2, 64, 4, 32, dtype=torch.bfloat16)
    tables, lens, starts = torch.zeros(1, 4, dtype=torch.long), torch.tensor([3]), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="does not fit"):
        paged_kernel.prefill(torch.zeros(3, 6, 32, dtype=torch.bfloat16), cache[0], cache[1], tables, lens, starts,
                             16, 1.0, None)  # fmt: skip
    with pytest.raises(ValueError, match="not all bfloat16"):
        paged_kernel.prefill(torch.zeros(3, 8, 32), cache[0], cache[1], tables, lens, starts, 16, 1.0, None)
    assert not paged_kernel.prefill_applies(torch.zeros(3, 8, 32), cache.float())


@avx512
@pytest.mark.parametrize("name", ["builtin:tiny-mixtral", "builtin:tiny-qwen3-moe", "builtin:tiny-deepseek-v3"])
def test_bf16_model_prefill_matches_gathered_path(name, monkeypatch):
    """A bfloat16 model's prefill (a fresh prompt beside a chunk after a cached prefix) through the
    kernel, in every layer (GQA: the cache read in place; MLA: its expanded context): logits as
    close to float32's as the gathered torch path's."""
    model = load_model(name).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (21, 30)]
    calls = []
    for kernel in ("prefill", "prefill_expanded"):
        real = getattr(paged_kernel, kernel)
        monkeypatch.setattr(paged_kernel, kernel, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))

    def prefill_logits(m, use_kernel):
        if not use_kernel:
            monkeypatch.setattr(paged_kernel, "prefill_applies", lambda *a: False)
        bs = 4
        cache = m.allocate_kv_cache(32, bs)
        tables = [list(range(0, 32, 2)), list(range(1, 32, 2))]
        with torch.no_grad():
            m.forward_paged(torch.tensor(prompts[1][:9]), build_paged_batch([(tables[1], 0, 9)], bs), cache)
            batch = build_paged_batch([(tables[0], 0, len(prompts[0])), (tables[1], 9, len(prompts[1]) - 9)], bs)
            logits = m.forward_paged(torch.tensor(prompts[0] + prompts[1][9:]), batch, cache)
        monkeypatch.setattr(paged_kernel, "prefill_applies", real_applies)
        return logits

    real_applies = paged_kernel.prefill_applies
    got = prefill_logits(model, True)
    assert len(calls) == 2 * model.config.num_hidden_layers, "the in-place kernel did not serve every prefill"
    ref = prefill_logits(model, False)
    exact = prefill_logits(model.float(), True)  # float32: the torch path
    err, ref_err = (got.float() - exact).abs(), (ref.float() - exact).abs()
    assert err.mean() <= 1.15 * ref_err.mean() and err.max() <= 1.5 * ref_err.max()
