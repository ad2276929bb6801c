"""ModelConfig: one dataclass for every supported MoE architecture, read from a Hugging Face
`config.json` (`ModelConfig.from_hf`) or taken from a named preset (`ModelConfig.from_name`).

The architectures differ only in small parts, each a field here:
- attention: "gqa" (Mixtral, Qwen-MoE; optional qkv bias and q/k RMSNorm) or "mla" (DeepSeek
  multi-head latent attention: low-rank q, compressed kv latent + a shared rope key);
- routing: softmax or sigmoid scores, greedy / group-limited top-k, renormalisation, a scaling
  factor and a score-correction bias;
- shared experts (DeepSeek) or one gated shared expert (Qwen2-MoE);
- which layers are dense MLPs instead of MoE (`dense_layers`).

How each architecture's config.json spells those (and how its checkpoint names the weights) is its
entry in models/architectures.py; this module reads and writes the fields all of them share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from model_runtime.models.architectures import UnsupportedModelError, architecture, architecture_of_hf

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")


@dataclass
class ModelConfig:
    """Hyper-parameters of one model. Letters match the legend in model.py."""

    architecture: str = "MixtralForCausalLM"
    vocab_size: int = 32000  # V
    hidden_size: int = 4096  # D
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 8  # K (GQA only)
    head_dim: int | None = None  # Dh (GQA only); default D // H
    intermediate_size: int = 14336  # hidden size of dense MLP layers
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    # attention
    attention: str = "gqa"  # "gqa" | "mla"
    qkv_bias: bool = False  # GQA: q/k/v projections; MLA: q_a_proj and kv_a_proj_with_mqa
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rope
    sliding_window: int | None = None
    # multi-head latent attention (MLA)
    q_lora_rank: int | None = None  # None: q is one full projection
    kv_lora_rank: int = 0  # C: the cached latent
    qk_nope_head_dim: int = 0  # P
    qk_rope_head_dim: int = 0  # R: also the cached rope key
    v_head_dim: int = 0  # Dv

    # rotary position embedding
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "yarn"|"linear", "factor": ..., ...}
    rope_interleave: bool = False  # DeepSeek: rotate (x0, x1), (x2, x3), ... pairs

    # mixture of experts
    num_experts: int = 0  # E routed experts
    num_experts_per_tok: int = 0  # A
    moe_intermediate_size: int = 0  # I
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    norm_topk_prob: bool = False  # renormalise the A chosen weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) scales the shared expert
    mlp_bias: bool = False  # DeepSeek-V2 dense MLP / shared experts
    dense_layers: tuple[int, ...] = field(default_factory=tuple)  # layers with a dense MLP, not MoE

    # pre-quantized checkpoints (quantization_config): only FP8 with block scales (DeepSeek-V3's
    # published format: float8_e4m3fn weights, float32 `weight_scale_inv` per block)
    quant_method: str | None = None  # None | "fp8"
    weight_block_size: tuple[int, int] | None = None  # (rows, columns) of one scale's block

    def __post_init__(self):
        architecture(self.architecture)  # UnsupportedModelError for one not in the table
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.dense_layers = tuple(sorted(set(self.dense_layers)))
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            rope_type = self.rope_scaling.get("rope_type", "default")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if rope_type == "default":
                self.rope_scaling = None
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"activation {self.hidden_act!r} is not supported")
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention must be 'gqa' or 'mla', not {self.attention!r}")
        if self.attention == "gqa" and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise UnsupportedModelError(f"scoring_func {self.scoring_func!r} is not supported")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise UnsupportedModelError(f"topk_method {self.topk_method!r} is not supported")
        if self.num_experts and self.num_experts % self.n_group:
            raise ValueError(f"num_experts {self.num_experts} is not a multiple of n_group {self.n_group}")
        if self.sliding_window is not None and self.sliding_window >= self.max_position_embeddings:
            self.sliding_window = None

    # ---- derived -------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def eos_token_ids(self) -> set[int]:
        return token_ids(self.eos_token_id)

    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query/key: Dh (GQA) or P + R (MLA)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def kv_cache_elems_per_token_per_layer(self) -> int:
        """MLA caches the latent and the rope key (C + R); GQA caches K and V of every kv head."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise KeyError(f"no model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face config.json (transformers 4.x or 5.x layout)."""
        arch = architecture_of_hf(hf, source)
        quantization = _quantization_from_hf(hf.get("quantization_config"), source)
        n_layers = hf["num_hidden_layers"]
        heads = hf["num_attention_heads"]
        common: dict[str, Any] = dict(
            architecture=arch.name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or None,
            intermediate_size=hf["intermediate_size"],
            hidden_act=hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        rope_theta, rope_scaling = _rope_from_hf(hf, arch.default_rope_theta)
        common.update(rope_theta=rope_theta, rope_scaling=rope_scaling, **quantization)
        return cls(**{**common, **arch.fields_from_hf(hf, source)})

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers (and `from_hf`) reads back as this model."""
        c = self
        hf: dict[str, Any] = dict(
            architectures=[c.architecture],
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            hidden_act=c.hidden_act,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id,
            rope_theta=c.rope_theta,
        )
        if c.rope_scaling:
            hf["rope_scaling"] = dict(c.rope_scaling)
        arch = architecture(c.architecture)
        hf.update(model_type=arch.model_type, **arch.fields_to_hf(c))
        if c.quant_method == "fp8":
            hf["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(c.weight_block_size),
            }
        return hf


