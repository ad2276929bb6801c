"""FP8 checkpoints on this machine: weights in memory, decode throughput, KV capacity at start.

`python -m benchmarks.runtime_fp8` writes one DeepSeek-V3-style checkpoint twice (random weights,
cached under --cache-dir): as DeepSeek publishes theirs (float8_e4m3fn weights with a float32
`weight_scale_inv` per 128 x 128 block) and as bf16 from the same dequantized weights. It loads
both with `--dtype bfloat16` and prints:

- the weight bytes each holds in memory (FP8 stays FP8; only the embedding, norms, routers and
  lm_head are bf16);
- decode throughput through the engine (dequantize-per-matmul for FP8, the CPU's only path), one
  request and 32 concurrent, in alternating rounds (FP8, bf16, FP8, bf16, ...), best of each;
- the KV capacity the engine reports at start, with the default budget and with
  --gpu-memory-utilization on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import SamplingParams
from model_runtime.kernels.fp8 import dequantize, quantize
from model_runtime.models.builtin import random_model
from model_runtime.models.config import ModelConfig
from model_runtime.models.loading import load_model, save_checkpoint

BLOCK = (128, 128)
CONFIG = {  # DeepSeek-V3's shape of layer at ~1/7 the width, 4 layers (1 dense), 32 routed experts
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 384, "kv_lora_rank": 256,
    "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 32,
    "num_experts_per_tok": 4, "moe_intermediate_size": 384, "n_shared_experts": 1, "first_k_dense_replace": 1,
    "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


def quantized(key: str) -> bool:
    """The tensors DeepSeek-V3's checkpoint stores as FP8: the decoder layers' linear weights."""
    return (key.startswith("model.layers.") and key.endswith(".weight") and "layernorm" not in key
            and not key.endswith("mlp.gate.weight"))


def checkpoints(cache: Path) -> tuple[Path, Path]:
    """(FP8 checkpoint, bf16 checkpoint of its dequantized weights), written once."""
    fp8_dir, bf16_dir = cache / "fp8-dsv3" / "fp8", cache / "fp8-dsv3" / "bf16"
    if (fp8_dir / "config.json").is_file() and (bf16_dir / "config.json").is_file():
        return fp8_dir, bf16_dir
    src = save_checkpoint(random_model(ModelConfig.from_hf(CONFIG), seed=5), cache / "fp8-dsv3" / "source")
    fp8, bf16 = {}, {}
    for key, tensor in load_file(str(src / "model.safetensors")).items():
        if quantized(key):
            q, scale_inv = quantize(tensor, BLOCK)
            fp8[key], fp8[f"{key}_scale_inv"] = q, scale_inv
            bf16[key] = dequantize(q, scale_inv, BLOCK, torch.bfloat16)
        else:
            fp8[key] = bf16[key] = tensor.to(torch.float32 if "e_score" in key else torch.bfloat16)
    config = json.loads((src / "config.json").read_text())
    for path, tensors, cfg in ((fp8_dir, fp8, {**config, "quantization_config": FP8_CONFIG}), (bf16_dir, bf16, config)):
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(cfg))
    return fp8_dir, bf16_dir


def throughput(model, concurrent: int, prompt_len: int, new_tokens: int) -> float:
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=max(concurrent, 1), max_num_batched_tokens=1024))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.add_request("warm", list(range(2, 2 + prompt_len)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    g = torch.Generator().manual_seed(concurrent)
    for i in range(concurrent):
        engine.add_request(str(i), torch.randint(2, model.config.vocab_size, (prompt_len,), generator=g).tolist(), params)
    generated, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        generated += sum(len(o.new_token_ids) for o in engine.step() if hasattr(o, "new_token_ids"))
    return generated / (time.perf_counter() - t0)


def capacity(model, **config) -> tuple[int, str]:
    """(KV tokens, the engine's log line saying how it sized the cache)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if "KV cache" in record.getMessage():
                lines.append(record.getMessage())

    handler = Keep()
    logging.getLogger("model_runtime.engine.core").addHandler(handler)
    logging.getLogger("model_runtime.engine.core").setLevel(logging.INFO)
    try:
        engine = LLMEngine(model, None, EngineConfig(**config))
        return engine.blocks.capacity_tokens, (lines[-1] if lines else "")
    finally:
        logging.getLogger("model_runtime.engine.core").removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runtime_fp8", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=os.environ.get("MOE_BENCH_DIR", ".bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one round, 16 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 1, 16
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fp8_dir, bf16_dir = checkpoints(Path(args.cache_dir))
    models = {"fp8": load_model(fp8_dir, dtype="bfloat16"), "bf16": load_model(bf16_dir, dtype="bfloat16")}
    print(f"DeepSeek-V3-style checkpoint (hidden 1024, 4 layers, 32 experts), --dtype bfloat16, CPU, "
          f"{args.threads} torch thread(s), {os.cpu_count()} cores; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.rounds} alternating rounds (best kept)")
    print()
    print(f"{'weights':<8}  {'bytes in memory':>16}  {'tok/s @1':>9}  {'tok/s @32':>10}")
    best = {name: {1: 0.0, 32: 0.0} for name in models}
    for _ in range(args.rounds):
        for concurrent in (1, 32):
            for name, model in models.items():   # alternating: fp8, bf16, fp8, bf16, ...
                best[name][concurrent] = max(best[name][concurrent],
                                             throughput(model, concurrent, args.prompt_len, args.new_tokens))
    for name, model in models.items():
        print(f"{name:<8}  {model.weight_bytes() / 2**20:>12.1f} MiB  {best[name][1]:>9.1f}  {best[name][32]:>10.1f}")
    ratio = models["fp8"].weight_bytes() / models["bf16"].weight_bytes()
    print(f"\nFP8 holds {ratio:.2f}x the bf16 bytes; decode at 1 / 32: "
          f"{best['fp8'][1] / best['bf16'][1]:.2f}x / {best['fp8'][32] / best['bf16'][32]:.2f}x bf16's speed "
          "(dequantized per matmul: the CPU has no FP8 matmul)")
    print()
    for label, config in (("default (--kv-cache-memory unset, CPU)", {}),
                          ("--gpu-memory-utilization 0.2 (CPU: host memory)", {"gpu_memory_utilization": 0.2})):
        try:
            tokens, line = capacity(models["fp8"], **config)
            print(f"KV capacity, {label}: {tokens} tokens\n  engine says: {line}")
        except Exception as e:  # noqa: BLE001 (the reason is printed)
            print(f"KV capacity, {label}: not available ({e})")
    print(f"\nbenchmark wall time {time.perf_counter() - t0:.0f} s (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
