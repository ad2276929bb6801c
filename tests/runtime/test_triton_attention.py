"""The GPU's paged decode attention (kernels/triton_attention.py, a Triton kernel), checked on the
CPU by Triton's interpreter (TRITON_INTERPRET=1) against the torch path it replaces on CUDA (gather
the context, then attend): GQA and MLA shapes, ragged contexts across scattered blocks, a sliding
window, float32 and bfloat16; and whole models decoding with it, whose logits are the gathered
path's. tests/gpu runs it compiled on a device."""


import child_pytest
import pytest
import torch
from test_paged_attention_kernel import (
    LENS,
    PREFILL_SEQS,
    decode_batch,
    decode_logits,
    expanded_attention,
    gathered,
    prefill_batch,
)

from model_runtime import load_model
from model_runtime.kernels import paged_attention as paged_kernel
from model_runtime.kernels import triton_attention
from model_runtime.models import model as layers
from model_runtime.models.paged import build_paged_batch

pytestmark = [
    pytest.mark.runtime,
    pytest.mark.skipif(not triton_attention.available(), reason="Triton does not import here"),
]


# Triton's interpreter must be on before Triton is first imported (its library's own jitted helpers,
# tl.max and tl.sum among them, are built then): the tests run in a child pytest started with
# TRITON_INTERPRET=1, which this module's one test in the parent process starts and reads.
INTERPRETED = triton_attention.interpreting()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the child pytest under TRITON_INTERPRET=1")
PARENT = "the parent pytest's: Triton compiling, not interpreting"
parent = pytest.mark.skipif(INTERPRETED, reason=PARENT)


@parent
def test_the_kernel_passes_its_tests_under_tritons_interpreter(tmp_path):
    passed, skipped = child_pytest.run([__file__], {"TRITON_INTERPRET": "1"}, tmp_path / "report.xml", timeout=600)
    assert skipped and all(PARENT in why for why in skipped.values()), skipped  # only the parent's
    assert len(passed) >= 52, passed


