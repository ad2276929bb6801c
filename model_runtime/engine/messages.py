"""What a server and its engine tell each other: the engine process's start (EngineSpec), its pipe
(docs/decisions.md #15), and the commands a front hands an engine in a thread.

    server -> engine   AddRequest | AbortRequest | StopEngine
    engine -> server   EngineReady | StartFailed                      once, at start
                       StepOutputs(OutputDelta | RequestFailed, ..., QueueCounts, EngineStats | None)
                                                                      after each step

An OutputDelta carries what a step added to one request; the server keeps each stream's token
ids and text, so a message's size does not grow with the output's length. Every StepOutputs
carries the QueueCounts, so the server's queue-full check is as exact as in one process; the full
EngineStats (expert counts) ride along at most every 50 ms and always before the engine goes idle.

No torch here: the server process holds these without loading a model. They are pickled by the
pipe, so they hold plain values (and the engine's own exceptions in RequestFailed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from model_runtime.distributed.config import ParallelConfig
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.requests import (
    EngineError,
    EngineFailed,
    EngineOverloaded,
    EngineStats,
    RequestOutput,
    SamplingParams,
)

# -- starting the engine process -----------------------------------------------------------------


@dataclass
class EngineSpec:
    """What the engine process builds: the model, its placement, and the engine's settings."""

    model: str
    dtype: str  # auto (engine/build.py: auto_dtype) | float32 | bfloat16 | float16
    device: str  # auto (CUDA when there is one) | cpu | cuda | cuda:N
    config: EngineConfig  # its device is set to the one the engine process picks
    quantization: str | None = None
    num_threads: int | None = None  # torch threads (CPU), for each of this pod's ranks
    log_level: int = logging.INFO
    log_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    parallel: ParallelConfig = ParallelConfig()  # the replica's ranks (one: not distributed)
    rank: int = 0  # the global rank this process runs (0: the scheduler's)


@dataclass
class EngineReady:
    """The engine loaded its model; its limits, which the server checks requests against."""

    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int
    device: str
    dtype: str
    weight_bytes: dict[int, int]  # rank -> bytes of weights, for every rank of the replica
    max_context_tokens: int | None = None  # the step attention budget's limit on one context (None: none)
    max_step_attention_bytes: int = 0


@dataclass
class StartFailed:
    """The engine could not start (the process is gone by the time the server reads this)."""

    message: str


# -- server -> engine ----------------------------------------------------------------------------


@dataclass(slots=True)
class AddRequest:
    """A validated request: its prompt's token ids and sampling parameters."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.monotonic() in the server's process


@dataclass(slots=True)
class AbortRequest:
    request_id: str


@dataclass(slots=True)
class StopEngine:
    """Abort what is left, send the last outputs, exit (the server has drained already)."""


# -- engine -> server ----------------------------------------------------------------------------


@dataclass(slots=True)
class OutputDelta:
    """What one step added to one request (RequestOutput's new parts)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None  # set when the request finished
    logprobs: list[dict] | None
    first_token_time: float | None
    prompt_logprobs: list[dict | None] | None = None  # on the request's first output, when asked for

    @classmethod
    def of(cls, output: RequestOutput) -> OutputDelta:
        return cls(
            output.request_id,
            output.new_token_ids,
            output.new_text,
            output.finish_reason if output.finished else None,
            output.logprobs,
            output.first_token_time,
            output.prompt_logprobs,
        )


@dataclass(slots=True)
class RequestFailed:
    """A request the engine refused or lost; its stream raises `error`."""

    request_id: str
    error: EngineError | EngineOverloaded | EngineFailed


@dataclass(slots=True)
class QueueCounts:
    adds_applied: int  # AddRequests taken in since the engine started
    num_running: int
    num_waiting: int
    kv_cache_usage: float


@dataclass(slots=True)
class StepOutputs:
    outputs: list[OutputDelta | RequestFailed]
    counts: QueueCounts
    stats: EngineStats | None  # the full stats, now and then
