"""forward_paged over a paged KV cache computes what forward() computes, for GQA and MLA models,
whatever the chunking, batching and block placement."""

import pytest
import torch

from model_runtime import load_model
from model_runtime.models.paged import build_paged_batch

pytestmark = pytest.mark.runtime

BLOCK = 4
MODELS = ["builtin:tiny-mixtral", "builtin:tiny-qwen3-moe", "builtin:tiny-deepseek-v3"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return load_model(request.param)


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]  # [T, V]


def run_schedule(model, seqs, schedule, num_blocks=64):
    """Feed each sequence's tokens in the chunks `schedule` gives: a list of steps, each a dict
    {seq index: number of new tokens}. Returns, per sequence, the logits of each step's last token
    keyed by its position."""
    cache = model.allocate_kv_cache(num_blocks, BLOCK)
    # scatter blocks: sequence s gets blocks s, s + S, s + 2S, ... (non-contiguous, interleaved)
    S = len(seqs)
    tables = [[s + S * j for j in range((len(ids) + BLOCK - 1) // BLOCK)] for s, ids in enumerate(seqs)]
    done = [0] * S
    got = [dict() for _ in seqs]
    for step in schedule:
        order = sorted(step)
        batch = build_paged_batch([(tables[s], done[s], step[s]) for s in order], BLOCK)
        tokens = torch.tensor([t for s in order for t in seqs[s][done[s] : done[s] + step[s]]])
        with torch.no_grad():
            logits = model.forward_paged(tokens, batch, cache)
        assert logits.shape == (len(order), model.config.vocab_size) and logits.dtype == torch.float32
        for row, s in enumerate(order):
            done[s] += step[s]
            got[s][done[s] - 1] = logits[row]
    return got


def test_chunked_prefill_then_decode_matches_forward(model):
    ids = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    schedule = [{0: 7}, {0: 5}, {0: 1}] + [{0: 1}] * 10  # two prefill chunks, then decode
    got = run_schedule(model, [ids], schedule)[0]
    ref = full_logits(model, ids)
    assert sorted(got) == [6, 11] + list(range(12, 23))
    for pos, logits in got.items():
        torch.testing.assert_close(logits, ref[pos], atol=1e-4, rtol=1e-4)


def test_long_prefill_chunks_match_forward(model):
    """Chunks long enough that MLA expands the cached latents instead of absorbing kv_b_proj."""
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (91, 12)]
    schedule = [{0: 45}, {0: 40, 1: 11}, {0: 5, 1: 1}, {0: 1}]
    got = run_schedule(model, seqs, schedule, num_blocks=96)
    for ids, per_pos in zip(seqs, got, strict=True):
        ref = full_logits(model, ids)
        for pos, logits in per_pos.items():
            torch.testing.assert_close(logits, ref[pos], atol=1e-4, rtol=1e-4)


def test_mixed_batch_of_prefills_and_decodes_matches_forward(model):
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (12, 15, 6)]
    schedule = [
        {0: 9, 1: 3},  # a whole prompt and a first chunk
        {0: 1, 1: 8, 2: 2},  # decode, a middle chunk, a new prompt's chunk
        {0: 1, 1: 3, 2: 3},  # decode, the last chunk, the rest of a prompt
        {0: 1, 1: 1, 2: 1},  # all decode (the fast path)
    ]
    got = run_schedule(model, seqs, schedule)
    for ids, per_pos in zip(seqs, got, strict=True):
        ref = full_logits(model, ids[: max(per_pos) + 1])
        for pos, logits in per_pos.items():
            torch.testing.assert_close(logits, ref[pos], atol=1e-4, rtol=1e-4)


def test_batched_forward_rows_are_independent(model):
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = model(ids)
    for b in range(3):
        torch.testing.assert_close(batched[b], full_logits(model, ids[b].tolist()), atol=1e-5, rtol=1e-5)


def test_kv_cache_bytes_per_token(model):
    cfg = model.config
    cache = model.allocate_kv_cache(3, BLOCK)
    assert len(cache) == cfg.num_hidden_layers
    per_token = sum(t.numel() * t.element_size() for t in cache) // (3 * BLOCK)
    assert model.kv_cache_bytes_per_token(torch.float32) == per_token
    assert model.kv_cache_bytes_per_token(torch.bfloat16) == per_token // 2
    if cfg.attention == "mla":  # only the latent and the rope key are cached
        assert per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_expert_token_counts(model):
    model.reset_expert_token_counts()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 6)))
    counts = model.expert_token_counts()
    cfg = model.config
    assert sorted(counts) == [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    for per_expert in counts.values():
        assert len(per_expert) == cfg.num_experts
        assert sum(per_expert) == 2 * 6 * cfg.num_experts_per_tok
    model.reset_expert_token_counts()
    assert all(sum(c) == 0 for c in model.expert_token_counts().values())


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_paged_steps_track_forward(cache_dtype):
    model = load_model("builtin:tiny-deepseek-v3", dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(6)).tolist()
    cache = model.allocate_kv_cache(8, BLOCK, dtype=cache_dtype)
    assert all(t.dtype == cache_dtype for t in cache)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]  # [T, V]
        blocks = list(range(8))
        model.forward_paged(torch.tensor(ids[:20]), build_paged_batch([(blocks, 0, 20)], BLOCK), cache)
        steps = [
            model.forward_paged(torch.tensor([ids[p]]), build_paged_batch([(blocks, p, 1)], BLOCK), cache)[0]
            for p in range(20, 30)
        ]
    got = torch.stack(steps)  # [10, V]
    assert torch.isfinite(got).all()
    assert (got - ref[20:]).abs().mean() < 0.05 * ref.std()  # bf16 rounding differs between the paths
    assert (got.argmax(-1) == ref[20:].argmax(-1)).float().mean() >= 0.8
