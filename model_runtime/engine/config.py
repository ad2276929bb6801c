"""The engine's settings, in a module without torch: the server process builds them for its engine
process and never imports torch itself."""

from __future__ import annotations

from dataclasses import dataclass

MiB, GiB = 2**20, 2**30
DEFAULT_KV_CACHE_MEMORY_BYTES = 256 * MiB  # on the CPU, unless gpu_memory_utilization is given
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # on CUDA, unless kv_cache_memory_bytes is given (as vLLM)
DEFAULT_MAX_STEP_ATTENTION_BYTES = 1 * GiB


@dataclass
class EngineConfig:
    max_num_seqs: int = 32  # sequences in one step
    max_num_batched_tokens: int = 2048  # new tokens in one step (decodes + prefill chunks); >= max_num_seqs
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from memory (engine/memory.py); given: wins
    # The KV cache's size in bytes: given, it wins over gpu_memory_utilization. None: on CUDA sized
    # from the device after a profiling pass (gpu_memory_utilization, default 0.9); on the CPU
    # DEFAULT_KV_CACHE_MEMORY_BYTES, or sized from the host's available memory when
    # gpu_memory_utilization is given.
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None  # fraction of the device's memory the engine may use
    # One layer's attention in one step (each sequence's gathered context, padded to the longest,
    # and the scores) may take at most this many bytes (engine/memory.py estimates it); the
    # scheduler keeps each step under it, and a sequence whose context alone does not fit fails.
    max_step_attention_bytes: int = DEFAULT_MAX_STEP_ATTENTION_BYTES
    memory_shared_by: int = 1  # processes sizing their caches from the same memory (CPU ranks of one pod)
    max_waiting: int = 256  # queued requests beyond which add_request raises EngineOverloaded
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int | None = None  # seeds the noise of unseeded sampled requests (None: random)
    # Reuse the KV blocks of earlier requests' common prefixes (engine/block_manager.py); on by
    # default, as in vLLM v1.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "max_waiting",
            "memory_shared_by",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        util = self.gpu_memory_utilization
        if util is not None and not 0 < util <= 1:
            raise ValueError(f"the GPU memory utilization must be in (0, 1], got {util}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"the KV cache memory must be > 0 bytes, got {self.kv_cache_memory_bytes}")
        if self.max_step_attention_bytes < 1:
            raise ValueError(
                f"the step attention memory must be > 0 bytes, got {self.max_step_attention_bytes}"
            )
        # every running sequence needs one token of each step's budget, or the youngest stall
        self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_num_seqs)


def format_bytes(n: int) -> str:
    """`268435456` -> `256 MiB`; `1610612736` -> `1.5 GiB` (binary units, 3 significant digits)."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if abs(value) < 1000 else f"{value:.0f} {unit}"
    return f"{n} B"
