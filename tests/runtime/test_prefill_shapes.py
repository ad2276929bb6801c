"""A prefill's matmuls on the CPU: row counts padded to a few buckets (so oneDNN builds each
bfloat16 kernel once, kernels/shapes.py), MLA's choice between absorbing kv_b_proj and expanding
the context, and the fused attention kernel taking MLA's narrower values: each computes what the
plain path computes."""

import pytest
import torch
import torch.nn.functional as F
from test_grouped_experts import per_expert_loop  # the reference: each expert's matmuls in float32
from torch import nn

from model_runtime import load_model
from model_runtime.kernels import cpu_decode, shapes
from model_runtime.kernels.cpu_decode import grouped_experts_layout
from model_runtime.models import model as layers
from model_runtime.models.model import MLP, MLAttention, MoE, sdpa
from model_runtime.models.paged import build_paged_batch

pytestmark = pytest.mark.runtime


def test_row_buckets_are_few_and_waste_little():
    sizes = [shapes.padded_rows(n) for n in range(1, 4097)]
    assert sizes[:16] == list(range(1, 17))  # a decode step's sequences: exact
    assert all(m >= n for n, m in enumerate(sizes, start=1))
    assert sizes == sorted(sizes)
    assert all(shapes.padded_rows(m) == m for m in sizes)  # a bucket is its own bucket
    # at most 15 rows over up to 256, then at most 1/8 more
    assert all(m - n < max(16, n / 8) for n, m in enumerate(sizes, start=1))
    assert len(set(sizes)) == 63
    assert [shapes.padded_rows(n) for n in (17, 250, 257, 1000, 1025)] == [32, 256, 288, 1024, 1152]


@pytest.mark.parametrize("rows", [1, 16, 17, 100, 300, 1000])
def test_padded_linear_is_the_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).bfloat16()
    w, b = torch.randn(48, 64, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
    got = shapes.linear(x, w, b)
    assert got.shape == (rows, 48) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-2, atol=1e-2)
    x3 = x.view(1, rows, 64)  # leading dims kept
    torch.testing.assert_close(shapes.linear(x3, w), F.linear(x3, w), rtol=1e-2, atol=1e-2)
    assert shapes.linear(x.float(), w.float()).dtype == torch.float32  # float32: F.linear as is


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek-v3"])
@pytest.mark.parametrize("tokens", [17, 90, 300])
def test_padded_grouped_experts_compute_the_loop(name, tokens, monkeypatch):
    model = grouped_experts_layout(load_model(f"builtin:{name}", dtype=torch.bfloat16))
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    weights, ids = moe.gate(x)
    runs = []  # the row count of each expert's run in each grouped GEMM
    grouped_mm = F.grouped_mm

    def recording(a, b, offs):
        ends = offs.tolist()
        runs.extend(e - s for s, e in zip([0] + ends[:-1], ends, strict=True))
        return grouped_mm(a, b, offs=offs)

    monkeypatch.setattr(layers.F, "grouped_mm", recording)
    padded, counts = moe.experts(x, weights, ids)
    assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=model.config.num_experts).tolist()
    assert runs and all(shapes.padded_rows(n) == n for n in runs)  # every run a bucket
    assert sum(runs) >= 2 * tokens * model.config.num_experts_per_tok
    reference = per_expert_loop(moe.experts, x, weights, ids)
    torch.testing.assert_close(padded.float(), reference, rtol=5e-2, atol=5e-2)  # bfloat16's rounding
    assert (padded.float() - reference).abs().mean() < 1e-2 * reference.std()

    monkeypatch.setattr(layers.F, "grouped_mm", grouped_mm)
    monkeypatch.setattr(shapes, "buckets", lambda x: False)  # the unpadded grouped GEMM
    unpadded, _ = moe.experts(x, weights, ids)
    torch.testing.assert_close(padded, unpadded, rtol=1e-2, atol=1e-2)


def test_mla_expands_a_prefill_and_absorbs_a_decode():
    attn = next(m for m in load_model("builtin:tiny-deepseek-v3").modules() if isinstance(m, MLAttention))
    assert attn.expands(1, 32, 32, 32)  # a prefill: Q == L
    assert attn.expands(32, 32, 32, 32 * 32)
    assert not attn.expands(32, 1, 512, 32)  # decodes over long contexts
    assert not attn.expands(1, 2, 4096, 2)


