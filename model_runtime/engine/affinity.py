"""A core of its own for the engine's step thread while few sequences run (decision 42).

On the CPU with torch on one thread (a pod of a few cores: the step on one, the server's event loop
and the kernels' helper threads on the rest), the scheduler places the engine's other threads (the
helpers, the Outbox that sends a step's outputs) where it likes, often on the step's core, and a
one-sequence step then waits for them: every token's gap grows. vLLM's CPU worker binds its OpenMP
threads to cores and keeps one for its API server (VLLM_CPU_OMP_THREADS_BIND); here the step
thread is bound to the first core of the process's CPUs and every other thread of the engine
process to the rest, while at most SMALL_BATCH requests run or wait. With more, the server's event loop
writes a token to each of many streams every step and needs more than the other cores' share
beside the helpers: the binding is lifted (every thread on every core again) until the batch
shrinks. A step thread alone on its core otherwise changes nothing a step computes.

Several engine processes on one host with the same CPUs (a node's pods without the static CPU
manager; the devcluster's local pods) would all pick the same first core: each claims its core
with a lock file on the host (/dev/shm, flock: released when the process ends), taking the first
of its CPUs no other engine holds, and binds nothing when every one is held.

MOE_RUNTIME_CPU_BIND=0 leaves every thread unbound.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading

log = logging.getLogger(__name__)

SMALL_BATCH = 4  # requests (running or waiting) up to which the step thread keeps its core
LOCK_DIR: str | None = None  # where the cores' claims are; None: /dev/shm (else the temp directory)


class StepCore:
    """The binding of one engine process's threads, updated with the number of requests it holds
    (`update`, called by the step loop on its own thread)."""

    def __init__(self, cpus: set[int], step_cpu: int, claim=None):
        self.cpus = sorted(cpus)
        self.step_cpu = step_cpu
        self.others = set(self.cpus) - {step_cpu}
        self._claim = claim  # the open lock file that holds step_cpu, for as long as this process lives
        self.bound = False
        self._step_tid = threading.get_native_id()

    @classmethod
    def for_this_process(cls, device: str, torch_threads: int, distributed: bool) -> StepCore | None:
        """The binding where it applies: on the CPU, one process (not a rank of several), torch on
        one thread, at least two CPUs of which one no other engine on this host has claimed,
        MOE_RUNTIME_CPU_BIND not 0; else None."""
        if os.environ.get("MOE_RUNTIME_CPU_BIND", "1") == "0":
            return None
        cpus = os.sched_getaffinity(0)
        if not device.startswith("cpu") or distributed or torch_threads != 1 or len(cpus) < 2:
            return None
        claimed = claim_cpu(sorted(cpus))
        if claimed is None:
            log.info("cpu binding: none (every one of CPUs %s is another engine's step core)", sorted(cpus))
            return None
        core = cls(cpus, *claimed)
        log.info(
            "cpu binding: the step thread on CPU %d while %d or fewer requests run, the engine's "
            "other threads on CPU %s (MOE_RUNTIME_CPU_BIND=0: unbound)",
            core.step_cpu, SMALL_BATCH, ",".join(map(str, sorted(core.others))),
        )  # fmt: skip
        return core

    def update(self, num_requests: int) -> None:
        """Bound while at most SMALL_BATCH requests are running or waiting, unbound above."""
        want = num_requests <= SMALL_BATCH
        if want != self.bound:
            self._apply(want)

    def release(self) -> None:
        """Every thread unbound and the core's claim given up."""
        if self.bound:
            self._apply(False)
        if self._claim is not None:
            with contextlib.suppress(OSError):
                self._claim.close()
            self._claim = None

    def _apply(self, bind: bool) -> None:
        everywhere = set(self.cpus)
        for tid in _threads():
            if tid == self._step_tid:
                mask = {self.step_cpu} if bind else everywhere
            else:
                mask = self.others if bind else everywhere
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:  # a thread that ended meanwhile; or a mask the cgroup no longer allows
                pass
        self.bound = bind


def claim_cpu(cpus: list[int], lock_dir: str | None = None):
    """(cpu, the open lock file that holds it) for the first of `cpus` no other process on this
    host holds, or None."""
    if lock_dir is None:
        lock_dir = LOCK_DIR or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
    for cpu in cpus:
        try:
            f = open(os.path.join(lock_dir, f"moe-runtime-step-cpu-{cpu}.lock"), "a")  # noqa: SIM115 (held)
        except OSError:
            return None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another engine's
            f.close()
            continue
        return cpu, f
    return None


def _threads() -> list[int]:
    """The ids of this process's threads (Linux: /proc/self/task)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []
