"""`--dtype auto`: bfloat16 on CPUs with native bfloat16 matmul (and CUDA), float32 elsewhere; the
engine says which and why; an explicit dtype wins."""

import logging

import pytest
import torch

from model_runtime.engine import build
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.messages import EngineSpec

pytestmark = pytest.mark.runtime

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"


def test_native_bf16_flags_of_x86_and_arm():
    assert build.cpu_bf16_flags(SAPPHIRE_RAPIDS) == ["amx_bf16", "avx512_bf16"]
    assert build.cpu_bf16_flags(NEOVERSE_V1) == ["bf16"]
    assert build.cpu_bf16_flags(SKYLAKE) == []
    assert build.cpu_bf16_flags("") == []


def test_auto_dtype_per_device(monkeypatch):
    monkeypatch.setattr(build, "cpu_bf16_flags", lambda: ["amx_bf16"])
    assert build.auto_dtype("cpu") == ("bfloat16", "this CPU has native bfloat16 matmul: amx_bf16")
    monkeypatch.setattr(build, "cpu_bf16_flags", lambda: [])
    dtype, why = build.auto_dtype("cpu")
    assert dtype == "float32" and "no native bfloat16" in why
    assert build.auto_dtype("cuda:0")[0] == "bfloat16"


@pytest.mark.parametrize("flags, expected", [(["avx512_bf16"], torch.bfloat16), ([], torch.float32)])
def test_engine_loads_the_auto_dtype_and_logs_why(monkeypatch, caplog, flags, expected):
    monkeypatch.setattr(build, "cpu_bf16_flags", lambda: flags)
    spec = EngineSpec(
        "builtin:tiny-mixtral", "auto", "cpu", EngineConfig(max_num_seqs=2, num_kv_blocks=8), num_threads=1
    )
    with caplog.at_level(logging.INFO, logger=build.__name__):
        model, _ = build.load_rank(spec)
    assert model.dtype == expected
    assert f"dtype auto: {str(expected).removeprefix('torch.')} (" in caplog.text


def test_an_explicit_dtype_wins(monkeypatch):
    monkeypatch.setattr(build, "cpu_bf16_flags", lambda: ["amx_bf16"])
    spec = EngineSpec(
        "builtin:tiny-mixtral", "float32", "cpu", EngineConfig(max_num_seqs=2, num_kv_blocks=8), num_threads=1
    )
    model, _ = build.load_rank(spec)
    assert model.dtype == torch.float32