def run_steps(model, seqs, schedule, block=4):
    cache = model.allocate_kv_cache(64, block)
    tables = [[s + len(seqs) * j for j in range(-(-len(ids) // block))] for s, ids in enumerate(seqs)]
    done, out = [0] * len(seqs), []
    for step in schedule:
        order = sorted(step)
        batch = build_paged_batch([(tables[s], done[s], step[s]) for s in order], block)
        tokens = torch.tensor([t for s in order for t in seqs[s][done[s] : done[s] + step[s]]])
        with torch.no_grad():
            out.append(model.forward_paged(tokens, batch, cache))
        for s in order:
            done[s] += step[s]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_absorbed_and_expanded_attention_agree(dtype, monkeypatch):
    """Both ways of attending a step's context (forced one way, then the other) give the same
    logits, for prefills, a mixed step and decodes."""
    model = load_model("builtin:tiny-deepseek-v3", dtype=dtype)
    gen = torch.Generator().manual_seed(9)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (22, 9, 14)]
    schedule = [{0: 13, 1: 4}, {0: 8, 1: 1, 2: 10}, {0: 1, 1: 1, 2: 4}]
    results = {}
    for way in (True, False):
        monkeypatch.setattr(MLAttention, "expands", lambda self, S, Q, L, N, way=way: way)
        results[way] = run_steps(model, seqs, schedule)
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    for expanded, absorbed in zip(results[True], results[False], strict=True):
        assert (expanded - absorbed).abs().mean() < tol * absorbed.std()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_pads_narrow_values_for_the_fused_kernel(dtype):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 4, 9, 24, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(2, 4, 9, 8, generator=g).to(dtype)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    got = sdpa(q, k, v, attn_mask=mask, scale=0.3)
    assert got.shape == (2, 4, 9, 8)
    want = torch.softmax((q.float() @ k.float().transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf")), -1) @ v.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek-v3"])
def test_a_mixed_step_reads_the_decodes_in_place(name, monkeypatch):
    """A step of decodes and prefill chunks (bfloat16 on the CPU): the decodes' attention reads the
    cache in place (the kernel is called for them) and the chunks' runs apart, with the logits of
    the whole step padded as one (the path before)."""
    from model_runtime.kernels import paged_attention as paged_kernel
    from model_runtime.models.model import PagedContext

    if not paged_kernel.available():
        pytest.skip("no in-place decode kernel on this CPU")
    model = load_model(f"builtin:{name}", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (13, 10, 30, 20)]
    schedule = [{0: 11, 1: 8}, {0: 1, 1: 1, 2: 13, 3: 20}, {0: 1, 1: 1, 2: 17}]
    calls = []
    decode = paged_kernel.decode
    monkeypatch.setattr(paged_kernel, "decode", lambda q, *a, **k: calls.append(q.shape[0]) or decode(q, *a, **k))
    split = run_steps(model, seqs, schedule)
    layers_ = model.config.num_hidden_layers
    assert calls == [2] * layers_ * 2  # the two mixed steps' two decodes, in every layer
    monkeypatch.setattr(PagedContext, "split_in_place", lambda self, q, cache: None)
    whole = run_steps(model, seqs, schedule)
    for a, b in zip(split, whole, strict=True):
        assert (a - b).abs().mean() < 5e-2 * b.std()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_warm_up_builds_every_bucket_of_a_step_once(monkeypatch):
    monkeypatch.setattr(cpu_decode, "_amx", False)  # as on a CPU without AMX: every bucket is oneDNN's
    monkeypatch.setattr(cpu_decode, "_dpbf16", False)  # nor AVX512-BF16
    model = grouped_experts_layout(load_model("builtin:tiny-deepseek-v3", dtype=torch.bfloat16))
    rows_seen: dict[tuple, set[int]] = {}
    linear, grouped_mm = F.linear, F.grouped_mm

    def recording_linear(x, w, b=None):
        rows_seen.setdefault(tuple(w.shape), set()).add(x.shape[0])
        return linear(x, w, b)

    def recording_grouped(x, w, offs):
        rows_seen.setdefault(("experts", *w.shape), set()).add(x.shape[0])
        return grouped_mm(x, w, offs=offs)

    monkeypatch.setattr(shapes.F, "linear", recording_linear)
    monkeypatch.setattr(shapes.F, "grouped_mm", recording_grouped)
    built, seconds = shapes.warm_up(model, max_rows=100, max_logit_rows=8)
    assert built > 0 and seconds >= 0
    buckets = shapes.row_buckets(100)
    assert buckets[-1] == shapes.padded_rows(100) and buckets[:16] == list(range(1, 17))
    cfg = model.config
    assert rows_seen[(cfg.vocab_size, cfg.hidden_size)] == set(shapes.row_buckets(8))  # the head: a step's sequences
    experts = next(layer.mlp.experts for layer in model.layers if isinstance(layer.mlp, MoE))
    assert rows_seen[("experts", *experts.gate_up_proj.transpose(-2, -1).shape)] == set(buckets)
    attn = model.layers[0].self_attn
    assert rows_seen[tuple(attn.kv_a_proj_with_mqa.weight.shape)] == set(buckets)
    assert built == sum(len(r) for r in rows_seen.values())  # each (weight shape, rows) once

    assert shapes.warm_up(load_model("builtin:tiny-deepseek-v3"), 100, 8)[0] == 0  # float32: nothing to build

    # gate/up fused (cpu_decode.fuse_projections): the whole matrix's buckets, none of its members'
    assert cpu_decode.fuse_projections(model) > 0
    mlp = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MLP))
    members = {id(m) for layer in model.modules() for f in layer.__dict__.get("fused", {}).values() for m in f.members}
    others = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in members}
    rows_seen.clear()
    shapes.warm_up(model, max_rows=100, max_logit_rows=8)
    assert rows_seen[tuple(shapes.fused(mlp, "gate_up").weight.shape)] == set(buckets)
    assert tuple(mlp.gate_proj.weight.shape) in others or tuple(mlp.gate_proj.weight.shape) not in rows_seen

    # large products are left to their first use: the build is a small part of their time
    head_macs = cfg.vocab_size * cfg.hidden_size
    monkeypatch.setattr(shapes, "WARM_MAX_MACS", 4 * head_macs)
    rows_seen.clear()
    shapes.warm_up(model, max_rows=100, max_logit_rows=8)
    assert rows_seen[(cfg.vocab_size, cfg.hidden_size)] == {1, 2, 3, 4}


