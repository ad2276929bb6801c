"""The parallel layout of one replica, as `moe-runtime serve`'s flags give it (vLLM's names).
No torch here: the server process builds it for its engine processes."""

from __future__ import annotations

from dataclasses import dataclass

REPLICA_LOST_EXIT = 3  # a rank's exit code when the replica lost another rank


class ReplicaLost(RuntimeError):
    """A collective failed or timed out: a rank of this replica is gone. The replica cannot compute
    a step without every rank, so the rank that sees this stops serving and exits."""


@dataclass(frozen=True)
class ParallelConfig:
    """N ranks (`tensor_parallel_size`) serve one replica, spread over `nnodes` pods (N / nnodes
    processes each, one per device). Global rank = node_rank * ranks_per_node + local rank; rank 0
    runs the scheduler and serves traffic."""

    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: this pod picks one (nnodes == 1 only)
    timeout_s: float = 30.0  # a collective that waits longer means a rank is lost
    join_timeout_s: float = 600.0  # how long ranks wait for each other at start

    def __post_init__(self) -> None:
        n, k = self.tensor_parallel_size, self.nnodes
        if n < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {n}")
        if k < 1:
            raise ValueError(f"--nnodes must be >= 1, got {k}")
        if n % k:
            raise ValueError(
                f"--tensor-parallel-size {n} is not divisible by --nnodes {k}: each pod runs N / K ranks"
            )
        if not 0 <= self.node_rank < k:
            raise ValueError(f"--node-rank {self.node_rank} is not in 0..{k - 1} (--nnodes {k})")
        if k > 1 and self.master_port is None:
            raise ValueError("--nnodes > 1 needs --master-port (and --master-addr: rank 0's pod address)")
        if self.timeout_s <= 0:
            raise ValueError(f"the distributed timeout must be > 0, got {self.timeout_s}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def distributed(self) -> bool:
        return self.tensor_parallel_size > 1

    @property
    def is_leader(self) -> bool:
        """This pod holds rank 0 (serves HTTP/gRPC)."""
        return self.node_rank == 0

    def global_ranks(self) -> list[int]:
        """The global ranks this pod runs, in order of their local rank (device index)."""
        first = self.node_rank * self.ranks_per_node
        return list(range(first, first + self.ranks_per_node))

    def local_rank(self, rank: int) -> int:
        return rank - self.node_rank * self.ranks_per_node
