"""Tensor + expert parallel benchmark: `python -m benchmarks.runtime_parallel` (in `make bench`).

Prints four tables:
1. Memory per rank at 1, 2 and 4 ranks (expert parallel, and tensor parallel experts without it):
   the weight bytes each rank holds (`Transformer.weight_bytes()` of the part `load_model` loads for
   that rank) and the tokens its KV cache holds in the engine's default KV budget
   (`kv_cache_memory_bytes // kv_cache_bytes_per_token`), for the builtin tiny-mixtral (GQA: the
   key/value heads split) and a ~190M-parameter DeepSeek-V3-like checkpoint with random bfloat16
   weights written by `save_checkpoint` into a temporary directory (MLA: the latent is replicated).
2. Step time of that checkpoint at 1, 2 and 4 ranks, each rank a process started with the spawn
   context and joined over gloo on this machine (`init_comm`), for a decode step of 1 and of 32
   sequences and one prefill chunk, through `forward_paged` over a paged KV cache as the engine
   runs it; with the share of each step spent inside `Comm.all_reduce` (wrapped with a timer in
   every rank; it includes waiting for the slowest rank). Torch threads per rank:
   max(1, cores // ranks), so the ranks never have more threads than the machine has cores.
3. Which published models fit which GPU layouts: each model's config.json fields read by
   `ModelConfig.from_hf` and every rank's part built on the meta device with
   `Transformer(cfg, Shard(rank, world, expert_parallel=True))`; weights per rank are its
   parameters' and persistent buffers' elements times bytes per element. DeepSeek-V3 is counted as
   its published FP8 checkpoint stores it (which does not load yet: the next issue).
4. Serving throughput at 1 vs 2 ranks (`--serving`, on by default; `--no-serving` skips it):
   `moe-runtime serve --device cpu` subprocesses on 127.0.0.1, one at a time (each started afresh
   for its run, stopped before the next starts), for builtin:tiny-deepseek-v3 and the checkpoint
   above, at 1 rank and at `--tensor-parallel-size 2 --enable-expert-parallel`; each run sends
   streaming OpenAI completions (greedy, `ignore_eos`): one client's requests one after another,
   then a number of requests all at once; output tokens per second and TTFT p50 of each, in
   alternating rounds (1 rank, 2 ranks, 1 rank, 2 ranks, ...), the best round of each kept.
   Every request has a timeout and the section a time limit; requests it cuts short count as failed.

On a CPU the parallel step times say what the collectives cost against the compute they split,
not what GPUs would gain; the memory tables hold on any device.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch

from model_runtime.distributed.shard import Shard
from model_runtime.engine.config import EngineConfig
from model_runtime.models.builtin import random_model
from model_runtime.models.config import ModelConfig
from model_runtime.models.loading import load_model, save_checkpoint
from model_runtime.models.model import SINGLE, Transformer

MiB, GiB = 2**20, 2**30
CORES = len(os.sched_getaffinity(0))
BLOCK_SIZE = EngineConfig().block_size
KV_BUDGET = 256 * MiB  # the engine's default KV cache on the CPU
BARE_REPEAT = 20  # all-reduces timed alone per scenario
DTYPE = torch.bfloat16

# DeepSeek-V3's shape (MLA, sigmoid routing within 2 of 4 expert groups, one shared expert, a dense
# first layer) at ~190M parameters: 378 MB in bfloat16. Field names as its config.json spells them.
SYNTHETIC = dict(
    architectures=["DeepseekV3ForCausalLM"],
    model_type="deepseek_v3",
    vocab_size=16384,
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=1,
    n_routed_experts=32,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    q_lora_rank=384,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    max_position_embeddings=4096,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    bos_token_id=0,
    eos_token_id=1,
)

# Published config.json files (the fields that shape the weights, as the model cards' files spell them).
DEEPSEEK_V3_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
PUBLISHED: dict[str, dict] = {
    "DeepSeek-V3": dict(  # deepseek-ai/DeepSeek-V3 (671B); its quantization_config is above
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_nextn_predict_layers=1,  # the multi-token-prediction layer: not built, not counted
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        first_k_dense_replace=3,
        moe_layer_freq=1,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        attention_bias=False,
        max_position_embeddings=163840,
        rope_theta=10000,
        rope_scaling={
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        torch_dtype="bfloat16",
    ),
    "Mixtral-8x22B": dict(  # mistralai/Mixtral-8x22B-v0.1
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        vocab_size=32768,
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=65536,
        rope_theta=1000000,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    ),
    "Qwen3-235B-A22B": dict(  # Qwen/Qwen3-235B-A22B
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=94,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        attention_bias=False,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        torch_dtype="bfloat16",
    ),
}
FP8_MODELS = {"DeepSeek-V3": DEEPSEEK_V3_QUANTIZATION}

# Memory as nvidia-smi reports it (81559 MiB, 143771 MiB); 10% of it is left for activations,
# the CUDA context and the allocator, as vLLM's default --gpu-memory-utilization 0.9 does.
GPUS = {"H100 80GB": 81559 * MiB, "H200 141GB": 143771 * MiB}
GPU_UTILIZATION = 0.9
LAYOUTS = ((1, 8), (2, 8))  # (pods, GPUs per pod)


class _Unused:
    """The comm of a rank part built only to be measured: its forward pass is never run."""

    def all_reduce(self, x):
        raise RuntimeError("this model part is only measured, not run")


NO_COMM = _Unused()


# -- tables -----------------------------------------------------------------------------------------


def format_table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """An aligned plain-text table (numbers right-aligned: the columns in `right`)."""
    right = right or set()
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            f"{c:>{w}}" if i in right else f"{c:<{w}}"
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)])


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB" if n >= 10 * MiB else f"{n / 1024:.1f} KiB"


def layouts(max_ranks: int) -> list[tuple[int, bool]]:
    """(ranks, expert parallel): one rank, then each count with expert parallelism, then without."""
    counts = [n for n in (2, 4) if n <= max_ranks]
    return [(1, False), *[(n, True) for n in counts], *[(n, False) for n in counts]]


def layout_name(world: int, ep: bool) -> str:
    if world == 1:
        return "1 rank"
    return f"{world} ranks, " + ("EP experts" if ep else "TP experts")


# -- 1. memory per rank -----------------------------------------------------------------------------


def memory_rows(label: str, src: str, max_ranks: int) -> list[list[str]]:
    """One row per layout: the weights and KV capacity of each rank's part as load_model loads it."""
    rows = []
    whole = None
    for world, ep in layouts(max_ranks):
        weights, kv = [], []
        for rank in range(world):
            shard = Shard(rank, world, ep) if world > 1 else SINGLE
            model = load_model(src, dtype=DTYPE, shard=shard, comm=NO_COMM if world > 1 else None)
            weights.append(model.weight_bytes())
            kv.append(model.kv_cache_bytes_per_token(DTYPE))
            del model
        if world == 1:
            whole = weights[0]
        span = (
            mib(max(weights))
            if min(weights) == max(weights)
            else f"{mib(min(weights))} - {mib(max(weights))}"
        )
        rows.append(
            [
                label,
                layout_name(world, ep),
                span,
                f"{max(weights) / whole:.2f}",
                f"{sum(weights) / whole:.2f}",
                f"{max(kv)} B",
                f"{KV_BUDGET // max(kv):,}",
            ]
        )
    return rows


