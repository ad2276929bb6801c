"""What one rank holds. Pure arithmetic on sizes (no torch): the model builds its layers from it
and the loader reads the matching slices of each checkpoint tensor.

Tensor parallel: attention heads are split across ranks (GQA's key/value heads too, or replicated
when ranks outnumber them), the dense MLP's and shared experts' intermediate rows are split, and
each layer's output projection is row-split, so every rank's output is a partial sum that one
all-reduce completes. Expert parallel (`expert_parallel`): each rank owns a contiguous range of the
routed experts and runs only those; without it every expert's intermediate rows are split instead.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when n items are split into `parts` contiguous ranges whose
    sizes differ by at most one (the first n % parts ranges get one more)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    expert_parallel: bool = False

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def rows(self, n: int) -> tuple[int, int]:
        """This rank's rows of a dimension of n split by tensor parallelism."""
        return split_range(n, self.world, self.rank)

    def heads(self, num_heads: int) -> tuple[int, int]:
        """This rank's attention heads [start, stop). Heads must divide evenly, as in vLLM."""
        if num_heads % self.world:
            raise ValueError(
                f"{num_heads} attention heads cannot be split evenly over --tensor-parallel-size {self.world}"
            )
        return self.rows(num_heads)

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """This rank's key/value heads: split like the query heads when there are at least as many as
        ranks, else the one kv head its query heads read (replicated on world / K ranks)."""
        if num_kv_heads >= self.world:
            if num_kv_heads % self.world:
                raise ValueError(
                    f"{num_kv_heads} key/value heads cannot be split evenly over --tensor-parallel-size {self.world}"
                )
            return self.rows(num_kv_heads)
        if self.world % num_kv_heads:
            raise ValueError(
                f"--tensor-parallel-size {self.world} is not a multiple of the {num_kv_heads} key/value heads"
            )
        first_query_head = self.heads(num_heads)[0]
        kv = first_query_head // (num_heads // num_kv_heads)
        return kv, kv + 1

    def experts(self, num_experts: int) -> tuple[int, int]:
        """The routed experts this rank runs: a contiguous range with expert parallelism, else all."""
        if not self.expert_parallel:
            return 0, num_experts
        return split_range(num_experts, self.world, self.rank)

    def expert_rows(self, intermediate: int) -> tuple[int, int]:
        """This rank's intermediate rows of each routed expert: all with expert parallelism."""
        if self.expert_parallel:
            return 0, intermediate
        return self.rows(intermediate)

    @property
    def holds_bias_of_reduced_output(self) -> bool:
        """Row-split projections (o_proj, down_proj) keep their bias on rank 0 only: the all-reduce
        sums the ranks' partial outputs, and the bias must be added once."""
        return self.rank == 0
