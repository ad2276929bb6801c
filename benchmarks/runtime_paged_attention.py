"""Decode attention read in place against the gathered torch path:
`python -m benchmarks.runtime_paged_attention` (not part of `make bench`).

On the checkpoints of benchmarks/runtime_vs_vllm.py (bfloat16, torch on one thread, as the server
runs on 2 cores), alternating the two paths (kernels/paged_attention.py's `applies` forced off for
the gathered one), best of `--rounds`, in CPU time of this process (the machine is shared; wall
time moves with other sessions' load far more):
- one attention layer (projections included) at a decode step of `--batch` sequences with ragged
  contexts of about each `--contexts` tokens, in scattered 16-token blocks;
- whole engine decode steps (LLMEngine in process: `--batch` requests of 32-token prompts, then
  decode steps), the median step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.runtime_vs_vllm import CHECKPOINTS, DEFAULT_CHECKPOINTS, REPO, ensure_checkpoint
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import SamplingParams
from model_runtime.kernels import paged_attention as paged_kernel
from model_runtime.models.loading import load_model
from model_runtime.models.model import PagedContext
from model_runtime.models.paged import build_paged_batch

PATHS = ("gathered", "in place")


def use(path: str, real=paged_kernel.applies) -> None:
    paged_kernel.applies = real if path == "in place" else (lambda *a: False)


def layer_ms(model, batch: int, context: int, calls: int = 20) -> float:
    """CPU ms of layer 0's attention at one decode step (the path set by use())."""
    bs = 16
    blocks = context // bs + 1
    cache = model.allocate_kv_cache(batch * blocks, bs)[0].normal_()
    perm = torch.randperm(batch * blocks, generator=torch.Generator().manual_seed(0)).tolist()
    lens = [context - 7 * (s % 5) for s in range(batch)]  # ragged
    paged = build_paged_batch(
        [(perm[s * blocks : (s + 1) * blocks], lens[s] - 1, 1) for s in range(batch)], bs
    )
    ctx = PagedContext.build(paged, model.config.sliding_window)
    x = torch.randn(batch, model.config.hidden_size, dtype=model.dtype)
    cos, sin = model.rope(paged.positions, x.dtype)
    attn = model.layers[0].self_attn
    with torch.no_grad():
        for _ in range(3):
            attn(x, cos, sin, ctx, cache)
        start = time.process_time()
        for _ in range(calls):
            attn(x, cos, sin, ctx, cache)
    return (time.process_time() - start) / calls * 1e3


def step_ms(model, batch: int, steps: int = 40) -> float:
    """Median CPU ms of an engine decode step (the path set by use())."""
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=2048))
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(
            str(i), torch.randint(3, model.config.vocab_size, (32,), generator=g).tolist(), params
        )
    for _ in range(3):  # the prefill, then decode warms up
        engine.step()
    times = []
    for _ in range(steps):
        start = time.process_time()
        engine.step()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def best(fn, rounds: int) -> dict[str, float]:
    """fn() under each path, alternating, best of `rounds`."""
    out = {p: float("inf") for p in PATHS}
    try:
        for _ in range(rounds):
            for p in PATHS:
                use(p)
                out[p] = min(out[p], fn())
    finally:
        use("in place")
    return out


def line(what: str, ms: dict[str, float]) -> str:
    g, k = ms["gathered"], ms["in place"]
    return f"  {what:<34} gathered {g:7.2f} ms  in place {k:7.2f} ms  ({g / k:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", default=DEFAULT_CHECKPOINTS, choices=list(CHECKPOINTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not paged_kernel.available():
        print("the in-place kernel is not available here (needs AVX512-BF16 and a C compiler)")
        return 1
    for name in args.checkpoints:
        model = load_model(str(ensure_checkpoint(name, args.cache_dir)), dtype=torch.bfloat16)
        print(
            f"{name} (bfloat16, 1 thread, {args.batch} sequences, CPU time, best of {args.rounds}):",
            flush=True,
        )
        for context in args.contexts:
            ms = best(lambda m=model, c=context: layer_ms(m, args.batch, c), args.rounds)
            print(line(f"attention layer, context ~{context}", ms), flush=True)
        print(
            line(
                "engine decode step, context 33-80", best(lambda m=model: step_ms(m, args.batch), args.rounds)
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
