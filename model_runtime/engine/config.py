"""The engine's settings, in a module without torch: the server process builds them for its engine
process and never imports torch itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_num_seqs: int = 32  # sequences in one step
    max_num_batched_tokens: int = 512  # new tokens in one step (decodes + prefill chunks); >= max_num_seqs
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: derived from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 256 * 2**20
    max_waiting: int = 256  # queued requests beyond which add_request raises EngineOverloaded
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int | None = None  # seeds the noise of unseeded sampled requests (None: random)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        # every running sequence needs one token of each step's budget, or the youngest stall
        self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_num_seqs)
