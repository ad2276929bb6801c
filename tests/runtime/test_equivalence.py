"""The runtime computes what transformers computes, for each supported architecture.

transformers builds a tiny random model (routing made non-trivial, DeepSeek-V3's score-correction
bias randomised), `save_pretrained` writes it, `load_model` loads it: float32 logits agree to 1e-4
and 32 greedy tokens (our paged decode against transformers' `generate`) are identical.
"""

import pytest
import torch

from model_runtime import load_model
from model_runtime.models.paged import build_paged_batch

pytestmark = pytest.mark.runtime
transformers = pytest.importorskip("transformers")

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=None,
)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


def hf_models():
    t = transformers
    return {
        "mixtral": (
            t.MixtralForCausalLM,
            t.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2),
        ),
        "mixtral-sliding-window": (
            t.MixtralForCausalLM,
            t.MixtralConfig(
                **COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=6
            ),
        ),
        "qwen2-moe": (
            t.Qwen2MoeForCausalLM,
            t.Qwen2MoeConfig(
                **COMMON,
                num_key_value_heads=2,
                num_experts=8,
                num_experts_per_tok=3,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                mlp_only_layers=[1],
                norm_topk_prob=False,
            ),
        ),
        "qwen3-moe": (
            t.Qwen3MoeForCausalLM,
            t.Qwen3MoeConfig(
                **COMMON,
                num_key_value_heads=2,
                head_dim=12,
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                norm_topk_prob=True,
                decoder_sparse_step=2,
            ),
        ),
        "deepseek-v2": (
            t.DeepseekV2ForCausalLM,
            t.DeepseekV2Config(
                **COMMON,
                **MLA,
                q_lora_rank=None,
                n_routed_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                n_shared_experts=2,
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                routed_scaling_factor=1.5,
                first_k_dense_replace=1,
            ),
        ),
        "deepseek-v3": (
            t.DeepseekV3ForCausalLM,
            t.DeepseekV3Config(
                **COMMON,
                **MLA,
                q_lora_rank=24,
                n_routed_experts=16,
                num_experts_per_tok=4,
                moe_intermediate_size=16,
                n_shared_experts=1,
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                first_k_dense_replace=1,
                rope_parameters=YARN,
            ),
        ),
    }


def randomise(model, seed):
    """Weights with O(1) activations (transformers' init is too small for routing to matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # starts at zero: make it steer the choice
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


@pytest.fixture(scope="module", params=list(hf_models()))
def pair(request, tmp_path_factory):
    cls, cfg = hf_models()[request.param]
    torch.manual_seed(0)
    ref = cls(cfg).eval()
    randomise(ref, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    # one architecture goes through a sharded checkpoint with an index
    ref.save_pretrained(path, max_shard_size="40KB" if request.param == "deepseek-v3" else "1GB")
    return request.param, ref, load_model(path), path


def test_sharded_checkpoint_is_written_for_one_architecture(pair):
    name, _, _, path = pair
    if name == "deepseek-v3":
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 1


def test_logits_match_transformers(pair):
    _, ref, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_routing_is_not_trivial(pair):
    _, _, ours, _ = pair
    ours.reset_expert_token_counts()
    with torch.no_grad():
        ours(torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5)))
    for counts in ours.expert_token_counts().values():
        assert sum(c > 0 for c in counts) >= len(counts) // 2  # tokens spread over many experts


def greedy_paged(model, prompt, steps, block_size=8):
    """Greedy decoding through forward_paged: one prefill step, then one token per step."""
    blocks = list(range((len(prompt) + steps + block_size - 1) // block_size))
    cache = model.allocate_kv_cache(len(blocks), block_size)
    tokens, out = list(prompt), []
    with torch.no_grad():
        batch = build_paged_batch([(blocks, 0, len(prompt))], block_size)
        logits = model.forward_paged(torch.tensor(prompt), batch, cache)
        for _ in range(steps):
            out.append(int(logits[0].argmax()))
            tokens.append(out[-1])
            batch = build_paged_batch([(blocks, len(tokens) - 1, 1)], block_size)
            logits = model.forward_paged(torch.tensor(tokens[-1:]), batch, cache)
    return out


def test_greedy_tokens_match_transformers_generate(pair):
    _, ref, ours, _ = pair
    prompt = torch.randint(1, VOCAB, (9,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.no_grad():
        generated = ref.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0
        )
    expected = generated[0, len(prompt) :].tolist()
    assert len(expected) == 32
    assert greedy_paged(ours, prompt, 32) == expected


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_transformers_reads_exported_builtins(name, tmp_path):
    """The builtins are real instances of their architectures: transformers computes the same."""
    from model_runtime.models.loading import save_checkpoint

    ours = load_model(f"builtin:{name}")
    save_checkpoint(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
