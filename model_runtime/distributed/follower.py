"""A rank other than 0: its part of the model and the same forward pass as rank 0, step by step.

Rank 0's engine (engine/core.py) schedules and samples; a follower only receives each step's plan
(`Comm.recv_plan`) and runs `forward_paged` over its own KV cache, whose blocks are the ones rank
0 assigned, so the caches of all ranks stay in one layout. Its logits are not used (the all-reduces
inside the forward pass are what rank 0 needs from it).

Runs in a process of its own (distributed/ranks.py starts it); torch is imported here.
"""

from __future__ import annotations

import logging

import torch

from model_runtime.distributed.comm import HEARTBEAT, STEP, STOP
from model_runtime.distributed.config import ReplicaLost
from model_runtime.engine.build import load_rank, warm_up
from model_runtime.engine.core import _float_dtype, join_replica
from model_runtime.engine.messages import EngineSpec

log = logging.getLogger(__name__)


class Follower:
    def __init__(self, spec: EngineSpec):
        self.model, self.config = load_rank(spec)
        self.comm = self.model.comm
        self.rank = spec.rank
        kv_dtype = _float_dtype(self.model)
        self.weight_bytes, num_blocks, _ = join_replica(self.model, self.config, kv_dtype)
        self.kv_cache = self.model.allocate_kv_cache(
            num_blocks, self.config.block_size, kv_dtype, torch.device(self.config.device)
        )
        warm_up(self.model, self.config)
        self.steps = 0

    def run(self) -> int:
        """Step until rank 0 says stop (0), or the replica is lost (ReplicaLost propagates)."""
        while True:
            kind, tokens, batch = self.comm.recv_plan()
            if kind == STOP:
                log.info("rank %d: stopped by rank 0 after %d steps", self.rank, self.steps)
                self.comm.close()
                return 0
            if kind == HEARTBEAT:
                continue
            if kind != STEP:
                raise ReplicaLost(f"rank {self.rank}: unknown plan kind {kind} from rank 0")
            with torch.inference_mode():
                self.model.forward_paged(tokens, batch, self.kv_cache)
            self.steps += 1
