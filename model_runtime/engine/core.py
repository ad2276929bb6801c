"""The inference engine: continuous batching over a paged KV cache, and its asyncio front.

`LLMEngine` is the synchronous core: `add_request()` queues a request, each `step()` runs one
forward pass over the tokens the scheduler picked (decodes first, then prefill chunks) and
returns a `RequestOutput` for every request that produced a token or finished.

`EngineFront` streams each request's outputs into an outbox on the caller's event loop while the
step loop runs elsewhere: `AsyncEngine` runs it in a background thread of this process;
`model_runtime.engine.process.EngineProcess` (what `moe-runtime serve` uses) in a child process.

Length policy: a prompt must be shorter than the model length (`max_model_len`: the model's
`max_position_embeddings`, or less if configured), else the request is refused with EngineError.
`max_tokens` is clamped so that prompt + output fit the model length; a request cut short that way
finishes with reason "length".
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from model_runtime.engine.block_manager import BlockManager
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.detokenizer import IncrementalDetokenizer
from model_runtime.engine.sampling import SampleRow, SamplingParams, make_generator, sample
from model_runtime.engine.scheduler import ScheduledSeq, Scheduler, Sequence
from model_runtime.kernels.cpu_layers import use_cpu_decode_kernels, use_decode_layout
from model_runtime.models.model import Transformer
from model_runtime.models.paged import PagedBatch, build_paged_batch

__all__ = [
    "AsyncEngine",
    "EngineFront",
    "EngineConfig",
    "EngineError",
    "EngineOverloaded",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "RequestValidator",
    "SamplingParams",
]

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A bad request (prompt too long, invalid parameters); the message is meant for the user."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (or the engine is shutting down): retry later."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]  # tokens produced since the previous output of this request
    new_text: str  # text since the previous output (stop strings trimmed; never splits a UTF-8 char)
    token_ids: list[int]  # all generated tokens so far
    text: str  # all generated text so far
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    logprobs: list[dict] | None  # per new token: {"token_id", "logprob", "top": {token_id: logprob}}
    first_token_time: float | None  # time.monotonic()
    arrival_time: float  # time.monotonic()


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    expert_tokens: dict[int, list[int]]  # MoE layer -> cumulative tokens routed to each expert
    num_kv_blocks: int = 0
    block_size: int = 0
    num_preemptions: int = 0  # cumulative
    max_model_len: int = 0


@dataclass(eq=False)
class _Request:
    seq: Sequence
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    arrival_time: float
    prompt_token_ids: list[int]  # shared by every output of the request: read-only
    first_token_time: float | None = None
    emitted_tokens: int = 0  # generated tokens already reported
    pending_logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.seq.request_id


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _token_set(x) -> set[int]:
    if x is None:
        return set()
    if isinstance(x, int):
        return {x}
    return {int(t) for t in x}


@dataclass
class RequestValidator:
    """Checks a request against an engine's limits; the engine and a server in front of an engine
    process (which knows those limits but not the engine) share it."""

    tokenizer: object | None
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or EngineError saying what is wrong with the request."""
        if not isinstance(params, SamplingParams):
            raise EngineError(f"sampling parameters must be SamplingParams, got {type(params).__name__}")
        try:
            params.validate(self.max_model_len)
        except ValueError as e:
            raise EngineError(str(e)) from None
        if bad := [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]:
            raise EngineError(f"stop_token_ids {bad} are outside the vocabulary (0..{self.vocab_size - 1})")
        if isinstance(prompt, str):
            if not prompt:
                raise EngineError("the prompt is empty")
            if self.tokenizer is None:
                raise EngineError("this engine has no tokenizer: pass the prompt as token ids")
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, list | tuple) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
        else:
            raise EngineError("the prompt must be a string or a list of token ids")
        if not ids:
            raise EngineError("the prompt is empty")
        if bad := [t for t in ids if not 0 <= t < self.vocab_size][:5]:
            raise EngineError(f"prompt token ids {bad} are outside the vocabulary (0..{self.vocab_size - 1})")
        if len(ids) >= self.max_model_len:
            raise EngineError(
                f"the prompt has {len(ids)} tokens but the model length is {self.max_model_len}: "
                f"shorten the prompt to at most {self.max_model_len - 1} tokens"
            )
        if len(ids) + 1 > self.kv_capacity_tokens:
            raise EngineError(
                f"the prompt has {len(ids)} tokens but the KV cache holds only "
                f"{self.kv_capacity_tokens}: shorten the prompt"
            )
        return ids


