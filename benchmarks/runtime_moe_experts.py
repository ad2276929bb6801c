"""The routed experts of a bfloat16 MoE layer, the C kernels against torch's grouped GEMM:
`python -m benchmarks.runtime_moe_experts` (not part of `make bench`).

On the checkpoints of benchmarks/runtime_vs_vllm.py (bfloat16, torch on one thread, as the server
runs on 2 cores), alternating the paths, best of `--rounds`, in CPU time of this process (the
machine is shared; wall time moves with other sessions' load far more):
- "grouped GEMM": torch's (F.grouped_mm) on the experts stored column-major;
- "FMA kernel": moe_experts_bf16 (up to EXPERTS_MAX_TOKENS tokens) on the same layout, what a CPU
  without AMX runs;
- "AMX kernel": moe_amx_experts on the experts row-major (where the CPU has AMX: decision 32).
Each path's layout is the engine's for it (use_cpu_decode_kernels applied again). Printed:
- the first MoE layer's routed experts on N tokens (routed by the layer's own router), and how far
  each path's output is from float32's (largest difference over the largest value);
- whole engine decode steps (LLMEngine in process: `--batch` requests of 32-token prompts, then
  decode steps), the median step: the FMA kernel's engine (no AMX kernels at all) against the AMX
  kernels' (the grouped GEMM path is not an engine's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.runtime_paged_attention import step_ms
from benchmarks.runtime_vs_vllm import CHECKPOINTS, DEFAULT_CHECKPOINTS, REPO, ensure_checkpoint
from model_runtime.kernels import cpu_decode
from model_runtime.models.loading import load_model
from model_runtime.models.model import MoE

PATHS = ("grouped GEMM", "FMA kernel", "AMX kernel")


FMA_KERNEL = cpu_decode.experts_kernel  # the real switch, before use() replaces it


def amx_here() -> bool:
    """Whether this CPU (and OS) runs the AMX kernels, as the engine would decide."""
    return cpu_decode.available() and cpu_decode.moe_amx_enabled()


def use(model, path: str) -> None:
    """The kernels' switches for `path`, and the engine's expert layout for them."""
    cpu_decode._amx = path == "AMX kernel" and amx_here()
    cpu_decode.experts_kernel = FMA_KERNEL if path == "FMA kernel" else (lambda *a: False)
    cpu_decode.use_cpu_decode_kernels(model)


def paths_here() -> tuple[str, ...]:
    return PATHS if amx_here() else PATHS[:2]


def reference(
    experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The routed experts in float32 (or `dtype`), one expert at a time."""
    out = torch.zeros(x.shape, dtype=dtype)
    for n in range(x.shape[0]):
        for a in range(ids.shape[1]):
            e = int(ids[n, a])
            gate, up = F.linear(x[n].to(dtype), experts.gate_up_proj[e].to(dtype)).chunk(2)
            out[n] += weights[n, a].to(dtype) * F.linear(F.silu(gate) * up, experts.down_proj[e].to(dtype))
    return out


def layer(model, tokens: int, calls: int = 30) -> tuple[float, float]:
    """(CPU ms of the first MoE layer's routed experts on `tokens` tokens, relative distance from
    float32) under the path set by use()."""
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, model.config.hidden_size, generator=g).to(model.dtype)
    with torch.no_grad():
        weights, ids = moe.gate(x)
        for _ in range(3):
            out, _ = moe.experts(x, weights, ids)
        start = time.process_time()
        for _ in range(calls):
            moe.experts(x, weights, ids)
        ms = (time.process_time() - start) / calls * 1e3
        ref = reference(moe.experts, x, weights, ids)
    return ms, float((out.float() - ref).abs().max() / ref.abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="*", default=DEFAULT_CHECKPOINTS, choices=list(CHECKPOINTS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[2, 8, 32, 64, 1024])
    parser.add_argument(
        "--batch", type=int, default=32, help="sequences of the engine decode steps (0: none)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".bench")
    parser.add_argument("--model", type=Path, action="append", default=[], help="a checkpoint directory too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not cpu_decode.available():
        print("the C kernels are not available here (needs a C compiler and AVX2)")
        return 1
    paths = {name: ensure_checkpoint(name, args.cache_dir) for name in args.checkpoints}
    paths.update({m.resolve().name: m for m in args.model})
    here = paths_here()
    for name, path in paths.items():
        model = load_model(str(path), dtype=torch.bfloat16)
        print(f"{name} (bfloat16, 1 thread, CPU time, best of {args.rounds}):", flush=True)
        for tokens in args.tokens:
            best = {p: (float("inf"), 0.0) for p in here}
            try:
                for _ in range(args.rounds):
                    for p in here:
                        if p == "FMA kernel" and tokens > cpu_decode.EXPERTS_MAX_TOKENS:
                            continue
                        use(model, p)
                        ms, err = layer(model, tokens)
                        best[p] = min(best[p], (ms, err))
            finally:
                use(model, here[-1])
            cells = [f"{p} {ms:6.2f} ms (from float32 {err:.4f})" for p, (ms, err) in best.items() if ms < float("inf")]
            print(f"  routed experts, {tokens:4} tokens: " + "  ".join(cells), flush=True)
        if args.batch:
            engines = ("FMA kernel", "AMX kernel") if "AMX kernel" in here else ("FMA kernel",)
            steps = {p: float("inf") for p in engines}
            try:
                for _ in range(args.rounds):
                    for p in engines:
                        use(model, p)
                        steps[p] = min(steps[p], step_ms(model, args.batch))
            finally:
                use(model, here[-1])
            cells = [f"{p} {ms:6.2f} ms" for p, ms in steps.items()]
            print(f"  engine decode step, {args.batch} sequences: " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
