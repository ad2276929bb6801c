"""The engine in a process of its own, so that HTTP and gRPC never wait on the step for the GIL.

`moe-runtime serve` runs the engine this way by default (as vLLM V1 runs its EngineCore): the
server process keeps the event loop, tokenizes and validates requests, and streams outputs; the
engine process loads the model and runs `LLMEngine`'s step loop. With the engine in a thread
beside the loop, every token's Python work in the server (SSE events, gRPC responses) waits for the
step to release the GIL, and a small model's step holds it for most of its time.

The two talk over a duplex `multiprocessing` pipe, in pickled tuples:

    server -> engine  ("add", request_id, prompt_ids, params, arrival) | ("abort", request_id) | ("stop",)
    engine -> server  ("ready", EngineInfo) | ("failed", message)     once, at start
                      ("out", [delta | (request_id, error)], counts, EngineStats | None)
                                                                       after each step

A delta carries what a step added to one request (new token ids, new text, finish reason,
logprobs, first token time); the server keeps each stream's token ids and text, so a message's
size does not grow with the output's length. Every message carries the counts (adds taken in,
running, waiting, KV cache usage), so the queue-full check is as exact as in one process; the full
stats (expert counts) ride along at most every 50 ms and always before the engine goes idle.

The engine process ignores SIGINT and SIGTERM: the server decides when it stops (after the drain),
and it exits by itself once the server is gone (its end of the pipe closes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass

from model_runtime.engine import (
    EngineConfig,
    EngineError,
    EngineFront,
    EngineOverloaded,
    EngineStats,
    LLMEngine,
    RequestOutput,
    RequestValidator,
    _EngineFailed,
    apply_command,
    fail_all,
)

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.05


@dataclass
class EngineSpec:
    """What the engine process builds: the model, its placement, and the engine's settings."""

    model: str
    dtype: str  # a torch dtype name: float32, bfloat16, float16
    device: str  # cpu | cuda | cuda:N
    config: EngineConfig
    quantization: str | None = None
    num_threads: int | None = None  # torch threads (CPU)
    log_level: int = logging.INFO
    log_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class EngineInfo:
    """The engine's limits, which the server checks requests against before sending them."""

    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or exited."""


_ERRORS = {"invalid": EngineError, "overloaded": EngineOverloaded, "failed": _EngineFailed}


def _error_kind(error: BaseException) -> str:
    if isinstance(error, EngineError):
        return "invalid"
    if isinstance(error, EngineOverloaded):
        return "overloaded"
    return "failed"


# -- the engine process ---------------------------------------------------------------------------


def run_engine_process(conn, spec: EngineSpec) -> None:
    """The engine process's main: build the engine, report ready (or why not), then step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format=spec.log_format)
    try:
        engine = build_engine(spec)
    except BaseException as e:
        log.exception("the engine could not start")
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(
        (
            "ready",
            EngineInfo(
                vocab_size=engine.vocab_size,
                max_model_len=engine.max_model_len,
                kv_capacity_tokens=engine.blocks.capacity_tokens,
            ),
        )
    )
    try:
        conn.send(("out", [], (0, 0, 0, 0.0), engine.stats()))
        step_loop(conn, engine)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server is gone: nothing left to serve
    # Nothing is left to clean up; the interpreter's teardown of torch would take the server's
    # shutdown a second or more.
    logging.shutdown()
    os._exit(0)


def build_engine(spec: EngineSpec) -> LLMEngine:
    import torch

    from model_runtime import load_model, load_tokenizer

    if spec.num_threads and spec.device == "cpu":
        torch.set_num_threads(spec.num_threads)
    model = load_model(spec.model, dtype=getattr(torch, spec.dtype), device=spec.device)
    if spec.quantization == "int8":
        from model_runtime.quant import quantize_int8

        model = quantize_int8(model)
    return LLMEngine(model, load_tokenizer(spec.model), spec.config)