class LLMEngine:
    """Synchronous core. Not thread-safe: one thread calls add_request/abort_request/step."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        self.device = torch.device(config.device)
        if self.device.type == "cpu" and isinstance(model, Transformer) and not use_cpu_decode_kernels(model):
            use_decode_layout(model)  # no C decode kernels: column-major helps BLAS's gemv
        self.kv_dtype = _float_dtype(model)
        mcfg = model.config
        self.vocab_size: int = mcfg.vocab_size
        self.max_model_len: int = min(mcfg.max_position_embeddings, config.max_model_len or 1 << 62)
        self.eos_token_ids = _token_set(getattr(mcfg, "eos_token_id", None)) | _token_set(
            getattr(tokenizer, "eos_token_ids", None)
        )

        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            per_block = model.kv_cache_bytes_per_token(self.kv_dtype) * config.block_size
            num_blocks = max(1, config.kv_cache_memory_bytes // per_block)
        self.kv_cache = model.allocate_kv_cache(num_blocks, config.block_size, self.kv_dtype, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.validator = RequestValidator(
            tokenizer, self.vocab_size, self.max_model_len, self.blocks.capacity_tokens
        )
        self.requests: dict[str, _Request] = {}
        self.generator = torch.Generator(device=self.device)
        if config.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(config.seed)
        self.num_preemptions = 0

    # -- requests -------------------------------------------------------------------------------

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or EngineError saying what is wrong with the request."""
        return self.validator.validate(prompt, params)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. EngineError for a bad one, EngineOverloaded when the queue is full."""
        if request_id in self.requests:
            raise EngineError(f"request id {request_id!r} is already in use")
        ids = prompt_token_ids if prompt_token_ids is not None else self.validate(prompt, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloaded(f"{len(self.scheduler.waiting)} requests are waiting: retry later")
        # the whole sequence must fit the model length and, alone, the KV pool
        max_tokens = min(
            params.max_tokens, self.max_model_len - len(ids), self.blocks.capacity_tokens - len(ids)
        )
        seq = Sequence(request_id, list(ids), len(ids), max_tokens)
        req = _Request(
            seq=seq,
            params=params,
            detok=IncrementalDetokenizer(self.tokenizer, ids, params.stop),
            generator=make_generator(params.seed, self.device) if params.seed is not None else None,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            prompt_token_ids=list(ids),
        )
        self.requests[request_id] = req
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request now and free its blocks; its final output (reason "abort"), if it was live."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req.seq)
        req.finish_reason = "abort"
        return self._output(req, [])

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        counts = getattr(self.model, "expert_token_counts", None)
        return EngineStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=self.blocks.usage,
            expert_tokens=counts() if counts else {},
            num_kv_blocks=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            num_preemptions=self.num_preemptions,
            max_model_len=self.max_model_len,
        )

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self.num_preemptions += len(plan.preempted)
        if not plan.scheduled:
            return []
        tokens, batch = self._prepare(plan.scheduled)
        with torch.inference_mode():
            logits = self.model.forward_paged(tokens, batch, self.kv_cache)  # [S, V]
        for s in plan.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens

        rows = [i for i, s in enumerate(plan.scheduled) if s.seq.num_uncomputed_tokens == 0]
        if not rows:
            return []
        if len(rows) < len(plan.scheduled):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        reqs = [self.requests[plan.scheduled[i].seq.request_id] for i in rows]
        result = sample(
            logits.float(),
            [
                SampleRow(
                    r.params.temperature, r.params.top_p, r.params.top_k, r.generator, r.params.logprobs
                )
                for r in reqs
            ],
            self.generator,
        )
        now = time.monotonic()
        outputs = []
        for req, token, lp in zip(reqs, result.token_ids, result.logprobs, strict=True):
            if req.first_token_time is None:
                req.first_token_time = now
            self._append_token(req, token, lp)
            outputs.append(
                self._output(req, req.seq.token_ids[req.seq.num_prompt_tokens + req.emitted_tokens :])
            )
            if req.finish_reason is not None:
                self.scheduler.finish(req.seq)
                del self.requests[req.request_id]
        return outputs

    def _prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, PagedBatch]:
        """The step's new tokens [N] and their PagedBatch."""
        tokens: list[int] = []
        for s in scheduled:
            start = s.seq.num_computed_tokens
            tokens.extend(s.seq.token_ids[start : start + s.num_new_tokens])
        batch = build_paged_batch(
            [(s.seq.block_table, s.seq.num_computed_tokens, s.num_new_tokens) for s in scheduled],
            self.blocks.block_size,
            self.device,
        )
        return torch.tensor(tokens, dtype=torch.long, device=self.device), batch

    def _append_token(self, req: _Request, token: int, logprob: dict | None) -> None:
        seq, params = req.seq, req.params
        seq.token_ids.append(token)
        if logprob is not None:
            req.pending_logprobs.append(logprob)
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            req.finish_reason = "stop"  # the stop token counts as generated, its text is not shown
        elif req.detok.add(token) is not None:
            req.finish_reason = "stop"
        elif seq.num_output_tokens >= seq.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None and req.detok.flush() is not None:
            req.finish_reason = "stop"

    def _output(self, req: _Request, new_token_ids: list[int]) -> RequestOutput:
        finished = req.finish_reason is not None
        seq = req.seq
        req.emitted_tokens += len(new_token_ids)
        logprobs = None
        if req.params.logprobs is not None:
            logprobs, req.pending_logprobs = req.pending_logprobs, []
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            new_token_ids=list(new_token_ids),
            new_text=req.detok.take_new_text(finished),
            token_ids=seq.token_ids[seq.num_prompt_tokens :],
            text=req.detok.emitted_text,
            finished=finished,
            finish_reason=req.finish_reason,
            logprobs=logprobs,
            first_token_time=req.first_token_time,
            arrival_time=req.arrival_time,
        )


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: the later state, the new parts of both."""
    logprobs = None
    if earlier.logprobs is not None or later.logprobs is not None:
        logprobs = (earlier.logprobs or []) + (later.logprobs or [])
    return dataclasses.replace(
        later,
        new_token_ids=earlier.new_token_ids + later.new_token_ids,
        new_text=earlier.new_text + later.new_text,
        logprobs=logprobs,
    )


# -- the asyncio front ----------------------------------------------------------------------------


class _EngineFailed(RuntimeError):
    pass


class EngineFront:
    """What a server holds: `generate()` streams a request's outputs on the caller's event loop
    while the engine steps elsewhere. AsyncEngine steps in a thread of this process;
    `model_runtime.engine.process.EngineProcess` in a process of its own. Subclasses set
    tokenizer, config, max_model_len, model_name and validator, and implement `_submit()` (hand
    ("add", request_id, ids, params, arrival) or ("abort", request_id) to the engine), `is_running`,
    `stats()`, `_num_waiting()` and `_shutdown()`; outputs come back through `_deliver()`."""

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
            self._submit(("add", request_id, ids, params, time.monotonic()))
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
        self._submit(("abort", request_id))

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def _submit(self, command: tuple) -> None:
        raise NotImplementedError

    def _deliver(self, outputs: list) -> None:
        """Hand outputs (RequestOutput, or (request_id, exception)) to their streams' outboxes;
        callable from any thread."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            rid = out[0] if isinstance(out, tuple) else out.request_id
            stream = self._streams.get(rid)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append(
                    (stream[1], out[1] if isinstance(out, tuple) else out)
                )
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass


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
        self._commands: list[tuple] = []  # ("add", request_id, ids, params, arrival) | ("abort", request_id)
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
            self._commands.extend(("abort", rid) for rid in abort)
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

    def _submit(self, command: tuple) -> None:
        with self._cond:
            if command[0] == "add":
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
            outputs: list = []
            for command in commands:
                outputs.extend(apply_command(engine, command, self._streams.__contains__))
            if self._shutdown_requested and not self._commands:
                self._deliver(outputs)
                self._idle.set()
                return
            if engine.has_unfinished():
                outputs.extend(self._step())
            self._deliver(outputs)

    def _step(self) -> list:
        try:
            out = self.engine.step()
            self.error = None
            return out
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("engine step failed")
            self.error = e
            return fail_all(self.engine, e)