def token_ids(value: Any) -> set[int]:
    """Token ids as config.json files write them (none, one id, or a list) as a set."""
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def _quantization_from_hf(quant: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """ModelConfig's quantization fields from a config.json's `quantization_config`: FP8 with block
    scales loads; anything else is refused naming what it is."""
    if not quant:
        return {}
    method = quant.get("quant_method")
    if method != "fp8":
        raise UnsupportedModelError(
            f"{source}: quantization_config.quant_method {method!r} is not supported; this runtime loads "
            "'fp8' with weight_block_size (DeepSeek-V3's format) and bfloat16/float16/float32 checkpoints "
            "(weight-only int8 is available with --quantization int8)"
        )
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedModelError(f"{source}: quantization_config.fmt {fmt!r} is not supported; only 'e4m3'")
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise UnsupportedModelError(
            f"{source}: quantization_config.activation_scheme {scheme!r} is not supported; only 'dynamic'"
        )
    block = quant.get("weight_block_size")
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedModelError(
            f"{source}: quantization_config.weight_block_size {block!r}: FP8 loads with block scales "
            "([rows, columns], e.g. [128, 128]); per-tensor FP8 scales are not supported"
        )
    unknown = set(quant) - {"quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert"}
    if unknown:
        raise UnsupportedModelError(
            f"{source}: quantization_config has {', '.join(sorted(unknown))}, which this runtime does not implement"
        )
    return {"quant_method": "fp8", "weight_block_size": (block[0], block[1])}


def _rope_from_hf(hf: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or default_theta
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    if rope_type == "yarn":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
    return float(theta), params


# The byte-level vocabulary of the builtin models (and of checkpoints that ship no tokenizer): ids
# 0..255 are bytes, then these specials (models/tokenizer.py's ByteTokenizer encodes with them).
BYTE_SPECIALS = {
    "<|begin_of_text|>": 256,
    "<|end_of_text|>": 257,
    "<|pad|>": 258,
    "<|im_start|>": 259,
    "<|im_end|>": 260,
}

# The tiny presets' token ids, in that vocabulary.
_BYTE_TOKENS: dict[str, Any] = dict(
    vocab_size=320,
    bos_token_id=BYTE_SPECIALS["<|begin_of_text|>"],
    eos_token_id=[BYTE_SPECIALS["<|end_of_text|>"], BYTE_SPECIALS["<|im_end|>"]],
    pad_token_id=BYTE_SPECIALS["<|pad|>"],
)

# What DeepSeek-V3 presets share apart from their sizes: MLA with interleaved rope, sigmoid
# scores routed within 2 of 4 expert groups, the first layer dense.
_DEEPSEEK_V3: dict[str, Any] = dict(
    architecture="DeepseekV3ForCausalLM",
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    attention="mla",
    rope_interleave=True,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    n_group=4,
    topk_group=2,
    dense_layers=(0,),
)

# Builtin models are tiny and random; `deepseek-v3-100m` is the benchmark's shape (~100M parameters).
PRESETS: dict[str, ModelConfig] = {
    "tiny-mixtral": ModelConfig(
        architecture="MixtralForCausalLM",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        rope_theta=1e6,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        norm_topk_prob=True,
        **_BYTE_TOKENS,
    ),
    "tiny-qwen3-moe": ModelConfig(
        architecture="Qwen3MoeForCausalLM",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        qk_norm=True,
        intermediate_size=128,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        rope_theta=1e6,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        **_BYTE_TOKENS,
    ),
    "tiny-deepseek-v3": ModelConfig(
        **_DEEPSEEK_V3,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=160,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        head_dim=16,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        **_BYTE_TOKENS,
    ),
    "deepseek-v3-100m": ModelConfig(
        **_DEEPSEEK_V3,
        vocab_size=32000,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1536,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=384,
        shared_expert_intermediate_size=384,
        bos_token_id=0,
        eos_token_id=1,
    ),
}