def step_loop(conn, engine: LLMEngine) -> None:
    """Apply the server's commands, step while there is work, send each step's outputs."""
    last_stats = 0.0
    applied_adds = 0
    while True:
        commands = []
        timeout = None if not engine.has_unfinished() else 0  # idle: block until told something
        while conn.poll(timeout):
            commands.append(conn.recv())
            timeout = 0
        outputs: list = []
        stopping = False
        for command in commands:
            if command[0] == "stop":
                stopping = True
                continue
            applied_adds += command[0] == "add"
            outputs.extend(apply_command(engine, command))
        if stopping:
            for rid in list(engine.requests):
                outputs.append(engine.abort_request(rid))
        elif engine.has_unfinished():
            try:
                outputs.extend(engine.step())
            except Exception as e:  # a failed step fails its requests, not the engine
                log.exception("engine step failed")
                outputs.extend(fail_all(engine, e))
        now = time.monotonic()
        stats = None
        if stopping or now - last_stats >= STATS_INTERVAL_S or not engine.has_unfinished():
            stats, last_stats = engine.stats(), now
        if outputs or commands or stats is not None:
            # the counts ride on every message: the server's queue-full check and gauges are exact
            counts = (applied_adds, engine.num_running, engine.num_waiting, engine.blocks.usage)
            conn.send(("out", [_wire(o) for o in outputs], counts, stats))
        if stopping:
            return


def _wire(output) -> tuple:
    if isinstance(output, tuple):  # (request_id, error)
        rid, error = output
        return (rid, _error_kind(error), str(error))
    return (
        output.request_id,
        output.new_token_ids,
        output.new_text,
        output.finish_reason if output.finished else None,
        output.logprobs,
        output.first_token_time,
    )


# -- the server's side ----------------------------------------------------------------------------


class _Stream:
    __slots__ = ("prompt_token_ids", "arrival_time", "token_ids", "text")

    def __init__(self, prompt_token_ids: list[int], arrival_time: float):
        self.prompt_token_ids = prompt_token_ids
        self.arrival_time = arrival_time
        self.token_ids: list[int] = []
        self.text = ""


