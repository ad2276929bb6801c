"""The supported Hugging Face architectures, one table entry each: what an architecture's
`config.json` holds beyond the fields all of them share (read into ModelConfig's fields and written
back), and how its checkpoint names our parameters. Adding an architecture is adding an entry
here (and, if it brings a new mechanism, a part of models/model.py).

Every architecture shares: vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, head_dim, intermediate_size, hidden_act, rms_norm_eps,
max_position_embeddings, tie_word_embeddings, the bos/eos/pad token ids and the rope parameters
(models/config.py reads and writes those). Checkpoint tensors are named as our parameters with a
`model.` prefix (except `lm_head`), after the entry's renames; each expert's three matrices are
separate tensors `...mlp.experts.{e}.{leaf}.weight`, with the entry's leaf names.

The entries' functions take and give plain dicts (and read a ModelConfig's attributes), so that
models/config.py can use this table without this module knowing the dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented by this runtime."""


# The leaf names of an expert's gate, up and down matrices in most checkpoints.
PROJ_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json `architectures[0]`
    model_type: str  # config.json `model_type` (transformers 5 may give only this)
    fields_from_hf: Callable[[dict[str, Any], str], dict[str, Any]]  # (config.json, source) -> fields
    fields_to_hf: Callable[[Any], dict[str, Any]]  # ModelConfig -> config.json entries (after model_type)
    default_rope_theta: float = 10000.0
    renames: tuple[tuple[str, str], ...] = ()  # (checkpoint, ours) parts of tensor names
    # part ("gate", "up", "down") -> the checkpoint's leaf name of that expert matrix
    expert_names: dict[str, str] = field(default_factory=lambda: dict(PROJ_NAMES))

    def expert_part(self, leaf: str) -> str | None:
        """The part ("gate", "up", "down") a checkpoint's expert leaf name holds, if it is one."""
        return next((part for part, name in self.expert_names.items() if name == leaf), None)

    def param_name(self, checkpoint_name: str) -> str:
        """Our name for a checkpoint tensor name (without the `model.` prefix)."""
        for theirs, ours in self.renames:
            checkpoint_name = checkpoint_name.replace(theirs, ours)
        return checkpoint_name

    def checkpoint_name(self, param_name: str) -> str:
        """The checkpoint's name for one of our parameter names (without the `model.` prefix)."""
        for theirs, ours in self.renames:
            param_name = param_name.replace(ours, theirs)
        return param_name


# ---- Mixtral -----------------------------------------------------------------------------------


def _mixtral_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    return dict(
        sliding_window=hf.get("sliding_window"),
        num_experts=hf["num_local_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["intermediate_size"],
        norm_topk_prob=True,
    )


def _mixtral_to_hf(c) -> dict[str, Any]:
    return dict(
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        num_local_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        sliding_window=c.sliding_window,
    )


# ---- Qwen2-MoE and Qwen3-MoE -------------------------------------------------------------------


def _qwen_from_hf(qwen2: bool) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    def fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
        sliding = None
        if hf.get("use_sliding_window"):
            if qwen2:
                raise UnsupportedModelError(f"{source}: Qwen2-MoE sliding-window layers are not supported")
            sliding = hf.get("sliding_window")
        n_layers = hf["num_hidden_layers"]
        num_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
        step = hf.get("decoder_sparse_step", 1) or 1
        mlp_only = set(hf.get("mlp_only_layers") or [])
        dense = tuple(i for i in range(n_layers) if i in mlp_only or num_experts == 0 or (i + 1) % step)
        return dict(
            qkv_bias=bool(hf.get("qkv_bias", True) if qwen2 else hf.get("attention_bias", False)),
            o_bias=False if qwen2 else bool(hf.get("attention_bias", False)),
            qk_norm=not qwen2,
            sliding_window=sliding,
            num_experts=num_experts,
            num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
            shared_expert_gate=qwen2,
            dense_layers=dense,
        )

    return fields


def _qwen_to_hf(qwen2: bool) -> Callable[[Any], dict[str, Any]]:
    def entries(c) -> dict[str, Any]:
        hf = dict(
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(c.dense_layers),
            use_sliding_window=c.sliding_window is not None,
            sliding_window=c.sliding_window,
        )
        if qwen2:
            hf.update(qkv_bias=c.qkv_bias, shared_expert_intermediate_size=c.shared_expert_intermediate_size)
        else:
            hf.update(attention_bias=c.qkv_bias)
        return hf

    return entries


# ---- DeepSeek-V2 and DeepSeek-V3 ---------------------------------------------------------------


def _deepseek_from_hf(v3: bool) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    def fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
        n_layers = hf["num_hidden_layers"]
        num_experts = hf.get("n_routed_experts") or 0
        first_dense = hf.get("first_k_dense_replace") or 0
        freq = hf.get("moe_layer_freq", 1) or 1
        dense = tuple(i for i in range(n_layers) if num_experts == 0 or i < first_dense or i % freq)
        n_shared = hf.get("n_shared_experts") or 0
        rope_dim = hf["qk_rope_head_dim"]
        return dict(
            head_dim=rope_dim,
            attention="mla",
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=rope_dim,
            v_head_dim=hf["v_head_dim"],
            rope_interleave=bool(hf.get("rope_interleave", True)) if v3 else True,
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok") or 0,
            moe_intermediate_size=hf["moe_intermediate_size"],
            scoring_func="sigmoid" if v3 else "softmax",
            topk_method="noaux_tc" if v3 else (hf.get("topk_method") or "greedy"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0) or 1.0),
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            shared_expert_intermediate_size=hf["moe_intermediate_size"] * n_shared,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            dense_layers=dense,
        )

    return fields