@parent
@pytest.mark.parametrize("capability", [80, 90])  # A100, H100
@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "dim", "rope", "splits"),
    [
        ("bf16", 32, 8, 128, 0, 1),  # Mixtral: GQA, a program a context
        ("bf16", 32, 8, 128, 0, 4),  # the context shared by four programs
        ("bf16", 128, 1, 512, 64, 8),  # DeepSeek-V3's MLA: 512 latent + 64 rope columns
        ("fp32", 12, 4, 40, 0, 2),  # float32 (IEEE products), odd head size
        ("fp16", 16, 16, 64, 0, 1),
    ],
)
def test_the_kernel_compiles_for_the_gpus_it_serves(capability, dtype, heads, kv_heads, dim, rope, splits):
    """Triton compiles the kernel ahead of time for an sm_80 / sm_90 target to a cubin (its bundled
    ptxas; no GPU needed), with the constants decode() launches it with: what the interpreter does
    not check (types, shapes tl.dot takes, shared memory) is checked here."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert triton_attention._import()
    constants = {
        **triton_attention._tiles(heads, kv_heads, dim, rope, dim),
        "SPLITS": splits, "HAS_ROPE": bool(rope), "WIDEN": dtype == "fp32",
    }  # fmt: skip
    signature = {name: f"*{dtype}" for name in ("Q", "QR", "K", "V", "OUT")}
    signature |= {"TABLES": "*i32", "LENS": "*i32", "PART": "*fp32", "PML": "*fp32", "scale": "fp32"}
    signature |= {name: "i32" for name in ("sq_s", "sq_h", "sqr_s", "sqr_h", "sk_slot", "sk_head", "sv_slot",
                                           "sv_head", "st_s", "so_s", "so_h", "window", "block_size")}  # fmt: skip
    signature |= {name: "constexpr" for name in constants}
    kernel = triton.jit(triton_attention._paged_decode)
    assert set(signature) == set(kernel.arg_names)
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", capability, 32))
    assert compiled.asm["cubin"] and f"sm_{capability}" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= 99 * 1024  # fits an A100's / H100's shared memory per block
    if splits > 1:  # and the kernel that joins the splits
        join = triton.jit(triton_attention._join_splits)
        constants = {"H": heads, "EV": dim, "SPLITS": splits, "BLOCK_S": triton_attention._block(splits),
                     "BLOCK_EV": triton_attention._block(dim)}  # fmt: skip
        signature = {"PART": "*fp32", "PML": "*fp32", "OUT": f"*{dtype}", "so_s": "i32", "so_h": "i32"}
        signature |= {name: "constexpr" for name in constants}
        assert set(signature) == set(join.arg_names)
        assert triton.compile(ASTSource(join, signature, constants), target=GPUTarget("cuda", capability, 32)).asm["cubin"]
    for block_m in (16, 64):  # a step of short chunks, of long prompts; MLA's expanded context dense
        prefill = triton.jit(triton_attention._paged_prefill)
        nope = 128 if rope else dim  # MLA: DeepSeek-V3's expanded heads, 128 + 64 rope, values 128
        constants = {"G": 1 if rope else heads // kv_heads, "E1": nope, "E2": max(rope, 1), "EV": nope,
                     "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_E1": triton_attention._block(nope),
                     "BLOCK_E2": triton_attention._block(rope), "BLOCK_EV": triton_attention._block(nope),
                     "HAS_ROPE": bool(rope), "DENSE": bool(rope), "WIDEN": dtype == "fp32"}  # fmt: skip
        signature = {name: f"*{dtype}" for name in ("Q", "K", "KR", "V", "OUT")}
        signature |= {"TABLES": "*i32", "LENS": "*i32", "STARTS": "*i32", "scale": "fp32"}
        signature |= {name: "i32" for name in ("sq_n", "sq_h", "sk_slot", "sk_head", "skr_slot", "skr_head", "sv_slot",
                                               "sv_head", "st_s", "so_n", "so_h", "window", "block_size",
                                               "dense_len")}  # fmt: skip
        signature |= {name: "constexpr" for name in constants}
        assert set(signature) == set(prefill.arg_names)
        compiled = triton.compile(ASTSource(prefill, signature, constants), target=GPUTarget("cuda", capability, 32))
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 99 * 1024


@parent
def test_a_kernel_that_cannot_launch_leaves_the_step_to_the_torch_path(monkeypatch, caplog):
    """Where the compiled kernel cannot run (here: CPU tensors, no GPU driver), the call is answered
    by the torch path, the failure logged once, and applies() says no from then on."""
    monkeypatch.setattr(triton_attention, "_failed", None)
    monkeypatch.setenv("MOE_RUNTIME_TRITON_ATTENTION", "1")
    gen = torch.Generator().manual_seed(3)
    batch = decode_batch(LENS, 16, 64, seed=3)
    cache = torch.randn(2, 64 * 16, 2, 32, generator=gen)
    q = torch.randn(len(LENS), 8, 32, generator=gen)
    with caplog.at_level("WARNING", logger=triton_attention.__name__):
        got = triton_attention.decode(q, cache[0], cache[1], batch.block_tables, batch.context_lens, 16, 0.2, None)
    assert triton_attention._failed and "the gathered torch path serves" in caplog.text
    torch.testing.assert_close(got, gathered(q, cache[0], cache[1], batch, 0.2, None), atol=1e-5, rtol=1e-4)
    assert not triton_attention.available()
    monkeypatch.setattr(triton_attention, "interpreting", lambda: True)  # even where it would apply
    assert not triton_attention.applies(q, cache, 1, True)


GQA_SHAPES = [
    (8, 4, 32, None, 16),  # Mixtral-style GQA
    (8, 8, 64, None, 16),  # one query head per kv head
    (6, 2, 40, None, 16),  # head_dim not a power of two (masked columns)
    (8, 4, 32, 20, 16),  # a sliding window shorter than some contexts
    (16, 1, 32, 20, 5),  # 16 query heads on one kv head, a window, an odd block size
    (80, 1, 32, None, 16),  # more query heads a kv head than one program's block (two blocks)
]


@interpreted
@pytest.mark.parametrize("splits", [1, 3])  # one program a context, or three sharing it (some empty)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "block_size"), GQA_SHAPES)
def test_gqa_decode_matches_gathered_attention(heads, kv_heads, dim, window, block_size, dtype, splits):
    gen = torch.Generator().manual_seed(heads * dim + (window or 0) + block_size)
    batch = decode_batch(LENS, block_size, 64, seed=block_size)
    cache = (torch.randn(2, 64 * block_size, kv_heads, dim, generator=gen) * 2).to(dtype)
    q = (torch.randn(len(LENS), heads, dim, generator=gen) * 2).to(dtype)
    scale = dim**-0.5
    assert paged_kernel.applies(q, cache, 1, True)
    got = triton_attention.decode(q, cache[0], cache[1], batch.block_tables, batch.context_lens, block_size, scale,
                                  window, splits=splits)  # fmt: skip
    if splits == 1:  # what the model calls on the CPU under the interpreter: the same kernel
        same = paged_kernel.decode(q, cache[0], cache[1], batch.block_tables, batch.context_lens, block_size, scale, window)
        torch.testing.assert_close(same, got, atol=0, rtol=0)
    exact = gathered(q.double(), cache[0].double(), cache[1].double(), batch, scale, window)
    assert got.shape == (len(LENS), heads, dim) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-4)
    else:  # float32 scores and softmax; the output rounded to bfloat16 once
        torch.testing.assert_close(got.double(), exact, atol=4e-2, rtol=2e-2)
    wrong = decode_batch(LENS, block_size, 64, seed=block_size + 1)  # other blocks: far off
    assert not torch.allclose(gathered(q.double(), cache[0].double(), cache[1].double(), wrong, scale, window),
                              got.double(), atol=5e-2)  # fmt: skip


@interpreted
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_reads_latent_rows_in_place(dtype, splits):
    """MLA's absorbed decode as the model calls it: the keys whole cache rows [C + R], the values
    their first C columns, the queries' rope part apart, the output into a head-major buffer's
    transposed view."""
    C, R, H, bs = 512, 64, 16, 16
    gen = torch.Generator().manual_seed(8)
    batch = decode_batch(LENS, bs, 64, seed=4)
    cache = torch.randn(64 * bs, C + R, generator=gen).to(dtype)
    q = (torch.randn(len(LENS), H, C + R, generator=gen) * 0.2).to(dtype)
    rows = cache[:, None, :]
    out = torch.full((H, len(LENS), C), float("nan"), dtype=dtype)
    got = triton_attention.decode(
        q[..., :C], rows, rows[..., :C], batch.block_tables, batch.context_lens, bs, 0.07, None,
        out=out.transpose(0, 1), q_rope=q[..., C:], splits=splits,
    )  # fmt: skip
    want = gathered(q.double(), rows.double(), rows.double(), batch, 0.07, None)[..., :C]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.transpose(0, 1).double(), want, atol=tol, rtol=tol)
    assert got.data_ptr() == out.data_ptr()


@interpreted
def test_the_kernel_refuses_what_does_not_fit():
    q = torch.zeros(2, 8, 32)
    cache = torch.zeros(2, 64, 4, 32)
    tables, lens = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit keys"):
        triton_attention.decode(q, cache[0][..., :16], cache[1], tables, lens, 16, 1.0, None)
    with pytest.raises(ValueError, match="not one float dtype"):
        triton_attention.decode(q, cache[0].bfloat16(), cache[1], tables, lens, 16, 1.0, None)
    assert not triton_attention.applies(q, cache.bfloat16(), 1, True)  # a cache of another dtype
    assert not triton_attention.applies(q, cache, 2, True)  # several new tokens: not a decode


@interpreted
@pytest.mark.parametrize("name", ["builtin:tiny-mixtral", "builtin:tiny-deepseek-v3"])
def test_a_model_decoding_with_the_kernel_gives_the_gathered_paths_logits(name, monkeypatch):
    """A float32 model's decode steps after a prefill and a cached prefix: every step's attention in
    every layer is the Triton kernel's, and the logits are the gathered torch path's."""
    model = load_model(name)
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 14)]
    follow = torch.randint(0, 256, (6, 2), generator=gen)
    calls = []
    real = triton_attention.decode
    monkeypatch.setattr(triton_attention, "decode", lambda *a: calls.append(1) or real(*a))
    got = decode_logits(model, prompts, follow, True, monkeypatch)
    assert len(calls) == 6 * model.config.num_hidden_layers
    ref = decode_logits(model, prompts, follow, False, monkeypatch)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("name", ["builtin:tiny-mixtral", "builtin:tiny-deepseek-v3"])
def test_a_mixed_steps_decodes_take_the_kernel_and_its_prompt_the_gathered_path(name, monkeypatch):
    """A step of two decodes and a new prompt's chunk (as the scheduler orders them): the decodes'
    attention is the kernel's, a call per layer for those two rows only, the chunk's the gathered
    path's; the step's logits are those of the gathered path for all of it."""
    model = load_model(name)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 11)]
    chunk = torch.randint(0, 256, (5,), generator=gen)
    nxt = torch.randint(0, 256, (2,), generator=gen)
    tables = [list(range(0, 30, 3)), list(range(1, 30, 3)), list(range(2, 30, 3))]

    def mixed_step(use_kernel):
        cache = model.allocate_kv_cache(32, 4)
        with torch.no_grad():
            first = build_paged_batch([(tables[0], 0, 6), (tables[1], 0, 11)], 4)
            model.forward_paged(torch.tensor(prompts[0] + prompts[1]), first, cache)
            if not use_kernel:
                monkeypatch.setattr(paged_kernel, "applies", lambda *a: False)
            step = build_paged_batch([(tables[0], 6, 1), (tables[1], 11, 1), (tables[2], 0, 5)], 4)
            return model.forward_paged(torch.cat([nxt, chunk]), step, cache)

    rows = []
    real = triton_attention.decode
    monkeypatch.setattr(triton_attention, "decode", lambda q, *a, **k: rows.append(q.shape[0]) or real(q, *a, **k))
    got = mixed_step(True)
    assert rows == [2] * model.config.num_hidden_layers
    want = mixed_step(False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "block_size"), GQA_SHAPES)
def test_gqa_prefill_matches_gathered_attention(heads, kv_heads, dim, window, block_size, dtype):
    """A step's new tokens (fresh prompts, chunks after a cached prefix, a one-token sequence among
    them) attend the cache in place, causally, no sequence padded: the gathered path's result, and
    each sequence's rows the same as in a step of its own."""
    gen = torch.Generator().manual_seed(heads * dim + (window or 0) + block_size)
    batch = prefill_batch(PREFILL_SEQS, block_size, 64, seed=1)
    cache = (torch.randn(2, 64 * block_size, kv_heads, dim, generator=gen) * 2).to(dtype)
    N = int(batch.query_start[-1])
    q = (torch.randn(N, heads, dim, generator=gen) * 2).to(dtype)
    scale = dim**-0.5
    ctx = layers.PagedContext.build(batch, window)
    assert ctx.in_place_prefill(q, cache)
    got = ctx.prefill_in_place(q, cache[0], cache[1], scale)
    exact = gathered(q.double(), cache[0].double(), cache[1].double(), batch, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(got.double(), exact, atol=tol, rtol=tol)
    for s, (cached, new) in enumerate(PREFILL_SEQS):
        rows = slice(int(batch.query_start[s]), int(batch.query_start[s + 1]))
        alone = build_paged_batch([(batch.block_tables[s].tolist(), cached, new)], block_size)
        mine = triton_attention.prefill(q[rows], cache[0], cache[1], alone.block_tables, alone.context_lens,
                                        alone.query_start, block_size, scale, window, new)  # fmt: skip
        torch.testing.assert_close(mine, got[rows])  # blocks of other sizes: rounding apart


@interpreted
@pytest.mark.parametrize("name", ["builtin:tiny-mixtral", "builtin:tiny-qwen3-moe"])
def test_a_models_prefill_with_the_kernel_gives_the_gathered_paths_logits(name, monkeypatch):
    """A float32 model's prefill step (a fresh prompt beside a chunk after a cached prefix): every
    layer's attention is the kernel's, the logits the gathered torch path's."""
    model = load_model(name)
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (21, 30)]
    tables = [list(range(0, 32, 2)), list(range(1, 32, 2))]

    def prefill_logits(use_kernel):
        cache = model.allocate_kv_cache(32, 4)
        if not use_kernel:
            monkeypatch.setattr(paged_kernel, "prefill_applies", lambda *a: False)
        with torch.no_grad():
            model.forward_paged(torch.tensor(prompts[1][:9]), build_paged_batch([(tables[1], 0, 9)], 4), cache)
            batch = build_paged_batch([(tables[0], 0, 21), (tables[1], 9, 21)], 4)
            return model.forward_paged(torch.tensor(prompts[0] + prompts[1][9:]), batch, cache)

    calls = []
    real = triton_attention.prefill
    monkeypatch.setattr(triton_attention, "prefill", lambda *a, **k: calls.append(a[9]) or real(*a, **k))
    got = prefill_logits(True)
    layers_ = model.config.num_hidden_layers
    assert calls == [9] * layers_ + [21] * layers_  # max_new (the grid's size), known on the host
    want = prefill_logits(False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 9])