class EngineProcess(EngineFront):
    """An engine in a child process, with AsyncEngine's interface. Streams must be read on the
    event loop that called `start()` (outputs arrive through that loop's reader on the pipe)."""

    def __init__(self, spec: EngineSpec, tokenizer, model_name: str | None = None):
        super().__init__()
        self.spec = spec
        self.config = spec.config
        self.tokenizer = tokenizer
        self.model_name = model_name or spec.model
        self.max_model_len = 0
        self.validator: RequestValidator | None = None
        self._process = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state: dict[str, _Stream] = {}
        self._stats = EngineStats(0, 0, 0.0, {})
        self._adds_sent = 0
        self._adds_applied = 0  # as of the engine's last message
        self._stopping = False  # told to stop: its end of the pipe will close
        self.error: str | None = None  # why the engine process is gone, once it is

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._process is not None and self.error is None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the engine process and wait until its model is loaded (EngineProcessError if it
        cannot load it; the process is gone by then)."""
        if self.is_running:
            return
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads, CUDA
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=run_engine_process, args=(child_conn, self.spec), name="moe-engine", daemon=True
        )
        self._process.start()
        child_conn.close()
        self.error = None
        self._accepting = True
        self._stopping = False
        try:
            message = await asyncio.to_thread(self._wait_for_start)
        except BaseException:
            self._kill()
            raise
        if message[0] != "ready":
            self._kill()
            raise EngineProcessError(f"the engine process could not load {self.spec.model}: {message[1]}")
        info: EngineInfo = message[1]
        self.max_model_len = info.max_model_len
        self.validator = RequestValidator(
            self.tokenizer, info.vocab_size, info.max_model_len, info.kv_capacity_tokens
        )
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        log.info("engine process %d: %s loaded", self._process.pid, self.spec.model)

    def _wait_for_start(self) -> tuple:
        while not self._conn.poll(0.2):
            if not self._process.is_alive():
                return ("failed", f"it exited with code {self._process.exitcode}")
        try:
            return self._conn.recv()
        except EOFError:
            self._process.join(5)
            return ("failed", f"it exited with code {self._process.exitcode}")

    async def _shutdown(self, abort: list[str]) -> None:
        self._stopping = True
        for rid in abort:
            self._submit(("abort", rid))
        self._submit(("stop",))
        await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            log.warning("the engine process did not stop in 30s: killing it")
            self._process.kill()
            await asyncio.to_thread(self._process.join, 10)
        if self._conn is not None and not self._conn.closed:
            self._on_readable()  # the last outputs (aborted requests), if not read yet
        self._close("the engine stopped")

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(10)
        self._close("the engine process was stopped")

    def _close(self, reason: str) -> None:
        """Stop reading the pipe, close it, fail the streams still open."""
        if self.error is None:
            self.error = reason
        if self._conn is not None and not self._conn.closed:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
            self._conn.close()
        if self._process is not None and not self._process.is_alive():
            self._process.join(0)
        self._deliver([(rid, _EngineFailed(f"{reason} while running this request")) for rid in self._streams])
        self._state.clear()

    def __del__(self):  # a process left running by a caller that never stopped it
        process = getattr(self, "_process", None)
        if process is not None and process.pid is not None and process.exitcode is None:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except OSError:
                pass

    # -- requests ---------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """As of the engine's last message; requests sent but not yet taken in count as waiting."""
        return dataclasses.replace(self._stats, num_waiting=self._num_waiting())

    def _num_waiting(self) -> int:
        return self._stats.num_waiting + self._adds_sent - self._adds_applied

    def _submit(self, command: tuple) -> None:
        if command[0] == "add":
            _, rid, ids, _, arrival = command
            self._state[rid] = _Stream(ids, arrival)
            self._adds_sent += 1
        if self._conn is None or self._conn.closed:
            if command[0] == "add":
                self._deliver([(command[1], _EngineFailed("the engine process is not running"))])
            return
        try:
            self._conn.send(command)
        except OSError as e:  # the engine process is gone
            self._lost(f"the engine process is gone ({e.strerror or e})")

    def _stream_closed(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def _on_readable(self) -> None:
        try:
            for _ in range(64):  # then back to the loop; the reader fires again for the rest
                if not self._conn.poll():
                    break
                _, outputs, counts, stats = self._conn.recv()
                if stats is not None:
                    self._stats = stats
                self._adds_applied = counts[0]
                self._stats.num_running, self._stats.num_waiting, self._stats.kv_cache_usage = counts[1:]
                self._deliver_wire(outputs)
        except (EOFError, OSError):
            self._lost("the engine process exited")

    def _lost(self, reason: str) -> None:
        if self._stopping:
            reason = "the engine stopped"
        elif self.error is None:
            code = self._process.exitcode if self._process is not None else None
            log.error("%s (exit code %s): failing its requests", reason, code)
        self._close(reason)

    def _deliver_wire(self, outputs: list[tuple]) -> None:
        for wire in outputs:
            rid = wire[0]
            stream = self._streams.get(rid)
            state = self._state.get(rid)
            if stream is None or state is None:
                continue  # the caller went away (its abort is on the way)
            outbox = stream[1]
            if len(wire) == 3:
                _, kind, message = wire
                self._state.pop(rid, None)
                outbox.put(_ERRORS[kind](message))
                continue
            _, new_ids, new_text, finish_reason, logprobs, first_token_time = wire
            state.token_ids.extend(new_ids)
            state.text += new_text
            finished = finish_reason is not None
            if finished:
                self._state.pop(rid, None)
            outbox.put(
                RequestOutput(
                    request_id=rid,
                    prompt_token_ids=state.prompt_token_ids,
                    new_token_ids=new_ids,
                    new_text=new_text,
                    token_ids=list(state.token_ids),
                    text=state.text,
                    finished=finished,
                    finish_reason=finish_reason,
                    logprobs=logprobs,
                    first_token_time=first_token_time,
                    arrival_time=state.arrival_time,
                )
            )
