"""One model server spread over several processes (devices, pods): tensor parallel attention and
dense layers, expert parallel (or tensor parallel) MoE layers, one scheduler on rank 0.

    config.py   ParallelConfig: the flags (--tensor-parallel-size, --nnodes, ...), no torch
    shard.py    Shard: which heads, rows and experts one rank holds (pure arithmetic, no torch)
    comm.py     the process group: all-reduce, the step plan rank 0 broadcasts, heartbeats
    ranks.py    starting a pod's ranks and the followers' step loop

docs/decisions.md #18 says why the layout is TP attention + EP experts with one scheduler.
"""

from model_runtime.distributed.config import ParallelConfig, ReplicaLost
from model_runtime.distributed.shard import Shard, split_range

__all__ = ["ParallelConfig", "ReplicaLost", "Shard", "split_range"]
