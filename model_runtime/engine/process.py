"""The server's side of an engine in a process of its own (the engine's side: engine/worker.py).

`moe-runtime serve` runs the engine this way by default (as vLLM V1 runs its EngineCore): the
server process keeps the event loop, tokenizes and validates requests, and streams outputs; the
engine process loads the model and runs `LLMEngine`'s step loop. With the engine in a thread
beside the loop, every token's Python work in the server (SSE events, gRPC responses) waits for the
step to release the GIL, and a small model's step holds it for most of its time. What crosses
the pipe: engine/messages.py. No torch here: the server process never loads the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

from model_runtime.engine.front import EngineFront
from model_runtime.engine.messages import (
    AbortRequest,
    AddRequest,
    EngineReady,
    EngineSpec,
    OutputDelta,
    RequestFailed,
    StartFailed,
    StepOutputs,
    StopEngine,
)
from model_runtime.engine.requests import EngineFailed, EngineStats, RequestOutput, RequestValidator
from model_runtime.engine.worker import spawn_engine

log = logging.getLogger(__name__)


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or exited."""


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

    def __init__(self, spec: EngineSpec, tokenizer, model_name: str | None = None, spawned=None, ranks=None):
        """`spawned`: what `spawn_engine(spec)` returned, where the caller started the process
        early (before importing torch itself); else `start()` starts it. `ranks`: this pod's
        other ranks (distributed/ranks.LocalRanks, started) when the engine is rank 0 of several."""
        super().__init__()
        self._spawned = spawned
        self.ranks = ranks
        self.weight_bytes: dict[int, int] = {}  # this pod's ranks -> bytes of weights
        self.kv_capacity_tokens = 0  # as the engine reported when ready
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
        return (
            self._process is not None
            and self.error is None
            and self._process.is_alive()
            and (self.ranks is None or self.ranks.alive)
        )

    @property
    def lost_reason(self) -> str | None:
        """Why this engine is not running (None while it is)."""
        if self.is_running:
            return None
        if self.ranks is not None and not self.ranks.alive:
            codes = {rank: code for rank, code in self.ranks.exit_codes().items() if code is not None}
            return f"rank(s) {', '.join(f'{r} exited with code {c}' for r, c in codes.items())}"
        return self.error or "the engine process is not running"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the engine process and wait until its model is loaded (EngineProcessError if it
        cannot load it; the process is gone by then)."""
        if self.is_running:
            return
        if self._spawned is not None:  # started early by the caller
            (self._process, self._conn), self._spawned = self._spawned, None
        else:
            self._process, self._conn = spawn_engine(self.spec)
        self.error = None
        self._accepting = True
        self._stopping = False
        try:
            info = await asyncio.to_thread(self._wait_for_start)
        except BaseException:
            self._kill()
            raise
        if not isinstance(info, EngineReady):
            self._kill()
            raise EngineProcessError(f"the engine process could not load {self.spec.model}: {info.message}")
        self.max_model_len = info.max_model_len
        local = set(self.spec.parallel.global_ranks())
        self.weight_bytes = {rank: n for rank, n in info.weight_bytes.items() if rank in local}
        self.kv_capacity_tokens = info.kv_capacity_tokens
        self.validator = RequestValidator(
            self.tokenizer,
            info.vocab_size,
            info.max_model_len,
            info.kv_capacity_tokens,
            max_context_tokens=info.max_context_tokens,
            max_step_attention_bytes=info.max_step_attention_bytes,
        )
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        log.info(
            "engine process %d: %s loaded (%s on %s)",
            self._process.pid,
            self.spec.model,
            info.dtype,
            info.device,
        )

    def _wait_for_start(self) -> EngineReady | StartFailed:
        while not self._conn.poll(0.2):
            if not self._process.is_alive():
                return StartFailed(f"it exited with code {self._process.exitcode}")
            if self.ranks is not None:  # rank 0 would wait for a rank that failed until its join timeout
                self.ranks.poll()
                if self.ranks.failed:
                    rank, message = next(iter(self.ranks.failed.items()))
                    return StartFailed(f"rank {rank} could not start: {message}")
        try:
            return self._conn.recv()
        except EOFError:
            self._process.join(5)
            return StartFailed(f"it exited with code {self._process.exitcode}")

    async def _shutdown(self, abort: list[str]) -> None:
        self._stopping = True
        for rid in abort:
            self._submit(AbortRequest(rid))
        self._submit(StopEngine())
        await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            log.warning("the engine process did not stop in 30s: killing it")
            self._process.kill()
            await asyncio.to_thread(self._process.join, 10)
        if self._conn is not None and not self._conn.closed:
            self._on_readable()  # the last outputs (aborted requests), if not read yet
        if self.ranks is not None:  # rank 0 told them to stop on its way out
            await asyncio.to_thread(self.ranks.stop, 10.0)
        self._close("the engine stopped")

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(10)
        if self.ranks is not None:
            self.ranks.stop(0.0)
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
        self._deliver([RequestFailed(rid, EngineFailed(f"{reason} while running this request")) for rid in self._streams])
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
        """As of the engine's last message; requests sent but not yet taken in count as waiting.
        Weight bytes: this pod's ranks only (the other pods report theirs)."""
        return dataclasses.replace(
            self._stats,
            num_waiting=self._num_waiting(),
            weight_bytes=self.weight_bytes,
            kv_capacity_tokens=self.kv_capacity_tokens,
        )

    def _num_waiting(self) -> int:
        return self._stats.num_waiting + self._adds_sent - self._adds_applied

    def _submit(self, command: AddRequest | AbortRequest | StopEngine) -> None:
        if isinstance(command, AddRequest):
            self._state[command.request_id] = _Stream(command.prompt_token_ids, command.arrival_time)
            self._adds_sent += 1
        if self._conn is None or self._conn.closed:
            if isinstance(command, AddRequest):
                self._deliver([RequestFailed(command.request_id, EngineFailed("the engine process is not running"))])
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
                message: StepOutputs = self._conn.recv()
                if message.stats is not None:
                    self._stats = message.stats
                counts = message.counts
                self._adds_applied = counts.adds_applied
                self._stats.num_running, self._stats.num_waiting = counts.num_running, counts.num_waiting
                self._stats.kv_cache_usage = counts.kv_cache_usage
                self._deliver_step(message.outputs)
        except (EOFError, OSError):
            self._lost("the engine process exited")

    def _lost(self, reason: str) -> None:
        if self._stopping:
            reason = "the engine stopped"
        elif self.error is None:
            code = self._process.exitcode if self._process is not None else None
            log.error("%s (exit code %s): failing its requests", reason, code)
        self._close(reason)

    def _deliver_step(self, outputs: list[OutputDelta | RequestFailed]) -> None:
        """Each delta as its stream's next RequestOutput (this side keeps the stream's tokens and text)."""
        for out in outputs:
            state = self._state.get(out.request_id)  # dropped with its stream (_stream_closed)
            if state is None:
                continue  # the caller went away (its abort is on the way)
            outbox = self._streams[out.request_id][1]
            if isinstance(out, RequestFailed):
                outbox.put(out.error)
                continue
            state.token_ids.extend(out.new_token_ids)
            state.text += out.new_text
            outbox.put(
                RequestOutput(
                    request_id=out.request_id,
                    prompt_token_ids=state.prompt_token_ids,
                    new_token_ids=out.new_token_ids,
                    new_text=out.new_text,
                    token_ids=list(state.token_ids),
                    text=state.text,
                    finished=out.finish_reason is not None,
                    finish_reason=out.finish_reason,
                    logprobs=out.logprobs,
                    first_token_time=out.first_token_time,
                    arrival_time=state.arrival_time,
                    prompt_logprobs=out.prompt_logprobs,
                )
            )
