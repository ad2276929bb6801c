"""What a server holds of an engine: `EngineFront` streams each request's outputs into an outbox on
the caller's event loop while the engine steps elsewhere (AsyncEngine: a thread of this process,
engine/async_engine.py; EngineProcess: a child process, engine/process.py).

No torch here: the server process (decision 15) streams without loading a model.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator

from model_runtime.engine.config import EngineConfig
from model_runtime.engine.messages import AbortRequest, AddRequest, RequestFailed
from model_runtime.engine.requests import (
    EngineError,
    EngineOverloaded,
    EngineStats,
    RequestOutput,
    RequestValidator,
    SamplingParams,
    merge_outputs,
)


class EngineFront:
    """What a server holds: `generate()` streams a request's outputs on the caller's event loop
    while the engine steps elsewhere. AsyncEngine steps in a thread of this process;
    EngineProcess (engine/process.py) in a process of its own. Subclasses set tokenizer, config,
    max_model_len, model_name and validator, and implement `_submit()` (hand an AddRequest or an
    AbortRequest to the engine), `is_running`, `stats()`, `_num_waiting()` and `_shutdown()`;
    outputs come back through `_deliver()`."""

    tokenizer: object | None
    config: EngineConfig
    max_model_len: int
    model_name: str
    validator: RequestValidator | None  # None until the engine's limits are known

    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, _Outbox]] = {}
        self._accepting = True

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    def _busy(self) -> bool:
        """Work the engine still has that no stream is waiting for (commands not yet applied)."""
        return False

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish for up to `drain_timeout` seconds, abort
        the rest (their streams end with finish_reason "abort"), and stop the engine."""
        self._accepting = False
        if not self.is_running:
            return
        deadline = time.monotonic() + drain_timeout
        while (self._streams or self._busy()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polled with a deadline
        await self._shutdown(list(self._streams))

    async def _shutdown(self, abort: list[str]) -> None:
        """Abort these requests, then stop the engine and wait for it."""
        raise NotImplementedError

    async def warmup(self) -> None:
        """One short generation through the whole path; the server is ready only after it."""
        await self.start()
        prompt = self.tokenizer.encode("Hello") if self.tokenizer is not None else [0]
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        async for _ in self.generate(prompt or [0], params, request_id=f"warmup-{uuid.uuid4().hex}"):
            pass

    # -- requests ---------------------------------------------------------------------------------

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Validate now (EngineError, EngineOverloaded) and return the request's output stream.

        The request enters the engine on the first iteration; leaving the iteration early
        (break, aclose, task cancellation) aborts it and frees its blocks.
        """
        request_id = request_id or uuid.uuid4().hex
        if self.validator is None:  # an engine process not started yet: its limits are unknown
            raise EngineOverloaded("the engine is not running (call start())")
        ids = self.validator.validate(prompt, params)
        if not self._accepting:
            raise EngineOverloaded("the engine is shutting down")
        if not self.is_running:
            raise EngineOverloaded("the engine is not running (call start())")
        if request_id in self._streams:
            raise EngineError(f"request id {request_id!r} is already in use")
        if self._num_waiting() >= self.config.max_waiting:
            raise EngineOverloaded(f"{self.config.max_waiting} requests are waiting: retry later")
        return self._stream(request_id, ids, params)

    def _num_waiting(self) -> int:
        """Requests waiting for a slot, counting those handed over but not yet taken in."""
        raise NotImplementedError

    async def _stream(self, request_id: str, ids: list[int], params: SamplingParams):
        if request_id in self._streams:
            raise EngineError(f"request id {request_id!r} is already in use")
        outbox = _Outbox()
        self._streams[request_id] = (asyncio.get_running_loop(), outbox)
        finished = False
        pending = None  # an item taken while merging, handed out next
        try:
            self._submit(AddRequest(request_id, ids, params, time.monotonic()))
            while True:
                item = pending if pending is not None else await outbox.get()
                pending = None
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                # A reader that fell behind gets what queued up as one output (as vLLM's output
                # collector does): fewer events per token exactly when the loop is the bottleneck.
                while not item.finished and outbox.items:
                    nxt = outbox.items.popleft()
                    if isinstance(nxt, BaseException):
                        pending = nxt
                        break
                    item = merge_outputs(item, nxt)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            self._stream_closed(request_id)
            if not finished:
                self.abort(request_id)

    def _stream_closed(self, request_id: str) -> None:
        pass

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream, if still read, ends with reason "abort"."""
        self._submit(AbortRequest(request_id))

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def _submit(self, command: AddRequest | AbortRequest) -> None:
        raise NotImplementedError

    def _deliver(self, outputs: list[RequestOutput | RequestFailed]) -> None:
        """Hand outputs to their streams' outboxes (a RequestFailed as its error, which the stream
        raises); callable from any thread."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                item = out.error if isinstance(out, RequestFailed) else out
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass


class _Outbox:
    """One stream's outputs on its reader's loop: a deque and at most one waiting reader. Lighter
    than asyncio.Queue, whose cost a stream pays on every token, on the loop that serves HTTP."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self):
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


def _put_all(items: list[tuple[_Outbox, object]]) -> None:
    for outbox, item in items:
        outbox.put(item)
