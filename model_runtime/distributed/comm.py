"""The process group of one replica's ranks, and what they tell each other.

    all_reduce      sums the ranks' partial layer outputs (NCCL on GPUs, gloo on the CPU)
    step plan       rank 0 broadcasts each step's token ids, positions, slot mapping and block
                    tables over a gloo group on the CPU; the others run the same forward pass
    heartbeat       while idle, rank 0 sends a plan of kind HEARTBEAT every second and all ranks
                    meet in one tiny all-reduce: a lost rank is noticed within `timeout_s`, not
                    at the next request
    stop            rank 0's last plan: the followers exit 0

Any failed or timed-out collective raises ReplicaLost: the replica cannot compute a step without
every rank, so the caller stops serving and exits (the pod, and its group, get restarted).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time

import torch
import torch.distributed as dist

from model_runtime.distributed.config import ParallelConfig, ReplicaLost
from model_runtime.distributed.shard import Shard
from model_runtime.models.paged import PagedBatch

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
STEP, HEARTBEAT, STOP = 1, 2, 3
_HEADER = 6  # kind, N tokens, S sequences, B_max blocks per sequence, block size, spare


class Comm:
    """One rank's view of its replica's process group."""

    def __init__(self, rank: int, world: int, device: torch.device, cpu_group, device_group):
        self.rank = rank
        self.world = world
        self.device = device
        self._cpu = cpu_group  # gloo: plans, heartbeats, small ints
        self._dev = device_group  # the device's backend: layer all-reduces
        self._gloo_dtype_ok: dict[torch.dtype, bool] = {}

    def shard(self, expert_parallel: bool) -> Shard:
        return Shard(self.rank, self.world, expert_parallel)

    # -- the layers' collective ------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; x is returned."""
        try:
            if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
                # gloo sums half types in float32 either way; doing it here keeps the sum exact
                # to the same rounding on every rank
                wide = x.float()
                dist.all_reduce(wide, group=self._dev)
                x.copy_(wide)
            else:
                dist.all_reduce(x, group=self._dev)
        except Exception as e:  # gloo: RuntimeError (peer closed, timeout); NCCL: DistBackendError
            raise ReplicaLost(f"rank {self.rank}: all-reduce failed: {e}") from e
        return x

    # -- rank 0 -> followers ------------------------------------------------------------------

    def send_step(self, tokens: torch.Tensor, batch: PagedBatch) -> None:
        S, B = batch.block_tables.shape
        header = torch.tensor([STEP, tokens.shape[0], S, B, batch.block_size, 0], dtype=torch.long)
        payload = torch.cat(
            [
                t.reshape(-1).cpu()
                for t in (
                    tokens,
                    batch.positions,
                    batch.slot_mapping,
                    batch.block_tables,
                    batch.context_lens,
                    batch.query_start,
                    batch.logits_indices,
                )
            ]
        )
        self._broadcast(header)
        self._broadcast(payload)

    def send_heartbeat(self) -> None:
        self._broadcast(torch.tensor([HEARTBEAT, 0, 0, 0, 0, 0], dtype=torch.long))
        self._meet()

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([STOP, 0, 0, 0, 0, 0], dtype=torch.long))

    def recv_plan(self) -> tuple[int, torch.Tensor | None, PagedBatch | None]:
        """A follower's next plan: (STEP, tokens, batch) | (HEARTBEAT, None, None) | (STOP, None, None)."""
        header = torch.empty(_HEADER, dtype=torch.long)
        self._broadcast(header)
        kind, N, S, B, block_size, _ = header.tolist()
        if kind == HEARTBEAT:
            self._meet()
            return kind, None, None
        if kind != STEP:
            return kind, None, None
        payload = torch.empty(N * 3 + S * B + S + (S + 1) + S, dtype=torch.long)
        self._broadcast(payload)
        tokens, positions, slots, tables, lens, starts, logits = payload.split([N, N, N, S * B, S, S + 1, S])
        batch = PagedBatch(
            positions=positions,
            slot_mapping=slots,
            block_tables=tables.view(S, B),
            context_lens=lens,
            query_start=starts,
            logits_indices=logits,
            block_size=block_size,
        )
        return STEP, tokens.to(self.device), batch.to(self.device)

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's value (the KV blocks every rank can hold)."""
        t = torch.tensor([value], dtype=torch.long)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._cpu)
        except Exception as e:
            raise ReplicaLost(f"rank {self.rank}: agreeing on a value failed: {e}") from e
        return int(t.item())

    def gather_ints(self, value: int) -> list[int]:
        """Every rank's value, in rank order (weight bytes per rank)."""
        out = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        try:
            dist.all_gather(out, torch.tensor([value], dtype=torch.long), group=self._cpu)
        except Exception as e:
            raise ReplicaLost(f"rank {self.rank}: gathering values failed: {e}") from e
        return [int(t.item()) for t in out]

    def _broadcast(self, t: torch.Tensor) -> None:
        try:
            dist.broadcast(t, src=0, group=self._cpu)
        except Exception as e:
            raise ReplicaLost(f"rank {self.rank}: broadcast from rank 0 failed: {e}") from e

    def _meet(self) -> None:
        try:
            dist.all_reduce(torch.zeros(1), group=self._cpu)
        except Exception as e:
            raise ReplicaLost(f"rank {self.rank}: heartbeat failed: {e}") from e

    def close(self) -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # a group whose peers are gone may not tear down cleanly
            pass


