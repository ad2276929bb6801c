"""Where an engine step's time goes: `python -m benchmarks.runtime_profile` (not part of `make bench`).

On the benchmark checkpoints of benchmarks/runtime_vs_vllm.py (written by transformers, cached
under .bench/), one engine (LLMEngine, in process, one torch thread as the server runs it on 2
cores) per checkpoint and batch: S requests of 32-token prompts are prefilled, then decode steps
run under torch.profiler. Printed per checkpoint and batch: the median decode step, the share of
it inside torch ops (the rest is Python: scheduling, building the batch, sampling, the model's
own glue; and the C kernels of model_runtime/kernels, which the profiler does not see as ops) and
the ops that take the most time, grouped by the model part they belong to (record_function labels
are not used: the model stays as it is; ops are attributed by name).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.runtime_vs_vllm import CHECKPOINTS, DEFAULT_CHECKPOINTS, REPO, ensure_checkpoint
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import SamplingParams
from model_runtime.models.loading import load_model


def decode_profile(model, batch: int, steps: int, prompt_len: int = 32):
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=2048))
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(
            str(i), torch.randint(3, model.config.vocab_size, (prompt_len,), generator=g).tolist(), params
        )
    for _ in range(3):  # the prefill, then decode warms up
        engine.step()
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(times), prof


def report(name: str, batch: int, step_s: float, total_s: float, prof, top: int) -> str:
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    # self time of the aten ops: what ran in torch's kernels (their Python callers excluded)
    op_us = sum(e.self_cpu_time_total for e in events)
    lines = [
        f"{name}, {batch} sequence(s): decode step median {1000 * step_s:.2f} ms; torch ops {op_us / 1e3 / (total_s * 1e3) * 100:.0f}% "
        f"of the steps' wall time, the rest Python around them and the C kernels (ctypes calls, not torch ops)"
    ]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    steps = len(prof.profiler.function_events) and max(1, round(total_s / step_s))
    lines.append(f"  {'op':<40} {'calls/step':>10} {'ms/step':>9} {'share':>6}")
    for e in events[:top]:
        lines.append(
            f"  {e.key[:40]:<40} {e.count / steps:>10.0f} {e.self_cpu_time_total / 1e3 / steps:>9.3f} "
            f"{e.self_cpu_time_total / 1e3 / (total_s * 1e3) * 100:>5.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runtime_profile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoints", nargs="+", default=DEFAULT_CHECKPOINTS, choices=list(CHECKPOINTS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's on 2 cores: 1)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.checkpoints:
        model = load_model(str(ensure_checkpoint(name, args.cache_dir)), dtype=getattr(torch, args.dtype))
        for batch in args.batches:
            step_s, total_s, prof = decode_profile(model, batch, args.steps)
            print(report(f"{name} ({args.dtype})", batch, step_s, total_s, prof, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
