"""Continuous batching: which sequences run in the next step, and how many new tokens each.

Every step is planned afresh under a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`):

1. running sequences that decode (one new token each), oldest first;
2. running sequences still in prefill, a chunk each within what is left of the budget;
3. waiting sequences, by priority (lower first; vLLM's request `priority`), then first come first
   served, a prefill chunk each, while blocks and budget last.

Prefix caching (engine/block_manager.py): a sequence admitted from the queue first takes the
longest run of cached full blocks that starts its tokens, at most all but its last token (whose
logits pick the next token, so it is always computed), and its prefill starts after them; only
the new tokens count against the step's budget. `prefix_cache_queries` and `prefix_cache_hits`
count, in tokens, what admitted sequences asked for and found (vLLM's counters); a sequence with
`skip_prefix_cache` (whose every prompt position must be computed, e.g. for prompt logprobs) takes
no cached blocks and is not counted, but its blocks are cached for others. Each running
sequence's full blocks are registered in the cache once computed (at the next step's planning,
and before its blocks are released when it finishes or is preempted).

When the KV pool cannot hold the next token of a running sequence, the lowest-priority running
sequence (of those, the youngest) is preempted by recompute: its blocks are freed and it goes back
to the front of its priority in the queue with its prompt and the tokens generated so far, which
are prefilled again when it resumes (with prefix caching, from its own full blocks where they
have not been evicted meanwhile). With every priority equal (the default, 0) this is plain
first come first served with the youngest preempted. Sampling
never redraws a generated token, so a resumed sequence continues exactly as it would have.

Step memory: with `step_bytes` (one layer's attention memory for a step of S sequences, the most
new tokens of one Q and the longest context L: engine/memory.StepMemory) and `max_step_bytes`, a
step stays within the budget. Sequences are added in the order above while the step fits; a
prefill chunk is shortened until it fits; the first sequence that does not fit ends the step (it
and those after it wait for the next one). A sequence whose context alone is longer than
`max_context_tokens` (what one sequence with one new token fits in the budget) can never run: it is
taken out and reported in `SchedulerOutput.rejected`, and the others go on.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from model_runtime.engine.block_manager import BlockManager, hash_blocks
from model_runtime.engine.config import format_bytes


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and its place in the KV cache."""

    request_id: str
    token_ids: list[int]  # prompt then generated tokens
    num_prompt_tokens: int
    max_tokens: int  # after clamping to the model length
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    priority: int = 0  # lower runs first
    arrival: int = 0  # admission order (set by the scheduler)
    skip_prefix_cache: bool = False  # compute every token: take no cached blocks (still caches its own)
    block_hashes: list[bytes] = field(default_factory=list)  # of token_ids' full blocks (prefix caching)
    num_cached_blocks: int = 0  # leading blocks of block_table that are in the prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so its logits pick the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    rejected: list[tuple[Sequence, str]] = field(default_factory=list)  # finished: too long to ever run

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        step_bytes: Callable[[int, int, int], int] | None = None,
        max_step_bytes: int | None = None,
        max_context_tokens: int | None = None,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_bytes = step_bytes if max_step_bytes is not None else None
        self.max_step_bytes = max_step_bytes
        self.max_context_tokens = max_context_tokens  # None: no limit besides the model's
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission: the last one is the youngest
        self._arrivals = 0
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found there (not computed again)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._arrivals += 1
        seq.arrival = self._arrivals
        # behind every waiting sequence of the same or a higher priority (lower number)
        index = next((i for i, w in enumerate(self.waiting) if w.priority > seq.priority), len(self.waiting))
        self.waiting.insert(index, seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence (done or aborted) wherever it is and free its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self._cache_computed(seq)
        self.blocks.release(seq.block_table)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        rejected: list[tuple[Sequence, str]] = []
        shape = _Shape()
        for seq in self.running:
            self._cache_computed(seq)
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]

        full = False  # the step's memory budget is reached: no one else this step
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted below to make room for an older one
                continue
            if (reason := self._too_long(seq)) is not None:
                self.finish(seq)
                rejected.append((seq, reason))
                continue
            n = self._fit(shape, seq, min(seq.num_uncomputed_tokens, budget))
            if n == 0:
                full = True
                break
            while not self.blocks.grow(seq.block_table, seq.num_computed_tokens + n):
                victim = max(reversed(self.running), key=lambda s: s.priority)  # lowest priority, youngest
                self._preempt(victim)
                preempted.append(victim)
                if any(s.seq is victim for s in scheduled):
                    scheduled = [s for s in scheduled if s.seq is not victim]
                    shape = _Shape.of(scheduled)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                scheduled.append(ScheduledSeq(seq, n))
                shape.add(seq, n)
                budget -= n
        budget = self.max_num_batched_tokens - sum(s.num_new_tokens for s in scheduled)

        # after a preemption the pool is tight: admit no one new until it eases
        while (
            not preempted
            and not full
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            if (reason := self._too_long(seq)) is not None:
                self.finish(seq)
                rejected.append((seq, reason))
                continue
            cached = self._cached_prefix(seq)
            seq.num_computed_tokens = len(cached) * self.blocks.block_size
            n = self._fit(shape, seq, min(seq.num_uncomputed_tokens, budget))
            if n == 0 or not self.blocks.grow(seq.block_table, seq.num_computed_tokens + n, cached=cached):
                # the step is full, or the pool: the head of the queue goes first next time (first
                # come first served: no one overtakes it)
                seq.num_computed_tokens = 0
                break
            seq.num_cached_blocks = len(cached)
            if self.blocks.enable_prefix_caching and not seq.skip_prefix_cache:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            shape.add(seq, n)
            budget -= n
        return SchedulerOutput(scheduled, preempted, rejected)

    def _too_long(self, seq: Sequence) -> str | None:
        """Why `seq` can never run within the step memory budget, or None."""
        limit = self.max_context_tokens
        if limit is None or seq.num_tokens <= limit:
            return None
        need = self.step_bytes(1, 1, seq.num_tokens) if self.step_bytes is not None else 0
        return (
            f"the request has {seq.num_tokens} tokens, but attending to that context alone takes "
            f"{format_bytes(need)} per layer, more than the step attention budget of "
            f"{format_bytes(self.max_step_bytes or 0)} (--max-step-attention-memory): one sequence "
            f"fits at most {limit} tokens of context"
        )

    def _fit(self, shape: _Shape, seq: Sequence, n: int) -> int:
        """The most of `seq`'s next `n` tokens this step can take within the memory budget (0: none)."""
        if self.step_bytes is None:
            return n

        def fits(k: int) -> bool:
            return self.step_bytes(*shape.with_seq(seq, k)) <= self.max_step_bytes

        if fits(n):
            return n
        if n == 1 or not fits(1):
            return 0
        lo, hi = 1, n  # fits(lo), not fits(hi): shorten the prefill chunk
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a sequence leaving the queue can start from: the longest cached prefix
        of its tokens, short of its last token."""
        if not self.blocks.enable_prefix_caching or seq.skip_prefix_cache:
            return []
        hash_blocks(seq.token_ids, self.blocks.block_size, seq.block_hashes)
        return self.blocks.cached_prefix(seq.block_hashes, (seq.num_tokens - 1) // self.blocks.block_size)

    def _cache_computed(self, seq: Sequence) -> None:
        """Register `seq`'s full blocks computed since the last time in the prefix cache."""
        if not self.blocks.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.blocks.block_size, len(seq.block_table))
        if full > seq.num_cached_blocks:
            hash_blocks(seq.token_ids, self.blocks.block_size, seq.block_hashes)
            self.blocks.cache_full_blocks(seq.block_table, seq.block_hashes, seq.num_cached_blocks, full)
            seq.num_cached_blocks = full

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._cache_computed(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        # at the front of its priority: ahead of everyone waiting with the same or a lower priority
        index = next((i for i, w in enumerate(self.waiting) if w.priority >= seq.priority), len(self.waiting))
        self.waiting.insert(index, seq)


@dataclass
class _Shape:
    """A step's shape for its attention memory: sequences, most new tokens, longest context."""

    num_seqs: int = 0
    max_new: int = 0
    max_context: int = 0

    @classmethod
    def of(cls, scheduled: list[ScheduledSeq]) -> _Shape:
        shape = cls()
        for s in scheduled:
            shape.add(s.seq, s.num_new_tokens)
        return shape

    def with_seq(self, seq: Sequence, n: int) -> tuple[int, int, int]:
        return self.num_seqs + 1, max(self.max_new, n), max(self.max_context, seq.num_computed_tokens + n)

    def add(self, seq: Sequence, n: int) -> None:
        self.num_seqs, self.max_new, self.max_context = self.with_seq(seq, n)
