"""The engine process's side: what it builds and its step loop (EngineProcess, in
engine/process.py, is the server's side; what crosses the pipe: engine/messages.py).

Why the engine has a process of its own: docs/decisions.md #15.

No torch at import: the server imports this module (`spawn_engine`) and never loads the model
itself; torch is imported in the engine process, by `run_engine_process`, once it has started.

The engine process ignores SIGINT and SIGTERM: the server decides when it stops (after the drain),
and it exits by itself once the server is gone (its end of the pipe closes).

Distributed, this process is rank 0: while idle it sends the other ranks a heartbeat every second,
on stop it tells them to exit, and when a rank is lost (ReplicaLost) it fails every request and
exits with REPLICA_LOST_EXIT, so the server reports not live.

A step that fails: out of memory, one process, LLMEngine.step itself retries the step's sequences
in halves and fails only those that cannot run alone (the engine serves on). Any other failure
fails every request in flight (the engine's state may be off) and the engine serves on. Distributed,
any failed step, out of memory included, is fatal (ReplicaLost): the other ranks may be left inside
that step's collectives, and a rank that ran out of memory may have stopped in the middle of one,
so no rank can know where the others are; the replica exits and is restarted.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time

from model_runtime.distributed.config import REPLICA_LOST_EXIT, ReplicaLost
from model_runtime.engine.affinity import StepCore
from model_runtime.engine.messages import (
    AddRequest,
    EngineReady,
    EngineSpec,
    OutputDelta,
    QueueCounts,
    RequestFailed,
    StartFailed,
    StepOutputs,
    StopEngine,
)

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.05
HEARTBEAT_S = 1.0  # idle rank 0 checks on the other ranks this often


# -- the engine process ---------------------------------------------------------------------------


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


@contextlib.contextmanager
def huge_page_malloc():
    """The environment a spawned engine process starts with: glibc's malloc asking the kernel for
    transparent huge pages (madvise) for its large blocks, the weights and the KV cache among them
    (decision 41): a decode step streams every weight it reads once, and with 4 KB pages a stream
    crosses a page every 4 KB (Zen 4: one 16384 x 8192 bfloat16 row-major read at 33 GB/s on
    huge pages, 20 on small ones; a one-sequence Mixtral-big step 9.0 -> 8.5 ms). A tunable read
    when the process starts, hence here. Where the kernel's THP mode is `never` it changes
    nothing; MOE_RUNTIME_HUGE_PAGES=0, or a GLIBC_TUNABLES that names hugetlb, leaves it out."""
    before = os.environ.get("GLIBC_TUNABLES")
    if os.environ.get("MOE_RUNTIME_HUGE_PAGES", "1") == "0" or "glibc.malloc.hugetlb" in (before or ""):
        yield
        return
    os.environ["GLIBC_TUNABLES"] = f"{before}:{HUGE_PAGES_TUNABLE}" if before else HUGE_PAGES_TUNABLE
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = before


def freeze_heap() -> None:
    """Once a process has loaded what it serves with (the server: its app, tokenizer and engine;
    the engine process: the model): one full collection, then every object left moved out of the
    collector's reach (gc.freeze), as vLLM's API server and engine core do. The collector's
    oldest generation otherwise walks that whole heap now and then while serving: 66-71 ms pauses
    of the server's event loop, with 32 streams running, on this project's 2-core machine
    (decision 42)."""
    gc.collect()
    gc.freeze()


def spawn_engine(spec: EngineSpec):
    """Start the engine process; (process, the server's end of the pipe). It loads the model and
    then sends EngineReady or StartFailed."""
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads, CUDA
    conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(
        target=run_engine_process, args=(child_conn, spec), name="moe-engine", daemon=True
    )
    with huge_page_malloc():
        process.start()
    child_conn.close()
    return process, conn


def run_engine_process(conn, spec: EngineSpec) -> None:
    """The engine process's main: build the engine, report ready (or why not), then step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format=spec.log_format)
    try:
        # torch, the model and the engine are imported here, in the engine process only
        from model_runtime.engine.build import build_engine

        engine = build_engine(spec)
    except BaseException as e:
        log.exception("the engine could not start")
        conn.send(StartFailed(f"{type(e).__name__}: {e}"))
        return
    freeze_heap()
    conn.send(
        EngineReady(
            vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            kv_capacity_tokens=engine.blocks.capacity_tokens,
            device=str(engine.device),
            dtype=str(engine.kv_dtype).removeprefix("torch."),
            weight_bytes=engine.weight_bytes,
            max_context_tokens=engine.max_context_tokens,
            max_step_attention_bytes=engine.config.max_step_attention_bytes,
        )
    )
    code = 0
    try:
        conn.send(StepOutputs([], QueueCounts(0, 0, 0, 0.0), engine.stats()))
        step_loop(conn, engine)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server is gone: nothing left to serve
    except ReplicaLost as e:
        log.error("%s: this replica cannot serve without it; exiting", e)
        code = REPLICA_LOST_EXIT
        with contextlib.suppress(OSError, ValueError):
            conn.send(StepOutputs(engine.fail_all(e), QueueCounts(0, 0, 0, 0.0), None))
    if code == 0:
        with contextlib.suppress(Exception):  # the other ranks may be gone already
            engine.shutdown()
    # Nothing is left to clean up; the interpreter's teardown of torch would take the server's
    # shutdown a second or more.
    logging.shutdown()
    os._exit(code)


class Outbox:
    """The step loop's messages to the server, sent in order by a thread of its own.

    A step's outputs used to be sent by the step loop itself, which then waited whenever the pipe
    was full: at 32 streams the server process (on the other core, beside the clients) reads a
    step's outputs while writing the previous step's tokens to 32 sockets, and py-spy found the
    engine in `Connection.send` for ~10% of its time. The send (a write that releases the GIL)
    now overlaps the next step. The first error of a send is raised by the next `put` or by
    `close`."""

    def __init__(self, conn):
        self.conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-outbox", daemon=True)
        self._thread.start()

    def put(self, message) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put(message)

    def close(self) -> None:
        """Send what is queued, stop the thread; raise the error a send met, if any."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self.conn.send(message)
            except BaseException as e:  # the server is gone (or the message would not pickle)
                self.error = e
                return


def step_loop(conn, engine) -> None:
    """Apply the server's commands, step while there is work, send each step's outputs (in order,
    by an Outbox: sent while the next step runs). On the CPU the step thread has a core of its own
    while few requests run (engine/affinity.py)."""
    import torch

    outbox = Outbox(conn)  # first: a thread of the engine's, bound with the others
    core = StepCore.for_this_process(str(engine.device), torch.get_num_threads(), engine.comm is not None)
    try:
        _step_loop(conn, engine, outbox, core)
    finally:
        if core is not None:
            core.release()
        outbox.close()  # everything queued reaches the server before this process says more


def _step_loop(conn, engine, outbox: Outbox, core: StepCore | None = None) -> None:
    last_stats = 0.0
    applied_adds = 0
    while True:
        commands = []
        distributed = engine.comm is not None
        timeout = 0 if engine.has_unfinished() else (HEARTBEAT_S if distributed else None)  # idle: wait
        while conn.poll(timeout):
            commands.append(conn.recv())
            timeout = 0
        if not commands and not engine.has_unfinished():
            engine.heartbeat()  # distributed and idle for a second: are the other ranks there?
            continue
        outputs = []
        stopping = False
        for command in commands:
            if isinstance(command, StopEngine):
                stopping = True
                continue
            applied_adds += isinstance(command, AddRequest)
            outputs.extend(engine.apply(command))
        if stopping:
            for rid in list(engine.requests):
                outputs.append(engine.abort_request(rid))
        elif engine.has_unfinished():
            if core is not None:
                core.update(engine.num_running + engine.num_waiting)
            try:
                outputs.extend(engine.step())
            except ReplicaLost:
                raise
            except Exception as e:  # a failed step fails its requests, not the engine
                if distributed:  # ... unless the other ranks may be left inside its collectives
                    raise ReplicaLost(f"rank 0: a step failed midway ({type(e).__name__}: {e})") from e
                log.exception("engine step failed")
                outputs.extend(engine.fail_all(e))
        now = time.monotonic()
        stats = None
        if stopping or now - last_stats >= STATS_INTERVAL_S or not engine.has_unfinished():
            stats, last_stats = engine.stats(), now
        if outputs or commands or stats is not None:
            # the counts ride on every message: the server's queue-full check and gauges are exact
            counts = QueueCounts(applied_adds, engine.num_running, engine.num_waiting, engine.blocks.usage)
            deltas = [o if isinstance(o, RequestFailed) else OutputDelta.of(o) for o in outputs]
            outbox.put(StepOutputs(deltas, counts, stats))
        if stopping:
            return
