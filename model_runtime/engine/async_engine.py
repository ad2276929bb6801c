"""AsyncEngine: an LLMEngine stepping in a background thread of this process, behind EngineFront.

What `moe-runtime serve --no-engine-process`, the benchmarks and tests use; the server's default
is the engine in a child process (engine/process.py, docs/decisions.md #15).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.front import EngineFront
from model_runtime.engine.messages import AbortRequest, AddRequest, RequestFailed
from model_runtime.engine.requests import EngineStats, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine(EngineFront):
    """An LLMEngine stepping in a background thread of this process.

    All engine state is touched by the engine thread only; the event loop hands it commands
    (add, abort) through a locked list and receives outputs through `loop.call_soon_threadsafe`.
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, model_name: str | None = None):
        super().__init__()
        self.engine = LLMEngine(model, tokenizer, config)
        self.config = self.engine.config
        self.tokenizer = tokenizer
        self.validator = self.engine.validator
        self.max_model_len = self.engine.max_model_len
        self.model_name = model_name or getattr(model.config, "name", None) or type(model).__name__
        self._cond = threading.Condition()
        self._commands: list[AddRequest | AbortRequest] = []
        self._num_pending_adds = 0
        self._thread: threading.Thread | None = None
        self._shutdown_requested = False  # the thread exits once the commands are processed
        self._idle = threading.Event()
        self._idle.set()
        self.error: BaseException | None = None  # the last step failure, for health checks

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self.is_running:
            return
        self._shutdown_requested = False
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def _busy(self) -> bool:
        return not self._idle.is_set()

    async def _shutdown(self, abort: list[str]) -> None:
        with self._cond:
            self._commands.extend(AbortRequest(rid) for rid in abort)
            self._shutdown_requested = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def stats(self) -> EngineStats:
        s = self.engine.stats()
        s.num_waiting += self._num_pending_adds
        return s

    def _num_waiting(self) -> int:
        return self.engine.num_waiting + self._num_pending_adds

    def _submit(self, command: AddRequest | AbortRequest) -> None:
        with self._cond:
            if isinstance(command, AddRequest):
                self._num_pending_adds += 1
            self._commands.append(command)
            self._idle.clear()
            self._cond.notify()

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not engine.has_unfinished() and not self._shutdown_requested:
                    self._idle.set()
                    self._cond.wait()
                commands, self._commands = self._commands, []
                self._num_pending_adds = 0
            outputs: list[RequestOutput | RequestFailed] = []
            for command in commands:
                outputs.extend(engine.apply(command, self._streams.__contains__))
            if self._shutdown_requested and not self._commands:
                self._deliver(outputs)
                self._idle.set()
                return
            if engine.has_unfinished():
                outputs.extend(self._step())
            self._deliver(outputs)

    def _step(self) -> list[RequestOutput | RequestFailed]:
        try:
            out = self.engine.step()
            self.error = None
            return out
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("engine step failed")
            self.error = e
            return self.engine.fail_all(e)
