"""The synchronous engine: continuous batching over a paged KV cache.

`LLMEngine.add_request()` queues a request, each `step()` runs one forward pass over the tokens the
scheduler picked (decodes first, then prefill chunks) and returns a `RequestOutput` for every
request that produced a token or finished. A front (engine/front.py) hands it commands through
`apply()` and streams its outputs: from a thread (engine/async_engine.py) or from a child process
(engine/worker.py, the engine process's side).

Length policy: a prompt must be shorter than the model length (`max_model_len`: the model's
`max_position_embeddings`, or less if configured), else the request is refused with EngineError.
`max_tokens` is clamped so that prompt + output fit the model length; a request cut short that way
finishes with reason "length".

Memory (engine/memory.py): the KV cache is sized at start (`join_replica`: --kv-cache-memory, or
from the device's memory after a profiling pass, or the host's) and reported in a log line and in
EngineStats.kv_capacity_tokens. Each step's attention memory is kept under
`max_step_attention_bytes` by the scheduler; a request whose context alone cannot fit is refused
(EngineError: its prompt, at validation) or fails (a RequestFailed from `step()`), and its
`max_tokens` is clamped so that prompt + output fit, as for the model length.

Out of memory in a step (one process): the step's sequences are run again in halves, down to one
sequence, and a prefill chunk alone in halves down to one token; only a sequence that cannot run
one token alone fails (RequestFailed, EngineFailed saying out of memory), and every other sequence
goes on as if nothing happened (KV writes to the same slots are idempotent, and no sequence
advances before its forward pass succeeded; a shortened chunk goes on in the next step).
Distributed, a failed step stays fatal: the other ranks are inside that step's collectives
(engine/worker.py).

Distributed (a model built with a comm: model_runtime.distributed): this engine is rank 0's. It
schedules, samples and detokenizes alone; each step it broadcasts the plan (token ids, positions,
slot mapping, block tables) to the other ranks, which run the same forward pass on their part of
the model (distributed/follower.py). KV layouts stay identical because block ids come from here;
so does the prefix cache: only rank 0 keeps its hashes, and a block it reuses holds, on every rank,
that rank's share of the keys/values the same earlier steps wrote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from model_runtime.engine.block_manager import BlockManager
from model_runtime.engine.config import EngineConfig, format_bytes
from model_runtime.engine.detokenizer import IncrementalDetokenizer
from model_runtime.engine.memory import StepMemory, is_out_of_memory, size_kv_cache
from model_runtime.engine.messages import AbortRequest, AddRequest, RequestFailed
from model_runtime.engine.requests import (
    EngineError,
    EngineFailed,
    EngineOverloaded,
    EngineStats,
    RequestOutput,
    RequestValidator,
    SamplingParams,
)
from model_runtime.engine.sampling import SampleRow, allowed_tokens, make_generator, prompt_logprobs, sample
from model_runtime.engine.scheduler import ScheduledSeq, Scheduler, Sequence
from model_runtime.engine.structured import Grammars
from model_runtime.kernels.cpu_decode import use_cpu_decode_kernels, use_decode_layout
from model_runtime.models.config import token_ids
from model_runtime.models.model import Transformer
from model_runtime.models.paged import PagedBatch, build_paged_batch

log = logging.getLogger(__name__)


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
    # with SamplingParams.prompt_logprobs: one entry per prompt position computed so far (None for
    # the first token), handed out once, with the request's first output
    prompt_logprobs: list[dict | None] | None = None
    prompt_logprobs_sent: bool = False
    matcher: object | None = None  # structured output: its grammar's state (llguidance.LLMatcher)

    @property
    def request_id(self) -> str:
        return self.seq.request_id


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in (its KV cache's): its first float parameter's, FP8 weights
    (which are dequantized per matmul) aside."""
    for p in model.parameters():
        if p.is_floating_point() and p.element_size() > 1:
            return p.dtype
    return torch.float32


