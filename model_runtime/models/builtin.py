"""Builtin models (`builtin:NAME`): a preset config and deterministic random weights from a seed.

Small enough to build in well under a second on a CPU; used by demos and tests. The weights are
scaled so that activations stay O(1) through the layers and routing spreads over the experts, so
outputs are random but not degenerate.
"""

from __future__ import annotations

import math

import torch

from model_runtime.models.config import ModelConfig
from model_runtime.models.model import Transformer

BUILTIN_MODELS = ("tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3")


def build_builtin(
    name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
) -> Transformer:
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown builtin model {name!r}; builtins: {', '.join('builtin:' + n for n in BUILTIN_MODELS)}"
        )
    return random_model(ModelConfig.from_name(name), dtype=dtype, device=device, seed=seed)


def random_model(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
) -> Transformer:
    """A model of `cfg` with weights drawn from `seed` (the same on every machine)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        state[name] = _init_tensor(name, tuple(meta.shape), gen).to(
            device=device, dtype=torch.float32 if name.endswith("e_score_correction_bias") else dtype
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()
    return model.eval().requires_grad_(False)


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen) * 0.02
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=gen) * 0.05
    if name == "embed_tokens.weight":
        return torch.randn(shape, generator=gen)
    fan_in = shape[-1]
    gain = 2.0 if name == "lm_head.weight" else 1.0  # peakier next-token distributions
    return torch.randn(shape, generator=gen) * (gain / math.sqrt(fan_in))
