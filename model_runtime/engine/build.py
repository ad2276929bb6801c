"""An engine built from an EngineSpec: the model loaded (and quantized) on the device it names, its
tokenizer, and the engine's settings with "auto" device and dtype resolved.

What the engine process runs first (engine/worker.py), and what the server runs in a thread for
`--no-engine-process`; the one place the server's engine stage meets torch and the model.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.messages import EngineSpec
from model_runtime.kernels import cpu_decode, shapes
from model_runtime.kernels.quant import quantize_int8
from model_runtime.models.loading import load_model
from model_runtime.models.model import SINGLE, Transformer
from model_runtime.models.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def build_engine(spec: EngineSpec) -> LLMEngine:
    model, tokenizer, config = load_for_engine(spec)
    engine = LLMEngine(model, tokenizer, config)  # its CPU transforms first: they set the weights' layout
    warm_up(engine.model, config)
    return engine


def warm_up(model: torch.nn.Module, config: EngineConfig) -> None:
    """On the CPU in bfloat16 / float16, oneDNN's matmul kernels for every row count a step can
    bring, built before the first request rather than during it (kernels/shapes.py)."""
    if torch.device(config.device).type != "cpu":
        return
    built, seconds = shapes.warm_up(model, config.max_num_batched_tokens, config.max_num_seqs)
    if built:
        log.info("built %d matmul kernels for row counts up to %d in %.2f s", built, config.max_num_batched_tokens, seconds)


def load_for_engine(spec: EngineSpec) -> tuple[Transformer, Tokenizer, EngineConfig]:
    """(model, tokenizer, engine config) for `spec`, with "auto" device and dtype resolved and the
    CPU's torch threads set; what an engine, in the engine process or the server's, is built from."""
    model, config = load_rank(spec)
    return model, load_tokenizer(spec.model), config


def auto_dtype(device: str) -> tuple[str, str]:
    """The dtype `--dtype auto` gives on `device`, and why: bfloat16 on CUDA and on CPUs with native
    bfloat16 matmul (AMX or AVX512-BF16 on x86, BF16 on Arm; oneDNN runs a bfloat16 matmul there
    about 3x faster than float32), float32 on other CPUs (bfloat16 would be emulated, slower)."""
    if device.startswith("cuda"):
        return "bfloat16", "CUDA"
    native = cpu_bf16_flags()
    if native:
        return "bfloat16", f"this CPU has native bfloat16 matmul: {', '.join(native)}"
    return "float32", "this CPU has no native bfloat16 matmul (no AMX, AVX512-BF16 or Arm BF16)"


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU feature flags (from /proc/cpuinfo) that give native bfloat16 matmul; [] where none
    (or where /proc/cpuinfo cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags]


def load_rank(spec: EngineSpec) -> tuple[Transformer, EngineConfig]:
    """This process's model: the whole model, or (spec.parallel distributed) rank spec.rank's part
    of it on the device of its local rank, joined to the replica's process group (`model.comm`)."""
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = spec.dtype
    if dtype == "auto":
        dtype, why = auto_dtype(device)
        log.info("dtype auto: %s (%s; --dtype chooses another)", dtype, why)
    if spec.num_threads and device == "cpu":
        torch.set_num_threads(spec.num_threads)
    parallel, shard, comm = spec.parallel, SINGLE, None
    if device == "cpu" and not parallel.distributed:  # one rank's part of a model takes torch's ops
        helpers = cpu_decode.start_helpers(cpu_decode.default_helpers())
        if helpers:
            log.info("cpu decode kernels: %d helper thread(s) share a decode step's matrices "
                     "(MOE_RUNTIME_DECODE_HELPERS=0: none)", helpers)  # fmt: skip
    if parallel.distributed:
        from model_runtime.distributed.comm import device_for, init_comm

        torch_device = device_for(device, parallel.local_rank(spec.rank))
        comm = init_comm(parallel, spec.rank, torch_device)
        shard, device = comm.shard(parallel.enable_expert_parallel), str(torch_device)
        log.info("rank %d of %d: loading %s (%s on %s)", spec.rank, parallel.world_size, spec.model, dtype, device)
    else:
        log.info("loading %s (%s on %s)", spec.model, dtype, device)
    model = load_model(spec.model, dtype=getattr(torch, dtype), device=device, shard=shard, comm=comm)
    if spec.quantization == "int8":
        if model.config.quant_method:
            raise ValueError(
                f"--quantization int8: {spec.model} is already quantized ({model.config.quant_method}); "
                "drop --quantization"
            )
        model = quantize_int8(model)
    return model, dataclasses.replace(spec.config, device=device)
