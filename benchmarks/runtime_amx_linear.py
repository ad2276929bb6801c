"""A bfloat16 linear of a few rows, the AMX kernel against oneDNN's matmul: `python -m
benchmarks.runtime_amx_linear` (not part of `make bench`; needs a CPU with AMX).

kernels/cpu_decode.py sends a linear of 2 .. amx_max_rows() bfloat16 rows to moe_amx_linear, which
reads the weights as they are (row-major), against oneDNN's matmul (kernels/shapes.py: rows padded
to a bucket), which reorders plain weights at every call. This times both on the weight shapes of
the benchmark checkpoints (benchmarks/runtime_vs_vllm.py: attention, MLP, output head), torch on
one thread as the engine runs on 2 cores, each product on a fresh copy of its weights out of a
rotation larger than the caches (as a decode step reads every weight once), alternating the two,
best of `--rounds` in CPU time, and prints the speed at which each reads the weights. With
`--helpers N` the kernels' helper threads share the AMX kernel's weight rows (oneDNN stays on
torch's one thread, as in the engine), and the times are wall-clock.
"""

from __future__ import annotations

import argparse
import time

import torch

from model_runtime.kernels import cpu_decode, shapes

ROTATION_BYTES = 512 << 20  # more weight copies than the 300 MB L3 of the host this was measured on
SHAPES = {  # [out, in]
    "q/k/v D 1024": (1536, 1024),
    "o D 1024": (1024, 1024),
    "gate/up D 1024": (4096, 1024),
    "q/k/v D 256": (384, 256),
    "output head 32000 x 1024": (32000, 1024),
}


def timed(fn, weights: list[torch.Tensor], repeats: int, clock=time.process_time) -> float:
    """ms of one product by `clock`, each on the next weight copy."""
    start = clock()
    for i in range(repeats):
        fn(weights[i % len(weights)])
    return (clock() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--helpers", type=int, default=0, help="the kernels' helper threads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not cpu_decode.available() or not cpu_decode._amx:
        raise SystemExit("this CPU (or OS) does not run the AMX kernel: nothing to compare")
    if cpu_decode.start_helpers(args.helpers) != args.helpers:
        raise SystemExit(f"--helpers {args.helpers}: could not start them")
    clock = time.perf_counter if args.helpers else time.process_time
    if not all(2 <= rows <= cpu_decode.amx_max_rows() for rows in args.rows):
        parser.error(f"--rows: the AMX kernel takes 2 to {cpu_decode.amx_max_rows()} rows")
    print(f"{'weights':<26} {'rows':>4} {'oneDNN ms':>10} {'AMX ms':>8} {'oneDNN GB/s':>12} {'AMX GB/s':>9} {'ratio':>6}")
    with torch.no_grad():
        for name, (out, inn) in SHAPES.items():
            mb = out * inn * 2 / 1e6
            weights = [torch.randn(out, inn).bfloat16() for _ in range(max(2, ROTATION_BYTES // (out * inn * 2)))]
            repeats = max(4, min(200, int(2000 / mb)))
            for rows in args.rows:
                x = torch.randn(rows, inn).bfloat16()
                paths = {"oneDNN": lambda w, x=x: shapes.linear(x, w), "AMX": lambda w, x=x: cpu_decode.amx_linear(x, w)}
                for fn in paths.values():  # warm: oneDNN's kernel for this shape built
                    fn(weights[0])
                best = {p: float("inf") for p in paths}
                for _ in range(args.rounds):
                    for p, fn in paths.items():
                        best[p] = min(best[p], timed(fn, weights, repeats, clock))
                a, b = best["oneDNN"], best["AMX"]
                print(f"{name:<26} {rows:>4} {a:>10.3f} {b:>8.3f} {mb / a:>12.1f} {mb / b:>9.1f} {a / b:>5.2f}x")


if __name__ == "__main__":
    main()