def _deepseek_to_hf(v3: bool) -> Callable[[Any], dict[str, Any]]:
    def entries(c) -> dict[str, Any]:
        moe_layers = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
        first_dense = moe_layers[0] if moe_layers else c.num_hidden_layers
        if c.dense_layers != tuple(range(first_dense)):
            raise ValueError("DeepSeek checkpoints express dense layers only as the first k layers")
        hf = dict(
            num_key_value_heads=c.num_attention_heads,
            attention_bias=c.qkv_bias,
            q_lora_rank=c.q_lora_rank,
            kv_lora_rank=c.kv_lora_rank,
            qk_nope_head_dim=c.qk_nope_head_dim,
            qk_rope_head_dim=c.qk_rope_head_dim,
            v_head_dim=c.v_head_dim,
            n_routed_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            n_shared_experts=c.shared_expert_intermediate_size // max(c.moe_intermediate_size, 1),
            first_k_dense_replace=first_dense,
            moe_layer_freq=1,
            n_group=c.n_group,
            topk_group=c.topk_group,
            norm_topk_prob=c.norm_topk_prob,
            routed_scaling_factor=c.routed_scaling_factor,
            topk_method=c.topk_method,
            scoring_func=c.scoring_func,
            mlp_bias=c.mlp_bias,
        )
        if v3:
            hf.update(rope_interleave=c.rope_interleave, num_nextn_predict_layers=0)
        return hf

    return entries


# ---- the table ---------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "MixtralForCausalLM",
            "mixtral",
            _mixtral_from_hf,
            _mixtral_to_hf,
            default_rope_theta=1e6,
            renames=((".block_sparse_moe.", ".mlp."),),
            expert_names={"gate": "w1", "up": "w3", "down": "w2"},
        ),
        Architecture(
            "Qwen2MoeForCausalLM",
            "qwen2_moe",
            _qwen_from_hf(qwen2=True),
            _qwen_to_hf(qwen2=True),
            renames=((".mlp.shared_expert.", ".mlp.shared_experts."),),
        ),
        Architecture("Qwen3MoeForCausalLM", "qwen3_moe", _qwen_from_hf(qwen2=False), _qwen_to_hf(qwen2=False)),
        Architecture(
            "DeepseekV2ForCausalLM", "deepseek_v2", _deepseek_from_hf(v3=False), _deepseek_to_hf(v3=False)
        ),
        Architecture(
            "DeepseekV3ForCausalLM", "deepseek_v3", _deepseek_from_hf(v3=True), _deepseek_to_hf(v3=True)
        ),
    )
}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def architecture(name: str) -> Architecture:
    """The table entry of an architecture name (UnsupportedModelError naming the supported ones)."""
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {name!r} is not supported; supported: {supported()}")
    return ARCHITECTURES[name]


def architecture_of_hf(hf: dict[str, Any], source: str) -> Architecture:
    """The entry a config.json names: its `architectures`, else its `model_type`."""
    archs = hf.get("architectures") or []
    entry = ARCHITECTURES.get(archs[0]) if archs else _BY_MODEL_TYPE.get(hf.get("model_type", ""))
    if entry is None:
        named = (archs[0] if archs else "") or hf.get("model_type")
        raise UnsupportedModelError(
            f"{source}: architecture {named!r} is not supported; supported: {supported()}"
        )
    return entry
