"""ModelConfig from Hugging Face config.json files: each architecture's small differences."""

import pytest

from model_runtime.models.config import PRESETS, ModelConfig, UnsupportedModelError

pytestmark = pytest.mark.unit

BASE = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4
)


def test_mixtral():
    cfg = ModelConfig.from_hf(
        {
            **BASE,
            "architectures": ["MixtralForCausalLM"],
            "num_key_value_heads": 2,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "rope_theta": 1e6,
            "sliding_window": None,
            "eos_token_id": 2,
        }
    )
    assert cfg.attention == "gqa" and cfg.head_dim == 16 and cfg.num_key_value_heads == 2
    assert cfg.num_experts == 8 and cfg.moe_intermediate_size == 128 and cfg.norm_topk_prob
    assert cfg.scoring_func == "softmax" and cfg.dense_layers == () and cfg.rope_theta == 1e6
    assert cfg.eos_token_ids == {2}


def test_qwen2_moe_shared_gated_expert_and_dense_layers():
    cfg = ModelConfig.from_hf(
        {
            **BASE,
            "architectures": ["Qwen2MoeForCausalLM"],
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 96,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [3],
            "eos_token_id": [5, 6],
        }
    )
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm
    assert cfg.shared_expert_intermediate_size == 96 and cfg.shared_expert_gate
    assert cfg.dense_layers == (0, 2, 3, 4)  # (i + 1) % step != 0, plus mlp_only_layers
    assert cfg.eos_token_ids == {5, 6} and not cfg.norm_topk_prob


def test_qwen3_moe_qk_norm_and_transformers5_names():
    cfg = ModelConfig.from_hf(
        {
            **BASE,
            "model_type": "qwen3_moe",
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "head_dim": 32,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        }
    )
    assert cfg.architecture == "Qwen3MoeForCausalLM" and cfg.qk_norm and cfg.head_dim == 32
    assert cfg.num_experts == 8 and cfg.norm_topk_prob and cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    assert cfg.shared_expert_intermediate_size == 0


DEEPSEEK = dict(
    BASE,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    moe_intermediate_size=32,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_shared_experts=2,
)


def test_deepseek_v2_group_limited_greedy():
    cfg = ModelConfig.from_hf(
        {
            **DEEPSEEK,
            "architectures": ["DeepseekV2ForCausalLM"],
            "q_lora_rank": None,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 2,
            "routed_scaling_factor": 16.0,
        }
    )
    assert cfg.attention == "mla" and cfg.q_lora_rank is None and cfg.rope_interleave
    assert cfg.scoring_func == "softmax" and cfg.topk_method == "group_limited_greedy"
    assert cfg.dense_layers == (0, 1, 3, 5) and cfg.routed_scaling_factor == 16.0
    assert cfg.shared_expert_intermediate_size == 64
    assert cfg.kv_cache_elems_per_token_per_layer() == 32 + 16  # latent + rope key, not K and V


def test_deepseek_v3_sigmoid_routing_and_yarn_from_legacy_keys():
    cfg = ModelConfig.from_hf(
        {
            **DEEPSEEK,
            "architectures": ["DeepseekV3ForCausalLM"],
            "q_lora_rank": 48,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 3,
            "routed_scaling_factor": 2.5,
            "rope_theta": 10000,
            "rope_scaling": {
                "type": "yarn",
                "factor": 40,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32,
                "beta_slow": 1,
            },
        }
    )
    assert cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc" and cfg.norm_topk_prob
    assert cfg.n_group == 4 and cfg.topk_group == 2 and cfg.dense_layers == (0, 1, 2)
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 40
    assert cfg.qk_head_dim == 32 and cfg.rope_dim == 16


def test_unsupported_things_are_named():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        ModelConfig.from_hf({**BASE, "architectures": ["LlamaForCausalLM"]}, source="/m/config.json")
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        ModelConfig.from_hf(
            {
                **BASE,
                "architectures": ["MixtralForCausalLM"],
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
            }
        )
    with pytest.raises(UnsupportedModelError, match="sliding"):
        ModelConfig.from_hf(
            {
                **BASE,
                "architectures": ["Qwen2MoeForCausalLM"],
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 8,
                "use_sliding_window": True,
                "sliding_window": 16,
            }
        )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_config_json(name):
    cfg = ModelConfig.from_name(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError, match="tiny-mixtral"):
        ModelConfig.from_name("huge")