def test_mla_prefill_attends_the_expanded_context_as_it_lies(window, dtype):
    """MLA's prefill over its expanded context (kv_b_proj's keys and values per head, the cache's
    one rope key for every head, views as the layer has them, a nope part of 24: not a multiple of
    16): the attention of the concatenated keys, causal after each sequence's cached tokens."""
    gen = torch.Generator().manual_seed(8)
    S, L, H, P, R, Dv, C = 3, 48, 4, 24, 16, 40, 64
    kvb = torch.randn(S, L, H, P + Dv, generator=gen).to(dtype)
    latents = torch.randn(S, L, C + R, generator=gen).to(dtype)
    k_nope, v = kvb.split([P, Dv], dim=-1)
    k_rope = latents[..., C:]
    lens, new = [40, 17, 48], [40, 5, 1]  # a fresh prompt, a chunk after 12 cached, a one-token sequence
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
    q = torch.randn(sum(new), H, P + R, generator=gen).to(dtype)
    got = paged_kernel.prefill_expanded(q, k_nope, k_rope, v, torch.tensor(lens), starts, 0.2, window, max_new=40)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    want = expanded_attention(q, k_nope, k_rope, v, lens, new, 0.2, window)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@interpreted
def test_an_mla_models_prefill_takes_the_expanded_kernel_with_the_gathered_paths_logits(monkeypatch):
    model = load_model("builtin:tiny-deepseek-v3")
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (21, 30)]
    tables = [list(range(0, 32, 2)), list(range(1, 32, 2))]

    def prefill_logits(use_kernel):
        cache = model.allocate_kv_cache(32, 4)
        if not use_kernel:
            monkeypatch.setattr(paged_kernel, "prefill_expanded_applies", lambda *a: False)
        with torch.no_grad():
            model.forward_paged(torch.tensor(prompts[1][:9]), build_paged_batch([(tables[1], 0, 9)], 4), cache)
            batch = build_paged_batch([(tables[0], 0, 21), (tables[1], 9, 21)], 4)
            return model.forward_paged(torch.tensor(prompts[0] + prompts[1][9:]), batch, cache)

    calls = []
    real = triton_attention.prefill_expanded
    monkeypatch.setattr(triton_attention, "prefill_expanded", lambda *a, **k: calls.append(a[8]) or real(*a, **k))
    got = prefill_logits(True)
    layers_ = model.config.num_hidden_layers
    assert calls == [9] * layers_ + [21] * layers_
    want = prefill_logits(False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