# -- 2. step time -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    seqs: int  # sequences in the step
    cached: int  # tokens each already has in the cache
    new: int  # new tokens each brings
    warmup: int
    steps: int


def scenarios(quick: bool) -> list[Scenario]:
    k = 2 if quick else 1
    return [
        Scenario("decode, 1 sequence", 1, 256, 1, 3, 20 // k),
        Scenario("decode, 32 sequences", 32, 256, 1, 2, 10 // k),
        Scenario(f"prefill chunk, {256 if quick else 512} tokens", 1, 0, 256 if quick else 512, 1, 4 // k),
    ]


def paged_step(sc: Scenario, vocab: int):
    """(tokens, batch, blocks needed) of one engine step: each sequence its own blocks."""
    from model_runtime.models.paged import build_paged_batch

    per_seq = math.ceil((sc.cached + sc.new) / BLOCK_SIZE)
    seqs = [(list(range(i * per_seq, (i + 1) * per_seq)), sc.cached, sc.new) for i in range(sc.seqs)]
    batch = build_paged_batch(seqs, BLOCK_SIZE)
    g = torch.Generator().manual_seed(sc.seqs * 1000 + sc.new)
    tokens = torch.randint(2, vocab, (sc.seqs * sc.new,), generator=g)
    return tokens, batch, sc.seqs * per_seq


class AllReduceTimer:
    """Replaces comm.all_reduce in one rank: the same call, its seconds and calls counted."""

    def __init__(self, comm):
        self.inner = comm.all_reduce
        self.seconds = 0.0
        self.calls = 0
        comm.all_reduce = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner(x)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def rank_main(
    rank: int, world: int, port: int, src: str, ep: bool, threads: int, plan: list[Scenario], q
) -> None:
    """One rank's process: join the group, load its part, run every scenario's steps, report."""
    try:
        torch.set_num_threads(threads)
        comm = timer = None
        if world > 1:
            from model_runtime.distributed.comm import init_comm
            from model_runtime.distributed.config import ParallelConfig

            parallel = ParallelConfig(tensor_parallel_size=world, enable_expert_parallel=ep, master_port=port)
            comm = init_comm(parallel, rank, torch.device("cpu"))
            timer = AllReduceTimer(comm)
        model = load_model(src, dtype=DTYPE, shard=comm.shard(ep) if comm else SINGLE, comm=comm)
        vocab = model.config.vocab_size
        steps = [paged_step(sc, vocab) for sc in plan]
        cache = model.allocate_kv_cache(max(s[2] for s in steps), BLOCK_SIZE, DTYPE)
        out = {}
        for sc, (tokens, batch, _) in zip(plan, steps, strict=True):
            if comm is not None:
                comm.agree_min(0)  # every rank starts the scenario together
            times, reduced = [], []
            calls0 = timer.calls if timer else 0
            for i in range(sc.warmup + sc.steps):
                ar0 = timer.seconds if timer else 0.0
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.forward_paged(tokens, batch, cache)
                if i >= sc.warmup:
                    times.append(time.perf_counter() - t0)
                    reduced.append((timer.seconds if timer else 0.0) - ar0)
            calls = ((timer.calls if timer else 0) - calls0) // (sc.warmup + sc.steps)
            alone = []  # the same all-reduce with nothing to wait for: gloo's own cost
            if comm is not None:
                x = torch.zeros(tokens.shape[0], model.config.hidden_size, dtype=DTYPE)
                comm.agree_min(0)
                for _ in range(BARE_REPEAT):
                    t1 = time.perf_counter()
                    timer.inner(x)
                    alone.append(time.perf_counter() - t1)
            out[sc.name] = (times, reduced, calls, alone)
        q.put((rank, out, None))
        if comm is not None:
            comm.agree_min(0)
            comm.close()
    except BaseException:
        q.put((rank, None, traceback.format_exc()))


class OtherLoad:
    """The CPU cores that processes other than this one and its children kept busy meanwhile
    (/proc/stat's busy time less our own and our reaped children's CPU time, over the wall time)."""

    cores = 0.0

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        import resource

        return sum(
            r.ru_utime + r.ru_stime
            for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )

    def __enter__(self) -> OtherLoad:
        self.t0, self.busy0, self.ours0 = time.perf_counter(), self._busy(), self._ours()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        others = (self._busy() - self.busy0) - (self._ours() - self.ours0)
        self.cores = max(0.0, others / wall)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    src: str, world: int, ep: bool, threads: int, plan: list[Scenario], timeout_s: float = 600
) -> dict:
    """Start `world` rank processes (spawn), return {rank: results}; raise on any rank's error."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, src, ep, threads, plan, q)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, out, err = q.get(timeout=timeout_s)
            if err:
                errors.append(f"rank {rank}:\n{err}")
                break
            results[rank] = out
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError(f"{world} ranks ({'EP' if ep else 'TP'}): " + "\n".join(errors))
    return results


def step_runs(max_ranks: int) -> list[tuple[int, bool, int]]:
    """(ranks, expert parallel, torch threads per rank) of each timed run: one rank with as many
    threads as cores (the reference), and with one (what each rank of two gets), then the layouts."""
    runs = [(1, False, CORES)]
    if CORES > 1:
        runs.append((1, False, 1))
    return runs + [(world, ep, max(1, CORES // world)) for world, ep in layouts(max_ranks) if world > 1]


def step_rows(src: str, plan: list[Scenario], max_ranks: int, rounds: int) -> list[list[str]]:
    """Every run in turn, `rounds` times over (alternating: load from other processes falls on all
    alike); per run and scenario the round with the lowest median step is kept (noise only slows)."""
    runs = step_runs(max_ranks)
    best: dict[tuple[int, str], tuple[float, dict, float]] = {}  # (run, scenario) -> (median, results, other)
    for _ in range(rounds):
        for i, (world, ep, threads) in enumerate(runs):
            with OtherLoad() as other:
                results = run_ranks(src, world, ep, threads, plan)
            for sc in plan:
                step = statistics.median(results[0][sc.name][0])
                if (i, sc.name) not in best or step < best[i, sc.name][0]:
                    best[i, sc.name] = (step, results, other.cores)
    rows = []
    for i, (world, ep, threads) in enumerate(runs):
        for sc in plan:
            step, results, other = best[i, sc.name]
            times, reduced, calls, alone = results[0][sc.name]
            shares = [sum(results[r][sc.name][1]) / sum(results[r][sc.name][0]) for r in sorted(results)]
            if world == 1:
                share = per_call = "-"
            else:
                share = f"{shares[0]:.0%} ({', '.join(f'{x:.0%}' for x in shares)})"
                per_call = (
                    f"{calls} x {statistics.median(reduced) / calls * 1e3:.2f} / "
                    f"{statistics.median(alone) * 1e3:.2f}"
                )
            rows.append(
                [
                    layout_name(world, ep),
                    str(threads),
                    sc.name,
                    f"{step * 1e3:.1f}",
                    f"{best[0, sc.name][0] / step:.2f}x",
                    share,
                    per_call,
                    f"{other:.2f}",
                ]
            )
    return rows


# -- 3. published models on GPU layouts -------------------------------------------------------------


def published_config(name: str) -> ModelConfig:
    """ModelConfig.from_hf of the published config.json (its quantization_config left out: FP8
    checkpoints do not load yet, and from_hf refuses them)."""
    return ModelConfig.from_hf(dict(PUBLISHED[name]), source=f"{name}/config.json")


def stored_bytes(name: str, t: torch.Tensor, fp8_block: list[int] | None) -> int:
    """Bytes one tensor of a rank's part takes as the checkpoint stores it: bfloat16 (float32
    buffers as they are), or for an FP8 checkpoint (DeepSeek-V3's) every projection and expert
    matrix in 1 byte per element plus one float32 scale per 128 x 128 block, and the embedding,
    lm_head, norms and router in bfloat16, as the published files hold them."""
    if t.dtype == torch.float32 and name.endswith("e_score_correction_bias"):
        return t.numel() * 4
    matrix = (
        t.dim() >= 2
        and name not in ("embed_tokens.weight", "lm_head.weight")
        and not name.endswith("mlp.gate.weight")
    )
    if fp8_block is None or not matrix:
        return t.numel() * 2
    rows, cols = t.shape[-2:]
    blocks = math.prod(t.shape[:-2]) * math.ceil(rows / fp8_block[0]) * math.ceil(cols / fp8_block[1])
    return t.numel() + 4 * blocks


def rank_part(cfg: ModelConfig, rank: int, world: int) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg, Shard(rank, world, expert_parallel=True), NO_COMM if world > 1 else None)


def part_bytes(model: Transformer, fp8_block: list[int] | None) -> int:
    return sum(stored_bytes(n, t, fp8_block) for n, t in model.state_dict().items())


def layout_rows(names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(models: params and whole size; layouts: per-rank weights and fit on each GPU)."""
    models, rows = [], []
    for name in names:
        cfg = published_config(name)
        quant = FP8_MODELS.get(name)
        block = quant["weight_block_size"] if quant else None
        precision = "FP8 (next issue)" if quant else "bf16"
        whole = rank_part(cfg, 0, 1)
        params = sum(p.numel() for p in whole.parameters())
        active = sum(
            p.numel() * (cfg.num_experts_per_tok / cfg.num_experts if ".experts." in n else 1)
            for n, p in whole.named_parameters()
            if n != "embed_tokens.weight"
        )
        models.append(
            [
                name,
                precision,
                f"{params / 1e9:.1f}B",
                f"{active / 1e9:.1f}B",
                f"{part_bytes(whole, block) / GiB:.0f} GiB",
                f"{cfg.attention.upper()}",
            ]
        )
        del whole
        for pods, gpus in LAYOUTS:
            world = pods * gpus
            sizes, experts = [], []
            for rank in range(world):
                part = rank_part(cfg, rank, world)
                sizes.append(part_bytes(part, block))
                experts.append(Shard(rank, world, True).experts(cfg.num_experts))
                if rank == 0:
                    kv = part.kv_cache_bytes_per_token(torch.bfloat16)
            counts = [e1 - e0 for e0, e1 in experts]
            per_rank = max(sizes)
            cells = []
            for memory in GPUS.values():
                usable = memory * GPU_UTILIZATION
                if per_rank <= usable:
                    tokens = int((usable - per_rank) // kv)
                    cells.append(f"yes {per_rank / memory:.0%}, {tokens / 1e3:,.0f}k KV tok")
                else:
                    cells.append(f"no: {per_rank / memory:.0%}")
            rows.append(
                [
                    name,
                    f"{pods}x{gpus}",
                    str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}",
                    f"{per_rank / GiB:.1f} GiB",
                    f"{kv / 1024:.1f} KiB",
                    *cells,
                ]
            )
    return models, rows


# -- 4. serving throughput at 1 vs 2 ranks ----------------------------------------------------------

SERVING_LAYOUTS = ((1, False), (2, True))  # (ranks, expert parallel), alternated in every round
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class ServingPlan:
    sequential: int  # requests one client sends one after another
    concurrent: int  # requests sent all at once
    max_tokens: int  # output tokens of each request (greedy, EOS ignored)
    prompt_chars: int
    rounds: int
    request_timeout_s: float  # each request (and the server's --request-timeout)
    start_timeout_s: float  # a server's start until ready
    time_limit_s: float  # the whole section: no run starts after it, and it cuts requests short

    def prompt(self, kind: str, i: int) -> str:
        text = f"{kind} request {i}: the experts route tokens. "
        return (text * (self.prompt_chars // len(text) + 1))[: self.prompt_chars]


def serving_plan(quick: bool, rounds: int | None) -> ServingPlan:
    if quick:
        return ServingPlan(4, 32, 32, 64, rounds or 1, 60.0, 180.0, 300.0)
    return ServingPlan(8, 32, 64, 64, rounds or 3, 120.0, 240.0, 1500.0)


@dataclass
class Load:
    """One load pattern of one run: completion tokens over its wall time, and each request's TTFT."""

    tokens: int = 0
    wall_s: float = 0.0
    failures: int = 0
    ttft_s: list[float] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def ttft_p50_s(self) -> float:
        return statistics.median(self.ttft_s) if self.ttft_s else float("nan")


@dataclass
class ServingRun:
    ready_s: float  # from starting the server to ready
    single: Load  # one client, requests one after another
    concurrent: Load  # all requests at once
    other_cores: float  # CPU cores other processes kept busy while the loads ran


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of a process and all its live descendants (the server, its engine
    process and rank processes)."""
    ppid, cpu = {}, {}
    clock = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        ppid[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / clock
    tree, total, grew = {root}, 0.0, True
    while grew:
        grew = False
        for pid, parent in ppid.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    for pid in tree:
        total += cpu.get(pid, 0.0)
    return total


class ServeProcess:
    """One `moe-runtime serve` subprocess on 127.0.0.1 (a free port, no gRPC), in its own process
    group; its output in a temporary file, shown when it fails."""

    def __init__(self, model: str, ranks: int, ep: bool, plan: ServingPlan):
        self.base = f"http://127.0.0.1:{free_port()}"
        args = [sys.executable, "-m", "model_runtime.cli", "serve", "--model", model, "--host", "127.0.0.1"]
        args += ["--http-port", self.base.rsplit(":", 1)[1], "--grpc-port", "0", "--device", "cpu"]
        args += ["--dtype", "float32"]  # as the README's table 4 was measured (auto is bf16 on AMX CPUs)
        args += [
            "--max-num-seqs",
            str(max(plan.concurrent, 1)),
            "--request-timeout",
            str(plan.request_timeout_s),
        ]
        args += ["--log-level", "warning", "--tensor-parallel-size", str(ranks)]
        if ep:
            args.append("--enable-expert-parallel")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("POD_IP", None)
        env.pop("MOE_REVISION", None)
        self.log = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, start_new_session=True
        )

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM (nothing is in flight: it drains at once), then SIGKILL to its process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # rank processes left behind, if any
        self.proc.wait()
        self.log.close()


async def _serving_run(server: ServeProcess, plan: ServingPlan, deadline: float) -> ServingRun:
    """Wait for the server, warm it up, then time one client's requests and then all at once."""
    import aiohttp

    def timeout() -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=max(1.0, min(plan.request_timeout_s, deadline - time.monotonic())))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=plan.concurrent + 4)) as session:
        ready_by = min(server.started + plan.start_timeout_s, deadline)
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.logs()}")
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with session.get(
                    f"{server.base}/v2/health/ready", timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > ready_by:
                raise TimeoutError(
                    f"server not ready after {time.monotonic() - server.started:.0f}s:\n{server.logs()}"
                )
            await asyncio.sleep(0.1)  # polling with a deadline
        ready_s = time.monotonic() - server.started
        async with session.get(f"{server.base}/v1/models", timeout=timeout()) as r:
            model_name = (await r.json())["data"][0]["id"]

        async def one(prompt: str, max_tokens: int) -> tuple[float, int] | None:
            """(TTFT: the first streamed chunk, i.e. token, completion tokens), or None if it failed."""
            body = {
                "model": model_name,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,  # vLLM's extension, as extra_body={"ignore_eos": True} sends it
                # a chunk for every token, its text empty or not: a random checkpoint's tokens past
                # the byte-level tokenizer's 261 decode to nothing, and would stream no chunk
                "logprobs": 0,
                "stream": True,
            }
            start, ttft, tokens = time.monotonic(), None, 0
            try:
                async with session.post(f"{server.base}/v1/completions", json=body, timeout=timeout()) as r:
                    if r.status != 200:
                        await r.read()
                        return None
                    async for line in r.content:
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        chunk = json.loads(line[6:])
                        if ttft is None and chunk.get("choices"):
                            ttft = time.monotonic() - start
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            except (TimeoutError, aiohttp.ClientError):
                return None
            return (ttft, tokens) if ttft is not None and tokens == max_tokens else None

        def load(results: list, wall_s: float) -> Load:
            done = [x for x in results if x is not None]
            return Load(sum(t for _, t in done), wall_s, len(results) - len(done), [f for f, _ in done])

        # warm-up: one whole request and a short burst of all at once (the batch's shapes)
        await one(plan.prompt("warm-up", 0), plan.max_tokens)
        await asyncio.gather(*(one(plan.prompt("warm-up", i), 4) for i in range(plan.concurrent)))

        own0, tree0, busy0, t0 = (
            time.process_time(),
            tree_cpu_s(server.proc.pid),
            OtherLoad._busy(),
            time.monotonic(),
        )
        results = []
        for i in range(plan.sequential):
            if time.monotonic() > deadline:
                results.append(None)
                continue
            results.append(await one(plan.prompt("single", i), plan.max_tokens))
        single = load(results, time.monotonic() - t0)
        t1 = time.monotonic()
        results = await asyncio.gather(
            *(one(plan.prompt("batch", i), plan.max_tokens) for i in range(plan.concurrent))
        )
        concurrent = load(results, time.monotonic() - t1)
        wall = time.monotonic() - t0
        others = (
            (OtherLoad._busy() - busy0) - (tree_cpu_s(server.proc.pid) - tree0) - (time.process_time() - own0)
        )
        return ServingRun(ready_s, single, concurrent, max(0.0, others / wall))


def serving_runs(models: list[tuple[str, str]], plan: ServingPlan) -> tuple[dict, list[str]]:
    """{(model label, layout): [ServingRun per round]} and the errors; the layouts alternate within
    every round, one server at a time."""
    deadline = time.monotonic() + plan.time_limit_s
    runs: dict[tuple[str, tuple[int, bool]], list[ServingRun]] = {}
    errors: list[str] = []
    for rnd in range(plan.rounds):
        for label, src in models:
            for ranks, ep in SERVING_LAYOUTS:
                name = f"round {rnd + 1}/{plan.rounds}, {label}, {layout_name(ranks, ep)}"
                if time.monotonic() > deadline:
                    errors.append(f"{name}: not run, the {plan.time_limit_s:.0f} s time limit had passed")
                    continue
                server = ServeProcess(src, ranks, ep, plan)
                try:
                    run = asyncio.run(_serving_run(server, plan, deadline))
                except Exception as e:  # noqa: BLE001 - reported with the table, the other runs go on
                    errors.append(f"{name}: {type(e).__name__}: {e}")
                    print(f"serving {name}: failed: {e}", file=sys.stderr, flush=True)
                    continue
                finally:
                    server.stop()
                runs.setdefault((label, (ranks, ep)), []).append(run)
                print(
                    f"serving {name}: ready {run.ready_s:.1f} s, "
                    f"1 client {run.single.tokens_per_s:.1f} tok/s, "
                    f"{plan.concurrent} at once {run.concurrent.tokens_per_s:.1f} tok/s, "
                    f"other work {run.other_cores:.2f} cores",
                    file=sys.stderr,
                    flush=True,
                )
    return runs, errors


def _best(runs: list[ServingRun], pick) -> Load | None:
    """The round with the most tokens/s among those with no failed request (else among all)."""
    loads = [pick(r) for r in runs]
    clean = [x for x in loads if not x.failures] or loads
    return max(clean, key=lambda x: x.tokens_per_s) if clean else None


def serving_rows(models: list[tuple[str, str]], runs: dict, plan: ServingPlan) -> list[list[str]]:
    def ms(x: float) -> str:
        return "-" if math.isnan(x) else f"{x * 1e3:.0f}"

    rows = []
    for label, _ in models:
        best = {}
        for layout in SERVING_LAYOUTS:
            rs = runs.get((label, layout), [])
            if not rs:
                rows.append([label, layout_name(*layout), "-", "no run", "-", "no run", "-", "-", "-"])
                continue
            single = _best(rs, lambda r: r.single)
            batch = _best(rs, lambda r: r.concurrent)
            best[layout] = (single, batch)
            rows.append(
                [
                    label,
                    layout_name(*layout),
                    f"{min(r.ready_s for r in rs):.1f}",
                    f"{single.tokens_per_s:.1f} ({', '.join(f'{r.single.tokens_per_s:.0f}' for r in rs)})",
                    ms(single.ttft_p50_s),
                    f"{batch.tokens_per_s:.1f} ({', '.join(f'{r.concurrent.tokens_per_s:.0f}' for r in rs)})",
                    ms(batch.ttft_p50_s),
                    str(sum(r.single.failures + r.concurrent.failures for r in rs)),
                    ", ".join(f"{r.other_cores:.2f}" for r in rs),
                ]
            )
        if len(best) == 2:
            (s1, b1), (s2, b2) = best[SERVING_LAYOUTS[0]], best[SERVING_LAYOUTS[1]]

            def ratio(a: float, b: float) -> str:
                return f"{a / b:.2f}x" if b and not math.isnan(a / b) else "-"

            rows.append(
                [
                    label,
                    "2 ranks / 1 rank",
                    "",
                    ratio(s2.tokens_per_s, s1.tokens_per_s),
                    ratio(s2.ttft_p50_s, s1.ttft_p50_s),
                    ratio(b2.tokens_per_s, b1.tokens_per_s),
                    ratio(b2.ttft_p50_s, b1.ttft_p50_s),
                    "",
                    "",
                ]
            )
    return rows


# -- the run ----------------------------------------------------------------------------------------


def synthetic_checkpoint(directory: str, quick: bool) -> tuple[str, int]:
    hf = dict(SYNTHETIC)
    if quick:
        hf["num_hidden_layers"] = 3
    cfg = ModelConfig.from_hf(hf, source="synthetic DeepSeek-V3-like")
    model = random_model(cfg, dtype=DTYPE, seed=0)
    params = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, directory)
    return directory, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runtime_parallel", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 layers, up to 2 ranks, fewer steps, one round (~1 min)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternating rounds of the step timings (default 2, --quick 1)",
    )
    parser.add_argument(
        "--serving",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="table 4: serving throughput at 1 vs 2 ranks through `moe-runtime serve` (~5 min; "
        "--quick: tiny-deepseek-v3 only, one round, ~1 min)",
    )
    parser.add_argument(
        "--serving-rounds",
        type=int,
        default=None,
        help="alternating rounds of the serving runs (default 3, --quick 1)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    plan4 = serving_plan(args.quick, args.serving_rounds)
    models4 = [("tiny-deepseek-v3 (builtin)", "builtin:tiny-deepseek-v3")]
    serving = None
    t0 = time.perf_counter()
    max_ranks = 2 if args.quick else 4
    torch.set_num_threads(CORES)

    print(
        f"runtime_parallel: torch {torch.__version__}, CPU only, {CORES} CPU cores "
        f"(load average {os.getloadavg()[0]:.1f}); ranks are processes joined over gloo on loopback; "
        f"torch threads per rank = max(1, {CORES} // ranks), so at 4 ranks 4 processes share {CORES} cores; "
        f"weights and KV cache bfloat16{'; --quick' if args.quick else ''}"
    )
    with tempfile.TemporaryDirectory(prefix="moe-parallel-bench-") as tmp:
        src, params = synthetic_checkpoint(tmp, args.quick)
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        synthetic = f"DeepSeek-V3-like {params / 1e6:.0f}M"
        print(
            f"checkpoint: {synthetic} (random weights, {size / 1e6:.0f} MB of safetensors in a temp dir): "
            f"{SYNTHETIC['hidden_size']} hidden, "
            f"{3 if args.quick else SYNTHETIC['num_hidden_layers']} layers (first dense), "
            f"{SYNTHETIC['num_attention_heads']} MLA heads, {SYNTHETIC['n_routed_experts']} routed experts "
            f"(top {SYNTHETIC['num_experts_per_tok']}) of {SYNTHETIC['moe_intermediate_size']} + 1 shared"
        )

        print(f"\n1. Memory per rank (KV budget {KV_BUDGET // MiB} MiB per rank, the engine's CPU default)\n")
        rows = memory_rows("tiny-mixtral (builtin)", "builtin:tiny-mixtral", max_ranks)
        rows += memory_rows(synthetic, src, max_ranks)
        header = [
            "model",
            "layout",
            "weights per rank",
            "x whole",
            "sum x whole",
            "KV per token",
            "KV tokens per rank",
        ]
        print(format_table(header, rows, right={2, 3, 4, 5, 6}))
        print(
            "x whole: the largest rank's weights over the whole model's; sum x whole: all ranks' together "
            "(above 1: the replicated embedding, norms, routers, lm_head; MLA's kv_a_proj)"
        )

        plan = scenarios(args.quick)
        print(
            f"\n2. Step time of {synthetic}, forward_paged over a paged KV cache (block {BLOCK_SIZE}; "
            f"decode context {plan[0].cached} tokens; median of {plan[0].steps} / {plan[1].steps} / "
            f"{plan[2].steps} steps after warm-up, the better of {args.rounds} alternating round(s)), "
            "rank 0's clock\n"
        )
        header = [
            "layout",
            "threads/rank",
            "step",
            "ms/step",
            "vs 1 rank",
            "in all-reduce: rank 0 (each rank)",
            "all-reduces x ms in step / alone",
            "other work",
        ]
        print(format_table(header, step_rows(src, plan, max_ranks, args.rounds), right={1, 3, 4}))
        print(
            f"vs 1 rank: against 1 rank with {CORES} threads. in all-reduce: the share of the step time spent inside "
            "Comm.all_reduce (waiting for the slowest rank included). all-reduces: calls per step (one after "
            "attention, one after the MLP/MoE, per layer) x median ms per call in the step, and of the same "
            f"all-reduce run alone with nothing to wait for (median of {BARE_REPEAT}): gloo's own cost. "
            "other work: CPU cores other processes on the host kept busy during the run (slows every figure)"
        )

        if args.serving:  # while the checkpoint is on disk; printed as table 4
            if not args.quick:
                models4.append((synthetic, src))
            serving = serving_runs(models4, plan4)

    print(
        f"\n3. Models and GPU layouts: weights per rank, expert parallel, built on the meta device from "
        f"the published config.json (fits: weights <= {GPU_UTILIZATION:.0%} of the GPU's memory, the rest "
        f"for activations; KV tok: bf16 KV cache tokens per rank in what is left of the {GPU_UTILIZATION:.0%})\n"
    )
    models, rows = layout_rows(list(PUBLISHED))
    print(
        format_table(
            ["model", "weights", "params", "active/token", "whole", "attention"], models, right={2, 3, 4}
        )
    )
    print()
    header = ["model", "pods x GPUs", "experts/rank", "weights/rank", "KV/token/rank", *GPUS]
    print(format_table(header, rows, right={2, 3, 4}))
    print(
        "FP8 (next issue): DeepSeek-V3 counted as its published checkpoint stores it (projection and expert "
        "matrices e4m3 + a float32 scale per 128x128 block; embedding, lm_head, norms, router bf16); the "
        "runtime refuses FP8 checkpoints today. Largest rank shown; memory as nvidia-smi reports it "
        f"({', '.join(f'{k}: {v / GiB:.1f} GiB' for k, v in GPUS.items())})."
    )
    if serving is not None:
        runs, errors = serving
        print(
            f"\n4. Serving throughput: `moe-runtime serve --device cpu --dtype float32` (torch "
            f"threads per rank the server's max(1, ({CORES} - 1) // ranks)) at 1 rank and at "
            f"--tensor-parallel-size 2 --enable-expert-parallel, one server at a time, each started afresh "
            f"per run; streaming OpenAI completions of {plan4.prompt_chars}-char prompts and "
            f"{plan4.max_tokens} tokens (greedy, ignore_eos, logprobs 0: a chunk per token) from this "
            f"process: 1 client x {plan4.sequential} requests one after another, then {plan4.concurrent} "
            f"requests at once; after a warm-up; the best of {plan4.rounds} alternating "
            f"round(s) (1 rank, 2 ranks, ...), every round's figure in brackets\n"
        )
        header = [
            "model",
            "layout",
            "ready s",
            "1 client tok/s (rounds)",
            "TTFT p50 ms",
            f"{plan4.concurrent} at once tok/s (rounds)",
            "TTFT p50 ms",
            "failed",
            "other work",
        ]
        print(format_table(header, serving_rows(models4, runs, plan4), right={2, 3, 4, 5, 6, 7}))
        print(
            "tok/s: completion tokens over the wall time of the load; TTFT: to the first streamed chunk "
            "(token); "
            "ready s: start to ready, the fastest round; failed: requests that failed or ran out of time "
            f"(timeout {plan4.request_timeout_s:.0f} s each, {plan4.time_limit_s:.0f} s for the section); "
            "other work: CPU cores other processes on the host kept busy during each round's loads"
        )
        for error in errors:
            print(f"  {error}")
    print(
        f"\nbenchmark wall time {time.perf_counter() - t0:.0f} s (load average now {os.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