def join_replica(
    model: torch.nn.Module, config: EngineConfig, kv_dtype: torch.dtype
) -> tuple[dict[int, int], int, str]:
    """(weight bytes per rank, KV blocks, how they were sized): every rank of a replica calls this
    once its part is loaded (rank 0 from LLMEngine, the others from their follower loop), in the
    same order, so the ranks agree on one block count: the fewest any of them can hold. Each rank
    sizes its own cache (engine/memory.size_kv_cache; on CUDA after a profiling pass, which runs the
    layers' collectives on every rank alike)."""
    num_blocks = config.num_kv_blocks
    comm = getattr(model, "comm", None)
    rank = f"rank {comm.rank}: " if comm is not None else ""
    if num_blocks is not None:
        how = "num_kv_blocks"
    else:
        per_block = model.kv_cache_bytes_per_token(kv_dtype) * config.block_size
        budget, how = size_kv_cache(model, config, kv_dtype)
        num_blocks = max(1, budget // per_block)
        if comm is not None:
            log.info("%sroom for %d KV blocks (%s)", rank, num_blocks, how)
    weights = model.weight_bytes() if hasattr(model, "weight_bytes") else 0
    if comm is None:
        return {0: weights}, num_blocks, how
    agreed = comm.agree_min(num_blocks)
    if agreed < num_blocks:
        how = f"the fewest blocks of the replica's ranks; this rank's: {num_blocks} ({how})"
    return dict(enumerate(comm.gather_ints(weights))), agreed, how


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
        self.eos_token_ids = token_ids(getattr(mcfg, "eos_token_id", None)) | token_ids(
            getattr(tokenizer, "eos_token_ids", None)
        )

        self.comm = getattr(model, "comm", None)  # the replica's other ranks (None: one process)
        self.weight_bytes, num_blocks, sizing = join_replica(model, config, self.kv_dtype)
        self.kv_cache = model.allocate_kv_cache(num_blocks, config.block_size, self.kv_dtype, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_cache_bytes = sum(t.numel() * t.element_size() for t in self.kv_cache)
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens, %s (%s)",
            num_blocks,
            config.block_size,
            self.blocks.capacity_tokens,
            format_bytes(self.kv_cache_bytes),
            sizing,
        )
        # one step's attention memory: the scheduler keeps each step under the budget
        self.step_memory = StepMemory(model, self.kv_dtype)
        budget = config.max_step_attention_bytes
        # the longest context one sequence may have (None: the model length)
        self.max_context_tokens: int | None = None
        if self.step_memory.known:
            fits = self.step_memory.max_context(budget, self.max_model_len)
            if fits < self.max_model_len:
                self.max_context_tokens = fits
                log.warning(
                    "one sequence's context fits the step attention budget (%s, --max-step-attention-memory) "
                    "up to %d tokens, less than the model length %d: longer prompts are refused",
                    format_bytes(budget),
                    fits,
                    self.max_model_len,
                )
        self.scheduler = Scheduler(
            self.blocks,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            step_bytes=self.step_memory.attention_bytes if self.step_memory.known else None,
            max_step_bytes=budget,
            max_context_tokens=self.max_context_tokens,
        )
        # structured output: grammars over the model's vocabulary; their masks are computed in a
        # thread of their own while the step's forward pass runs
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_token_ids) if tokenizer is not None else None
        self._mask_thread: ThreadPoolExecutor | None = None
        self.validator = RequestValidator(
            tokenizer,
            self.vocab_size,
            self.max_model_len,
            self.blocks.capacity_tokens,
            max_context_tokens=self.max_context_tokens,
            max_step_attention_bytes=budget,
            grammars=self.grammars,
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
        matcher = None
        if params.structured is not None:
            if self.grammars is None:
                raise EngineError(f"{params.structured.field}: this engine has no tokenizer to hold output to it")
            try:
                matcher = self.grammars.matcher(params.structured)
            except ValueError as e:
                raise EngineError(str(e)) from None
        # the whole sequence must fit the model length and, alone, the KV pool and the step's attention
        max_tokens = min(
            params.max_tokens,
            self.max_model_len - len(ids),
            self.blocks.capacity_tokens - len(ids),
            (self.max_context_tokens or self.max_model_len) - len(ids),
        )
        seq = Sequence(
            request_id,
            list(ids),
            len(ids),
            max_tokens,
            priority=params.priority,
            skip_prefix_cache=params.skip_reading_prefix_cache,
        )
        req = _Request(
            seq=seq,
            params=params,
            detok=IncrementalDetokenizer(self.tokenizer, ids, params.stop),
            generator=make_generator(params.seed, self.device) if params.seed is not None else None,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            prompt_token_ids=list(ids),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            matcher=matcher,
        )
        if params.prompt_logprobs is not None:
            seq.skip_prefix_cache = True  # every prompt position's logits: no cached blocks
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

    def apply(
        self, command: AddRequest | AbortRequest, wanted: Callable[[str], bool] | None = None
    ) -> list[RequestOutput | RequestFailed]:
        """Apply a front's command; the outputs it makes (an aborted request's last one, a
        RequestFailed for a refused add). `wanted(request_id)`, when given, skips adds whose
        caller has already gone away."""
        if isinstance(command, AbortRequest):
            out = self.abort_request(command.request_id)
            return [out] if out is not None else []
        request_id, ids = command.request_id, command.prompt_token_ids
        if wanted is not None and not wanted(request_id):
            return []
        try:
            self.add_request(request_id, ids, command.params, arrival_time=command.arrival_time, prompt_token_ids=ids)
        except (EngineError, EngineOverloaded) as e:
            return [RequestFailed(request_id, e)]
        except Exception as e:  # never let one request take the step loop down
            log.exception("adding request %s failed", request_id)
            self.abort_request(request_id)
            return [RequestFailed(request_id, EngineFailed(f"the engine could not start this request: {e}"))]
        return []

    def fail_all(self, error: Exception) -> list[RequestFailed]:
        """After a failed step: abort every request; each stream gets an error saying why."""
        failed = []
        for request_id in list(self.requests):
            self.abort_request(request_id)
            failed.append(
                RequestFailed(request_id, EngineFailed(f"the engine failed while running this request: {error}"))
            )
        return failed

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
            weight_bytes=self.weight_bytes,
            kv_capacity_tokens=self.blocks.capacity_tokens,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
        )

    # -- the other ranks ------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """While idle: prove every rank is still there (ReplicaLost if one is not)."""
        if self.comm is not None:
            self.comm.send_heartbeat()

    def shutdown(self) -> None:
        """Tell the other ranks to exit (they exit 0)."""
        if self.comm is not None:
            self.comm.send_stop()
            self.comm.close()
            self.comm = None

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput | RequestFailed]:
        """One forward pass over what the scheduler picked; the outputs of the requests that got a
        token or finished, and a RequestFailed for each request that cannot run (too long for the
        step's attention budget, or out of memory even alone)."""
        plan = self.scheduler.schedule()
        self.num_preemptions += len(plan.preempted)
        failures: list[RequestFailed] = []
        for seq, reason in plan.rejected:  # the scheduler has finished them
            self.requests.pop(seq.request_id, None)
            failures.append(RequestFailed(seq.request_id, EngineError(reason)))
        if not plan.scheduled:
            return failures
        masks = self._start_grammar_masks(plan.scheduled)
        try:
            scheduled, logits, out_of_memory = self._run(plan.scheduled)
        finally:  # never leave the thread computing on a matcher this thread may advance next
            allowed = self._grammar_masks(masks)
        for s, reason in out_of_memory:
            self.abort_request(s.seq.request_id)
            failures.append(RequestFailed(s.seq.request_id, EngineFailed(reason)))
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens

        rows = [i for i, s in enumerate(scheduled) if s.seq.num_uncomputed_tokens == 0]
        if not rows:
            return failures
        if len(rows) < len(scheduled):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        reqs = [self.requests[scheduled[i].seq.request_id] for i in rows]
        result = sample(
            logits.float(),
            [
                SampleRow(
                    r.params.temperature,
                    r.params.top_p,
                    r.params.top_k,
                    r.generator,
                    r.params.logprobs,
                    min_p=r.params.min_p,
                    params=r.params if r.params.adjusts_logits else None,
                    prompt_ids=r.prompt_token_ids if r.params.repetition_penalty != 1.0 else None,
                    output_ids=r.seq.token_ids[r.seq.num_prompt_tokens :] if r.params.adjusts_logits else None,
                    allowed=allowed.get(r),
                )
                for r in reqs
            ],
            self.generator,
        )
        now = time.monotonic()
        outputs: list[RequestOutput | RequestFailed] = failures
        for req, token, lp in zip(reqs, result.token_ids, result.logprobs, strict=True):
            if req.first_token_time is None:
                req.first_token_time = now
            error = self._append_token(req, token, lp)
            if error is not None:
                self.abort_request(req.request_id)
                outputs.append(RequestFailed(req.request_id, EngineFailed(error)))
                continue
            outputs.append(
                self._output(req, req.seq.token_ids[req.seq.num_prompt_tokens + req.emitted_tokens :])
            )
            if req.finish_reason is not None:
                self.scheduler.finish(req.seq)
                del self.requests[req.request_id]
        return outputs

    def _run(
        self, scheduled: list[ScheduledSeq]
    ) -> tuple[list[ScheduledSeq], torch.Tensor | None, list[tuple[ScheduledSeq, str]]]:
        """The forward pass over `scheduled`: (the sequences that ran, their logits [S, V] in that
        order, the sequences that ran out of memory even alone with why). Out of memory, the
        sequences run again in halves (one process only; distributed, it is raised)."""
        try:
            return scheduled, self._forward(scheduled), []
        except Exception as e:
            if self.comm is not None or not is_out_of_memory(e):
                raise
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # out of the except block: the failed pass's frames (and their tensors) are freed by now
        self._release_cached_memory()
        if len(scheduled) == 1 and scheduled[0].num_new_tokens > 1:  # a prefill chunk: a shorter one
            s = scheduled[0]
            log.warning(
                "request %s: out of memory in a chunk of %d tokens: trying half", s.seq.request_id, s.num_new_tokens
            )
            return self._run([ScheduledSeq(s.seq, s.num_new_tokens // 2)])
        if len(scheduled) == 1:
            s = scheduled[0]
            ctx = s.seq.num_computed_tokens + s.num_new_tokens
            log.warning(
                "request %s: out of memory alone (one token, context %d): failing it", s.seq.request_id, ctx
            )
            reason = (
                f"out of memory: one token of this request alone, over a context of {ctx} tokens, did not "
                f"fit in the device's memory ({error})"
            )
            return [], None, [(s, reason)]
        half = len(scheduled) // 2
        log.warning("out of memory in a step of %d sequences: running them again in halves", len(scheduled))
        ran_a, logits_a, failed_a = self._run(scheduled[:half])
        ran_b, logits_b, failed_b = self._run(scheduled[half:])
        parts = [t for t in (logits_a, logits_b) if t is not None]
        logits = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
        return ran_a + ran_b, logits, failed_a + failed_b

    def _forward(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """The logits [S, V] that pick each scheduled sequence's next token. The prompt positions
        whose logprobs a request asked for get logits too, in the same pass (rank 0's lm_head only:
        the other ranks are sent the plain plan, and their logits are not used anyway)."""
        tokens, batch = self._prepare(scheduled)
        if self.comm is not None:
            self.comm.send_step(tokens, batch)
        wanted = self._prompt_positions(scheduled)
        if wanted:
            extra = torch.tensor([i for _, _, rows in wanted for i in rows], dtype=torch.long, device=self.device)
            batch = replace(batch, logits_indices=torch.cat([batch.logits_indices, extra]))
        with torch.inference_mode():
            logits = self.model.forward_paged(tokens, batch, self.kv_cache)  # [S (+ M), V]
            if not wanted:
                return logits
            S = len(scheduled)
            at = S
            for req, targets, rows in wanted:
                entries = prompt_logprobs(logits[at : at + len(rows)], targets, req.params.prompt_logprobs)
                req.prompt_logprobs.extend(entries)
                at += len(rows)
            return logits[:S]

    def _prompt_positions(self, scheduled: list[ScheduledSeq]) -> list[tuple[_Request, list[int], list[int]]]:
        """For each request that wants prompt logprobs and computes prompt positions in this step not
        yet recorded: (the request, the prompt tokens those positions predict, their indices among
        the step's new tokens). Positions recorded before a preemption are not taken again."""
        wanted = []
        offset = 0
        for s in scheduled:
            req = self.requests[s.seq.request_id]
            start, n = s.seq.num_computed_tokens, s.num_new_tokens
            if req.prompt_logprobs is not None:
                # the logits at position p predict prompt token p + 1; p = P - 1 predicts the first output
                done = len(req.prompt_logprobs) - 1
                lo, hi = max(start, done), min(start + n, s.seq.num_prompt_tokens - 1)
                if lo == done and lo < hi:
                    rows = list(range(offset + lo - start, offset + hi - start))
                    wanted.append((req, s.seq.token_ids[lo + 1 : hi + 1], rows))
            offset += n
        return wanted

    def _release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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

    def _start_grammar_masks(self, scheduled: list[ScheduledSeq]) -> tuple[list[_Request], Future] | None:
        """Start computing, in the mask thread (llguidance releases the GIL), the next-token masks
        of the structured-output requests that may sample in this step, so that they are ready
        when the forward pass is; None when there are none (requests without a grammar pay nothing)."""
        reqs = [
            r
            for s in scheduled
            if s.num_new_tokens == s.seq.num_uncomputed_tokens
            and (r := self.requests[s.seq.request_id]).matcher is not None
        ]
        if not reqs:
            return None
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return reqs, self._mask_thread.submit(self.grammars.bitmasks, [r.matcher for r in reqs])

    def _grammar_masks(self, started: tuple[list[_Request], Future] | None) -> dict[_Request, torch.Tensor]:
        """Each structured-output request's allowed tokens ([V] bool, on the device), once computed."""
        if started is None:
            return {}
        reqs, future = started
        masks = allowed_tokens(future.result(), self.vocab_size, self.device)  # [G, V]
        return {r: masks[j] for j, r in enumerate(reqs)}

    def _append_token(self, req: _Request, token: int, logprob: dict | None) -> str | None:
        """Add a sampled token to its request and decide whether the request has finished; why the
        request cannot go on, if its grammar refuses the token (which the mask should prevent)."""
        seq, params = req.seq, req.params
        seq.token_ids.append(token)
        if logprob is not None:
            req.pending_logprobs.append(logprob)
        if req.matcher is not None and not req.matcher.consume_token(token):
            return f"structured output: the grammar refused token {token}: {req.matcher.get_error()}"
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            req.finish_reason = "stop"  # the stop token counts as generated, its text is not shown
        elif req.detok.add(token) is not None:
            req.finish_reason = "stop"
        elif req.matcher is not None and req.matcher.is_stopped():
            req.finish_reason = "stop"  # the grammar is complete and allows nothing more
        elif seq.num_output_tokens >= seq.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None and req.detok.flush() is not None:
            req.finish_reason = "stop"
        return None

    def _output(self, req: _Request, new_token_ids: list[int]) -> RequestOutput:
        finished = req.finish_reason is not None
        seq = req.seq
        req.emitted_tokens += len(new_token_ids)
        logprobs = None
        if req.params.logprobs is not None:
            logprobs, req.pending_logprobs = req.pending_logprobs, []
        prompt_entries = None
        if (
            req.prompt_logprobs is not None
            and not req.prompt_logprobs_sent
            and len(req.prompt_logprobs) == seq.num_prompt_tokens
        ):
            prompt_entries, req.prompt_logprobs_sent = req.prompt_logprobs, True
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
            prompt_logprobs=prompt_entries,
        )
