"""Weight-only int8 quantization: smaller, close to the original, and every path still works."""

import pytest
import torch

from model_runtime import load_model
from model_runtime.kernels.quant import (
    Int8Experts,
    Int8Linear,
    int8_report,
    quantize_int8,
    quantize_per_channel,
)
from model_runtime.models.paged import build_paged_batch

pytestmark = pytest.mark.runtime


def test_per_channel_quantization_error_is_bounded():
    w = torch.randn(64, 48) * torch.linspace(0.01, 3, 64)[:, None]  # very different row ranges
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_int8_report(name):
    model = load_model(f"builtin:{name}")
    report = int8_report(model)
    assert report["memory_saving"] > 0.6  # float32 -> int8 weights (embeddings stay)
    assert report["logit_drift_relative"] < 0.06
    assert report["top1_agreement"] > 0.85
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # measured on a copy


def test_quantized_model_serves_paged_steps():
    model = quantize_int8(load_model("builtin:tiny-deepseek-v3"))
    assert any(isinstance(m, Int8Experts) for m in model.modules())
    ids = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
        cache = model.allocate_kv_cache(4, 4)
        model.forward_paged(torch.tensor(ids[:9]), build_paged_batch([([0, 1, 2], 0, 9)], 4), cache)
        last = model.forward_paged(torch.tensor(ids[9:]), build_paged_batch([([0, 1, 2], 9, 1)], 4), cache)
    torch.testing.assert_close(last[0], full[9], atol=2e-2, rtol=2e-2)  # bf16 activations in the int8 matmul
    assert sum(sum(c) for c in model.expert_token_counts().values()) > 0
