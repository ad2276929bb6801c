"""The KV cache on CUDA is sized from the device's memory after a profiling pass (as vLLM's
--gpu-memory-utilization): it follows what torch.cuda.mem_get_info reports, and never takes more
than is free. Skipped without CUDA; `make gpu-check` runs it."""

from __future__ import annotations

import pytest
import torch

from model_runtime import load_model
from model_runtime.engine.config import EngineConfig, GiB, MiB
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.memory import size_kv_cache
from model_runtime.engine.requests import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ATTENTION = 64 * MiB


@pytest.fixture(scope="module")
def model():
    return load_model("builtin:tiny-mixtral", dtype=torch.bfloat16, device="cuda")


def test_cuda_sizing_follows_mem_get_info(model, monkeypatch):
    config = EngineConfig(device="cuda", gpu_memory_utilization=0.5, max_step_attention_bytes=ATTENTION)
    free, _ = torch.cuda.mem_get_info()
    kv, how = size_kv_cache(model, config, torch.bfloat16)
    assert 0 < kv <= free and "peak in the profiling pass" in how, how
    assert all(sum(c) == 0 for c in model.expert_token_counts().values())  # the pass routed no request

    sizes = {}
    for total in (40 * GiB, 60 * GiB):  # a device of that size, 1 GiB of it used outside torch

        def fake(device=None, total=total):
            return total - torch.cuda.memory_reserved(device) - GiB, total

        monkeypatch.setattr(torch.cuda, "mem_get_info", fake)
        sizes[total], how = size_kv_cache(model, config, torch.bfloat16)
        peak = torch.cuda.max_memory_allocated()  # of the profiling pass just run
        assert sizes[total] == int(0.5 * total) - peak - GiB - ATTENTION, how
        assert "1 GiB outside torch" in how
    assert sizes[60 * GiB] - sizes[40 * GiB] == pytest.approx(0.5 * 20 * GiB, abs=16 * MiB)


def test_engine_on_cuda_reports_and_serves_within_the_free_memory(model, caplog):
    free, _ = torch.cuda.mem_get_info()
    config = EngineConfig(device="cuda", gpu_memory_utilization=0.3, max_step_attention_bytes=ATTENTION)
    with caplog.at_level("INFO", logger="model_runtime.engine.core"):
        engine = LLMEngine(model, None, config)
    assert 0 < engine.kv_cache_bytes <= free
    assert engine.stats().kv_capacity_tokens == engine.blocks.capacity_tokens
    assert f"= {engine.blocks.capacity_tokens} tokens" in caplog.text and "0.3 x" in caplog.text
    engine.add_request("a", [1, 2, 3, 4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        outs = engine.step()
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 4
    del engine
    torch.cuda.empty_cache()