@pytest.mark.skipif(not (cpu_decode.available() and cpu_decode._amx), reason="this CPU (or OS) runs no AMX")
def test_warm_up_builds_nothing_the_amx_kernels_take(monkeypatch):
    """Where the CPU has AMX, a linear's first AMX_MAX_ROWS rows and the routed experts' every
    token count run the AMX kernels, which build nothing: warm_up builds only the other buckets
    of the linears (one row, a long prefill's)."""
    model = load_model("builtin:tiny-mixtral", dtype=torch.bfloat16)
    assert cpu_decode.use_cpu_decode_kernels(model)
    rows_seen: dict[tuple, set[int]] = {}
    linear = F.linear

    def recording_linear(x, w, b=None):
        rows_seen.setdefault(tuple(w.shape), set()).add(x.shape[0])
        return linear(x, w, b)

    monkeypatch.setattr(shapes.F, "linear", recording_linear)
    monkeypatch.setattr(shapes.F, "grouped_mm", lambda *a, **k: pytest.fail("the experts' grouped GEMM was built"))
    with torch.inference_mode():
        built, _ = shapes.warm_up(model, max_rows=2 * cpu_decode.AMX_MAX_ROWS, max_logit_rows=8)
    taken = [m for m in model.modules() if isinstance(m, nn.Linear)
             and cpu_decode.amx_rows(m.weight.new_zeros(2, m.in_features), m.weight, m.bias)]  # fmt: skip
    assert taken, "no linear of tiny-mixtral fits the tiles"
    for m in taken:
        assert not rows_seen.get(tuple(m.weight.shape), set()) & set(range(2, cpu_decode.AMX_MAX_ROWS + 1))
    assert any(max(rows) > cpu_decode.AMX_MAX_ROWS for rows in rows_seen.values())  # a prefill's: oneDNN's
    assert built == sum(len(r) for r in rows_seen.values())
