"""Starting a pod's ranks (no torch here: the server process never imports it).

A pod runs `ParallelConfig.ranks_per_node` rank processes. In rank 0's pod the engine process is
rank 0 (engine/worker.py) and `LocalRanks` runs the others; in every other pod `LocalRanks` runs
all of them and the server only answers health and /metrics (serving/follower.py). Each rank
process loads its part of the model, joins the replica's process group, says so on its pipe
(RankReady, with its weight bytes) and then follows rank 0's steps until rank 0 says stop (exit 0)
or the replica is lost (exit REPLICA_LOST_EXIT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from model_runtime.distributed.config import REPLICA_LOST_EXIT, ReplicaLost
from model_runtime.engine.worker import huge_page_malloc

log = logging.getLogger(__name__)

START_FAILED_EXIT = 2


@dataclass
class RankReady:
    rank: int
    weight_bytes: int
    device: str


@dataclass
class RankFailed:
    rank: int
    message: str


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_rank(conn, spec) -> None:
    """A follower rank's process main."""
    # Rank 0 decides when ranks stop (its last plan says so), else the pod's server kills them
    # after its grace period: a SIGTERM to the pod's process group must not break a draining replica.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s %(levelname)s rank {spec.rank} %(name)s: %(message)s"
    )
    _exit_with_parent(os.getppid())
    try:
        from model_runtime.distributed.follower import Follower

        follower = Follower(spec)
    except BaseException as e:
        log.exception("rank %d could not start", spec.rank)
        with contextlib.suppress(OSError):
            conn.send(RankFailed(spec.rank, f"{type(e).__name__}: {e}"))
        logging.shutdown()
        os._exit(START_FAILED_EXIT)
    conn.send(RankReady(spec.rank, follower.weight_bytes[spec.rank], follower.config.device))
    try:
        code = follower.run()
    except ReplicaLost as e:
        log.error("%s: exiting", e)
        code = REPLICA_LOST_EXIT
    logging.shutdown()
    os._exit(code)


def _exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """Exit once the pod's server is gone (a rank must not outlive it, holding a device)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(REPLICA_LOST_EXIT)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class LocalRanks:
    """This pod's follower rank processes."""

    def __init__(self, spec, ranks: list[int]):
        self.spec = spec
        self.ranks = ranks
        self.processes: dict[int, multiprocessing.Process] = {}
        self.conns = {}
        self.ready: dict[int, RankReady] = {}
        self.failed: dict[int, str] = {}

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads, CUDA
        for rank in self.ranks:
            conn, child = context.Pipe(duplex=False)
            process = context.Process(
                target=run_rank,
                args=(child, dataclasses.replace(self.spec, rank=rank)),
                name=f"moe-rank-{rank}",
                daemon=True,
            )
            with huge_page_malloc():  # as the engine process (decision 41)
                process.start()
            child.close()
            self.processes[rank], self.conns[rank] = process, conn

    def poll(self) -> None:
        """Take in what the ranks have said (ready, or why they could not start)."""
        for rank, conn in self.conns.items():
            if rank in self.ready or rank in self.failed:
                continue
            try:
                if conn.poll():
                    message = conn.recv()
                    if isinstance(message, RankReady):
                        self.ready[rank] = message
                    else:
                        self.failed[rank] = message.message
            except (EOFError, OSError):
                self.failed[rank] = (
                    f"rank {rank} exited with code {self.processes[rank].exitcode} while starting"
                )

    @property
    def all_ready(self) -> bool:
        self.poll()
        return len(self.ready) == len(self.ranks)

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes.values())

    def exit_codes(self) -> dict[int, int | None]:
        return {rank: p.exitcode for rank, p in self.processes.items()}

    def weight_bytes(self) -> dict[int, int]:
        self.poll()
        return {rank: r.weight_bytes for rank, r in self.ready.items()}

    def join(self, timeout_s: float) -> bool:
        """Wait for every rank to exit (True), else False."""
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        return not any(p.is_alive() for p in self.processes.values())

    def stop(self, wait_s: float = 0.0) -> bool:
        """Give the ranks `wait_s` to exit (rank 0's stop reaches them), then kill what is left.
        True when every rank had exited 0."""
        self.join(wait_s)
        for process in self.processes.values():
            if process.is_alive():
                log.warning("rank %s did not stop: killing it", process.name)
                process.kill()
        self.join(5.0)
        for conn in self.conns.values():
            conn.close()
        return all(code == 0 for code in self.exit_codes().values())
