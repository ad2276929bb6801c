"""What the engine's memory goes to: the KV cache's size, and one step's attention.

KV cache (`size_kv_cache`, each rank of a replica for itself; `join_replica` takes the fewest
blocks any rank can hold), the first that applies:

1. `EngineConfig.num_kv_blocks` (tests, benchmarks);
2. `kv_cache_memory_bytes` (`--kv-cache-memory`): that many bytes;
3. CUDA, as vLLM does: after loading, one profiling pass (`forward_paged` over
   max_num_batched_tokens dummy tokens in max_num_seqs sequences, through a tiny temporary cache)
   measures this process's peak (`torch.cuda.max_memory_allocated`); then
   `util x total - peak - memory outside torch's allocator (total - free - reserved: the CUDA
   context, NCCL, other processes) - the step attention budget`, and never more than what is free
   less the step's activations and the attention budget (`plan_cuda_kv_cache`). util is
   `gpu_memory_utilization`, 0.9 unless given. The attention budget is reserved on top of the
   profiling pass, whose contexts are short;
4. the CPU with `gpu_memory_utilization` given: the host's available memory (MemAvailable from
   /proc/meminfo, or less where the cgroup's limit leaves less), shared by this pod's CPU ranks,
   read after loading: `util x (available + weights) - weights - an estimate of one step's peak`
   (activations and the attention budget), at most CPU_KV_CACHE_MAX_BYTES (`plan_cpu_kv_cache`);
5. the CPU otherwise: DEFAULT_KV_CACHE_MEMORY_BYTES (256 MiB).

Step attention (`StepMemory`): each layer gathers every sequence's whole context through the block
tables into a dense [S, L_max, ...] tensor padded to the longest context of the step, and its
scores are [S, heads, Q_max, L_max] (Q_max: the most new tokens of one sequence in the step).
`StepMemory.attention_bytes(S, Q, L)` estimates one layer's share (layers run one after the other):

    S x L x (bytes of one context token of one layer, x CONTEXT_COPIES, plus the copies the
             attention makes: GQA's expanded heads in a prefill, MLA's expanded keys/values)
  + S x Q x L x (heads x SCORE_BYTES + MASK_BYTES)

(a GQA prefill on the CPU runs fused and keeps no scores: MASK_BYTES alone there). Measured on the
CPU, one forward pass of the tests' tiny models (peak RSS growth, MiB) against this estimate plus
`activation_bytes`: decodes of 64 sequences at 2048 tokens 63-73 / 87 (GQA), 34 / 67 (MLA), 103-109
/ 167 (Qwen3); prefills of 4 x 512 new tokens over 2048: 28-30 / 37, 181-182 / 234 (MLA expands its
keys and values), 31-33 / 48.

The scheduler keeps each step under `max_step_attention_bytes` by this estimate. A model that
knows better can say so with a method `attention_step_bytes(num_seqs, max_new, max_context) -> int`,
used when present.
"""

from __future__ import annotations

import gc
import logging
import math
from pathlib import Path

import torch

from model_runtime.engine.config import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_KV_CACHE_MEMORY_BYTES,
    EngineConfig,
    GiB,
    format_bytes,
)

log = logging.getLogger(__name__)

CPU_KV_CACHE_MAX_BYTES = 64 * GiB  # the most a CPU engine's KV cache takes when sized from the host's memory
CONTEXT_COPIES = 2.5  # the gathered context, a contiguous copy for the matmul, and a margin (measured)
SCORE_BYTES = 12  # per head, query and context token: float32 scores, their masked copy, the softmax
MASK_BYTES = 4  # per query and context token: the bool mask and the comparisons that build it
ACTIVATION_COPIES = 8  # hidden-sized activations of one token alive at once (residual, norms, q, out, ...)


