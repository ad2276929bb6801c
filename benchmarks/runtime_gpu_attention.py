"""GPU attention benchmark: `python -m benchmarks.runtime_gpu_attention` (run by `make gpu-check`).

On a CUDA device, a decode step's attention over a block-paged cache and a grouped-query prefill
step, each timed two ways in one run, alternating rounds (CUDA events, the median of each round's
timed calls, the best round):
- the Triton kernels that read the cache in place (kernels/triton_attention.py, decision 44);
- the gathered torch path they replace (models/model.py: gather every sequence's context into a
  dense tensor through its block table, then attend it padded to the longest).
Shapes: Mixtral-style GQA (32 query heads on 8 kv heads of 128) and DeepSeek-V3's MLA decode (128
heads on one latent row of 512 + 64 rope columns), at 1 and 32 sequences, contexts of 1024 and
8192 tokens (ragged: each sequence a random length up to that), block size 16, bfloat16. Also
checks the two agree before timing. Without CUDA it says so and exits 0 (nothing to measure: the
kernels' correctness is checked on the CPU by tests/runtime/test_triton_attention.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from model_runtime.kernels import triton_attention
from model_runtime.models import model as layers
from model_runtime.models.paged import build_paged_batch


def paged_step(lens: list[int], new: list[int], block_size: int, device: str, seed: int):
    """A step over scattered blocks: sequence s has lens[s] tokens after it, new[s] of them new."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(-(-n // block_size) for n in lens)
    perm = torch.randperm(total, generator=gen).tolist()
    seqs, used = [], 0
    for n, k in zip(lens, new, strict=True):
        nb = -(-n // block_size)
        seqs.append((perm[used : used + nb], n - k, k))
        used += nb
    return build_paged_batch(seqs, block_size, device), total


def timed(fn, calls: int) -> float:
    """The median of `calls` timed calls of fn, in ms (CUDA events)."""
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cases(block_size: int):
    gen = torch.Generator().manual_seed(0)
    for seqs in (1, 32):
        for context in (1024, 8192):
            lens = torch.randint(context // 2, context + 1, (seqs,), generator=gen).tolist()
            yield "GQA decode", seqs, context, lens, [1] * seqs, (32, 8, 128, 0)
            yield "MLA decode", seqs, context, lens, [1] * seqs, (128, 1, 512, 64)
            chunk = min(512, context // 2)
            yield "GQA prefill", seqs, context, lens, [chunk] * seqs, (32, 8, 128, 0)


def measure(name, lens, new, shape, bs, dtype, args) -> tuple[dict[str, float], float]:
    """One case: (the best round's median ms of each path, their largest difference)."""
    H, K, E, R = shape
    batch, blocks = paged_step(lens, new, bs, "cuda", seed=len(lens) + max(lens))
    ctx = layers.PagedContext.build(batch, None)
    N = int(sum(new))
    g = torch.Generator(device="cuda").manual_seed(1)
    if R:  # MLA: one latent head, the values its first E columns, the queries' rope part apart
        rows = torch.randn(blocks * bs, 1, E + R, device="cuda", dtype=dtype, generator=g)
        keys, values = rows, rows[..., :E]
    else:
        keys = torch.randn(blocks * bs, K, E, device="cuda", dtype=dtype, generator=g)
        values = torch.randn(blocks * bs, K, E, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(N, H, E + R, device="cuda", dtype=dtype, generator=g) * 0.1
    scale = (E + R) ** -0.5

    def kernel():
        if name.endswith("decode"):
            return triton_attention.decode(q[..., :E], keys, values, batch.block_tables, batch.context_lens, bs,
                                           scale, None, q_rope=q[..., E:] if R else None)  # fmt: skip
        return triton_attention.prefill(q, keys, values, batch.block_tables, batch.context_lens, batch.query_start,
                                        bs, scale, None, max(new))  # fmt: skip

    def gathered():
        k = layers.gather_slots(keys, ctx.context_slots)
        v = layers.gather_slots(values, ctx.context_slots)
        return layers.paged_attention(q, k, v, ctx, scale)

    diff = (kernel().float() - gathered().float()).abs().max().item()
    best = {"triton": float("inf"), "gathered": float("inf")}
    for _ in range(args.rounds):  # alternating
        for label, fn in (("triton", kernel), ("gathered", gathered)):
            fn()
            best[label] = min(best[label], timed(fn, args.calls))
    return best, diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("runtime_gpu_attention: no CUDA device here; nothing measured")
        return 0
    bs, dtype = 16, torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}; bfloat16, block size {bs}, best of {args.rounds} rounds")
    print(f"{'case':<12} {'seqs':>4} {'context':>7} | {'triton ms':>9} {'gathered ms':>11} {'ratio':>6} | max diff")
    for name, S, context, lens, new, shape in cases(bs):
        best, diff = measure(name, lens, new, shape, bs, dtype, args)
        if triton_attention._failed:
            print(f"triton kernels off: {triton_attention._failed}")
            return 1
        ratio = best["gathered"] / best["triton"]
        print(f"{name:<12} {S:>4} {context:>7} | {best['triton']:>9.3f} {best['gathered']:>11.3f} {ratio:>5.2f}x | {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