def device_for(device: str, local_rank: int) -> torch.device:
    """`cuda:local_rank` for a CUDA device (one process per GPU), else the CPU."""
    if device.startswith("cuda"):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_comm(parallel: ParallelConfig, rank: int, device: torch.device) -> Comm:
    """Join the replica's process group (waiting up to join_timeout_s for every rank), then make
    the groups whose collectives time out after timeout_s."""
    if parallel.master_port is None:
        raise ValueError("init_comm needs parallel.master_port")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # rank 0's pod may not have its address (or DNS name) yet when another pod starts
    address = wait_for_address(parallel.master_addr, parallel.join_timeout_s)
    # rank 0 on loopback (one machine, the devcluster's pods): gloo must listen there too, never on
    # an interface it picks by the hostname's address
    if address.startswith("127."):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    log.info(
        "rank %d of %d: joining %s:%d (%s)",
        rank,
        parallel.world_size,
        parallel.master_addr,
        parallel.master_port,
        backend,
    )
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{parallel.master_addr}:{parallel.master_port}",
        rank=rank,
        world_size=parallel.world_size,
        timeout=datetime.timedelta(seconds=parallel.join_timeout_s),
    )
    timeout = datetime.timedelta(seconds=parallel.timeout_s)
    ranks = list(range(parallel.world_size))
    cpu_group = dist.new_group(ranks, timeout=timeout, backend="gloo")
    device_group = dist.new_group(ranks, timeout=timeout, backend=backend) if backend != "gloo" else cpu_group
    return Comm(rank, parallel.world_size, device, cpu_group, device_group)


def wait_for_address(host: str, timeout_s: float, poll_s: float = 0.5) -> str:
    """`host`'s IPv4 address, waiting (up to timeout_s) while it does not resolve yet: a group's
    leader gets its DNS record only once its pod has an IP."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.gethostbyname(host)
        except OSError as e:
            if time.monotonic() > deadline:
                raise ReplicaLost(f"rank 0's address {host!r} did not resolve in {timeout_s:.0f}s: {e}") from e
            log.info("waiting for %s to resolve (%s)", host, e)
            time.sleep(poll_s)


def _loopback_interface() -> str:
    try:
        for _, name in socket.if_nameindex():
            if name == "lo" or name.startswith("lo"):
                return name
    except OSError:
        pass
    return "lo"