class OutOfMemory(RuntimeError):
    """No memory is left for the KV cache: the engine cannot start."""


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failed: torch.OutOfMemoryError (CUDA), MemoryError, or a RuntimeError saying
    so (the CPU allocator's "DefaultCPUAllocator: can't allocate memory: ...")."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# -- one step's attention ------------------------------------------------------------------------


class StepMemory:
    """Estimates of the memory one step takes, for one rank's part of a model."""

    def __init__(self, model: torch.nn.Module, kv_dtype: torch.dtype):
        hook = getattr(model, "attention_step_bytes", None)
        self._hook = hook if callable(hook) else None
        cfg = getattr(model, "config", None)
        self.cfg = cfg
        num_layers = getattr(cfg, "num_hidden_layers", 0) or 0
        per_token = (
            model.kv_cache_bytes_per_token(kv_dtype) if hasattr(model, "kv_cache_bytes_per_token") else 0
        )
        self.context_bytes = per_token // num_layers if num_layers else 0  # one token, one layer
        layers = getattr(model, "layers", None)
        attn = getattr(layers[0], "self_attn", None) if layers is not None and len(layers) else None
        self.num_heads = int(getattr(attn, "num_heads", 0) or 0)  # this rank's query heads
        self.num_kv_heads = int(getattr(attn, "num_kv_heads", 1) or 1)  # MLA: one latent "head"
        dtype = getattr(model, "dtype", kv_dtype)
        self.itemsize = torch.empty(
            (), dtype=dtype if isinstance(dtype, torch.dtype) else kv_dtype
        ).element_size()
        self.mla = getattr(cfg, "attention", "gqa") == "mla"
        self.expands = getattr(attn, "expands", None) if self.mla else None  # MLAttention.expands
        self.expanded_bytes = 0  # MLA, long prefill chunk: per context token, keys and values per head
        if self.mla:
            P, R, Dv = (getattr(cfg, f, 0) for f in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
            # + the values padded to the keys' width for the fused CPU kernel (models/model.py: sdpa)
            padded = max(P + R - Dv, 0)
            self.expanded_bytes = self.num_heads * (2 * P + R + 2 * Dv + padded) * self.itemsize
        # On the CPU a GQA prefill's attention (equal head dims, a mask, enable_gqa) runs fused and
        # keeps no scores (measured: 29 MiB where the scores would take 216); on CUDA with a mask and
        # GQA it may fall back to the math kernel, which does: counted there.
        device = getattr(model, "device", None)
        self.fused_prefill = isinstance(device, torch.device) and device.type == "cpu"
        self.known = self._hook is not None or (self.context_bytes > 0 and self.num_heads > 0)

    def attention_bytes(self, num_seqs: int, max_new: int, max_context: int) -> int:
        """Bytes one layer's attention takes in a step of `num_seqs` sequences, the longest bringing
        `max_new` new tokens and the longest context `max_context` tokens (0: unknown model)."""
        if self._hook is not None:
            return int(self._hook(num_seqs, max_new, max_context))
        if not self.known:
            return 0
        per_context = self.context_bytes * CONTEXT_COPIES
        per_pair = self.num_heads * SCORE_BYTES + MASK_BYTES  # per query and context token
        if self.mla:
            # expanded or not as the model decides it with every sequence bringing max_new tokens
            # (the most absorbed work; fewer new tokens absorb sooner, and the absorbed path
            # keeps no copy beyond the scores counted per pair)
            if self.expands is not None and self.expands(num_seqs, max_new, max_context, num_seqs * max_new):
                per_context += self.expanded_bytes
        elif max_new > 1 and self.num_kv_heads > 1:  # a GQA prefill: scaled_dot_product_attention
            per_context += self.context_bytes * (self.num_heads // self.num_kv_heads)  # expanded kv heads
            if self.fused_prefill:
                per_pair = MASK_BYTES
        return int(num_seqs * max_context * per_context + num_seqs * max_new * max_context * per_pair)

    def max_context(self, budget: int, limit: int) -> int:
        """The longest context (at most `limit`) one sequence can attend to alone, one new token, in
        `budget` bytes; 0 if not even one token fits."""
        if not self.known or self.attention_bytes(1, 1, limit) <= budget:
            return limit
        lo, hi = 0, limit  # attention_bytes(1, 1, lo) fits (or lo == 0), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.attention_bytes(1, 1, mid) <= budget:
                lo = mid
            else:
                hi = mid
        return lo

    def activation_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """An estimate of a step's activations besides attention: hidden-sized tensors, the
        projections, the feed-forward's hidden units, the router, and the logits with sampling's
        copies. What the CPU's sizing subtracts (CUDA measures it in the profiling pass)."""
        cfg = self.cfg
        D = getattr(cfg, "hidden_size", 0) or 0
        V = getattr(cfg, "vocab_size", 0) or 0
        head = max(
            getattr(cfg, "head_dim", 0) or 0,
            (getattr(cfg, "qk_nope_head_dim", 0) or 0) + (getattr(cfg, "qk_rope_head_dim", 0) or 0),
            getattr(cfg, "v_head_dim", 0) or 0,
        )
        ffn = max(
            getattr(cfg, "intermediate_size", 0) or 0,
            (getattr(cfg, "num_experts_per_tok", 0) or 0) * (getattr(cfg, "moe_intermediate_size", 0) or 0)
            + (getattr(cfg, "shared_expert_intermediate_size", 0) or 0),
        )
        experts = getattr(cfg, "num_experts", 0) or 0
        per_token = (
            self.itemsize * (ACTIVATION_COPIES * D + 4 * self.num_heads * head + 3 * ffn) + 8 * experts
        )
        return num_tokens * per_token + num_seqs * V * 4 * 3

    def step_peak_bytes(self, config: EngineConfig) -> int:
        """An estimate of the most one step takes: the activations of a full step and the attention budget."""
        num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        return (
            self.activation_bytes(config.max_num_batched_tokens, num_seqs) + config.max_step_attention_bytes
        )


# -- the KV cache's size ---------------------------------------------------------------------------


def size_kv_cache(model: torch.nn.Module, config: EngineConfig, kv_dtype: torch.dtype) -> tuple[int, str]:
    """(bytes for this rank's KV cache, how they were sized) for `config` (see the module's doc).
    Every rank of a replica calls it at the same point (a profiling pass runs the layers'
    collectives). OutOfMemory when nothing is left for it."""
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes, f"--kv-cache-memory {format_bytes(config.kv_cache_memory_bytes)}"
    device = torch.device(config.device)
    util = config.gpu_memory_utilization
    if device.type == "cuda":
        return _size_on_cuda(model, config, kv_dtype, device, util or DEFAULT_GPU_MEMORY_UTILIZATION)
    if util is None:
        return DEFAULT_KV_CACHE_MEMORY_BYTES, (
            f"the CPU's default, {format_bytes(DEFAULT_KV_CACHE_MEMORY_BYTES)}; "
            "--gpu-memory-utilization sizes it from the host's memory"
        )
    comm = getattr(model, "comm", None)
    if comm is not None and config.memory_shared_by > 1:
        comm.agree_min(0)  # every rank of this pod has loaded its weights before any reads the memory
    gc.collect()
    available, source = available_host_memory()
    weights = model.weight_bytes() if hasattr(model, "weight_bytes") else 0
    step = StepMemory(model, kv_dtype).step_peak_bytes(config)
    return plan_cpu_kv_cache(util, available, source, weights, step, config.memory_shared_by)


def plan_cpu_kv_cache(
    util: float, available: int, source: str, weights: int, step: int, shared_by: int = 1
) -> tuple[int, str]:
    """The CPU's KV budget from the host's `available` bytes (read after loading: the weights are
    out of it already), this process's `weights` and its `step` peak estimate: vLLM's
    `util x total - this process's use`, with available + weights for the total."""
    share = available // shared_by
    budget = int(util * (share + weights)) - weights - step
    kv = min(budget, share - step, CPU_KV_CACHE_MAX_BYTES)
    of = f"{format_bytes(available)} {source}" + (f" / {shared_by} ranks" if shared_by > 1 else "")
    how = (
        f"{util:g} x ({of} + {format_bytes(weights)} weights) - the weights - "
        f"{format_bytes(step)} step estimate"
    )
    if kv == CPU_KV_CACHE_MAX_BYTES:
        how += f", capped at {format_bytes(CPU_KV_CACHE_MAX_BYTES)}"
    elif kv < budget:
        how += f", limited to what is available ({format_bytes(kv)})"
    if kv <= 0:
        raise OutOfMemory(
            f"no host memory is left for the KV cache ({how}): raise --gpu-memory-utilization, lower "
            "--max-num-batched-tokens or --max-step-attention-memory, or give --kv-cache-memory"
        )
    return kv, how


def available_host_memory() -> tuple[int, str]:
    """(bytes this process may still take, where that figure comes from): MemAvailable, or less
    where this container's cgroup limit leaves less (a pod sees the node's MemAvailable)."""
    available, source = mem_available(), "available (MemAvailable)"
    left = cgroup_memory_left()
    if left is not None and left < available:
        available, source = left, "left under the cgroup's memory limit"
    return available, source


def mem_available(path: str = "/proc/meminfo") -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                value, unit = line.split()[1:3]
                if unit.lower() != "kb":
                    raise ValueError(f"{path}: MemAvailable in {unit!r}, not kB")
                return int(value) * 1024
    raise ValueError(f"{path} has no MemAvailable")


def cgroup_memory_left(root: str = "/sys/fs/cgroup") -> int | None:
    """This cgroup's memory limit less its working set (usage less inactive file pages, as the
    kubelet counts it); None without a limit. cgroup v2, else v1."""
    base = Path(root)
    for limit_file, usage_file, stat_file, inactive_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        try:
            limit_text = (base / limit_file).read_text().strip()
            usage = int((base / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 1 << 60:
            return None  # no limit (v1 writes one near 2**63)
        inactive = 0
        try:
            for line in (base / stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(limit_text) - max(0, usage - inactive))
    return None


def _size_on_cuda(
    model: torch.nn.Module, config: EngineConfig, kv_dtype: torch.dtype, device: torch.device, util: float
) -> tuple[int, str]:
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile_step(model, config, kv_dtype, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return plan_cuda_kv_cache(
        util,
        total=total,
        free=free,
        peak=peak,
        allocated=torch.cuda.memory_allocated(device),
        reserved=torch.cuda.memory_reserved(device),
        attention=config.max_step_attention_bytes,
        device=str(device),
    )


def plan_cuda_kv_cache(
    util: float,
    *,
    total: int,
    free: int,
    peak: int,
    allocated: int,
    reserved: int,
    attention: int,
    device: str = "cuda",
) -> tuple[int, str]:
    """vLLM's sizing: util x total less this process's peak in the profiling pass (weights and a
    full step's activations: torch's max_memory_allocated), less what is used outside torch's
    allocator (total - free - reserved), less the step attention budget; never more than what is
    free now less the activations a step adds (peak - allocated) and the attention budget."""
    non_torch = max(0, total - free - reserved)
    budget = int(util * total) - peak - non_torch - attention
    headroom = free - max(0, peak - allocated) - attention
    kv = min(budget, headroom)
    how = (
        f"{util:g} x {format_bytes(total)} of {device} - {format_bytes(peak)} peak in the profiling pass - "
        f"{format_bytes(non_torch)} outside torch - {format_bytes(attention)} step attention budget"
    )
    if headroom < budget:
        how += f", limited by the free memory ({format_bytes(free)} free)"
    if kv <= 0:
        raise OutOfMemory(
            f"no device memory is left for the KV cache ({how}): raise --gpu-memory-utilization, "
            "lower --max-num-batched-tokens or --max-step-attention-memory, or give --kv-cache-memory"
        )
    return kv, how


def profile_step(
    model: torch.nn.Module, config: EngineConfig, kv_dtype: torch.dtype, device: torch.device
) -> None:
    """One forward pass as large as a step can be: max_num_batched_tokens dummy tokens spread over
    max_num_seqs sequences, through a temporary cache just large enough, and the sampler's softmax
    over its logits. The expert counters are reset afterwards (no request routed these tokens)."""
    from model_runtime.models.paged import build_paged_batch

    num_tokens = config.max_num_batched_tokens
    num_seqs = min(config.max_num_seqs, num_tokens)
    bs = config.block_size
    lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    tables, first = [], 0
    for n in lens:
        tables.append(list(range(first, first + math.ceil(n / bs))))
        first += len(tables[-1])
    cache = model.allocate_kv_cache(first, bs, kv_dtype, device)
    batch = build_paged_batch([(t, 0, n) for t, n in zip(tables, lens, strict=True)], bs, device)
    with torch.inference_mode():
        logits = model.forward_paged(torch.zeros(num_tokens, dtype=torch.long, device=device), batch, cache)
        logits.float().softmax(-1)
    del cache, logits
    if hasattr(model, "reset_expert_token_counts"):
        model.reset_expert_token_counts()