def fail_all(engine: LLMEngine, error: Exception) -> list[tuple[str, Exception]]:
    """After a failed step: abort every request; each stream gets an error saying why."""
    failed = []
    for rid in list(engine.requests):
        engine.abort_request(rid)
        failed.append((rid, _EngineFailed(f"the engine failed while running this request: {error}")))
    return failed


def apply_command(engine: LLMEngine, command: tuple, wanted=None) -> list:
    """Apply ("add", request_id, ids, params, arrival) or ("abort", request_id) to the engine; the
    outputs it makes (an aborted request's last one, (request_id, error) for a refused add).
    `wanted(request_id)`, when given, skips adds whose caller has already gone away."""
    if command[0] == "abort":
        out = engine.abort_request(command[1])
        return [out] if out is not None else []
    _, request_id, ids, params, arrival = command
    if wanted is not None and not wanted(request_id):
        return []
    try:
        engine.add_request(request_id, ids, params, arrival_time=arrival, prompt_token_ids=ids)
    except (EngineError, EngineOverloaded) as e:
        return [(request_id, e)]
    except Exception as e:  # never let one request take the step loop down
        log.exception("adding request %s failed", request_id)
        engine.abort_request(request_id)
        return [(request_id, _EngineFailed(f"the engine could not start this request: {e}"))]
    return []


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
