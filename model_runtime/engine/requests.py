"""A request as the engine sees it, on either side of the engine process's pipe: its sampling
parameters, the checks against the engine's limits, its outputs, the engine's stats and errors.

No torch here: the server process (decision 15) holds all of these without loading a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from model_runtime.engine.config import format_bytes
from model_runtime.engine.structured import Grammars, StructuredOutput

MAX_LOGPROBS = 20  # top logprobs a request may ask for per token
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI allows 300)


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) => off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the chosen token)
    # top-n logprobs per prompt token (vLLM's prompt_logprobs; 0 = only the prompt token's own): the
    # prefill computes the logits of every prompt position, so it takes no prefix-cache hits
    prompt_logprobs: int | None = None
    # Penalties and biases (vLLM's and OpenAI's meanings): see engine/sampling.py `adjust_logits`.
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # prompt and generated tokens: logit / p if > 0, else logit * p
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (sampling only)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    priority: int = 0  # scheduling (vLLM's request priority): lower first; equal: first come first served
    structured: StructuredOutput | None = None  # the output must match it (engine/structured.py)
    # Compute every prompt token: take no KV blocks from the prefix cache (vLLM's name; what a
    # request for prompt logprobs needs, since cached positions are not computed again).
    skip_reading_prefix_cache: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI accepts a single string
            self.stop = [self.stop]
        if isinstance(self.logit_bias, dict):  # JSON object keys are strings
            try:
                self.logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias keys must be token ids, got {list(self.logit_bias)!r}") from None

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, max_model_len: int) -> None:
        """Raise ValueError naming the first invalid field and the accepted range."""

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_tokens > max_model_len:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) exceeds the model length ({max_model_len} tokens)"
            )
        if not is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(is_int(t) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if self.logprobs is not None and (
            not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            not is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not is_num(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10] (1 = off), got {self.repetition_penalty!r}")
        if not is_int(self.priority) or not -(2**31) <= self.priority < 2**31:
            raise ValueError(f"priority must be a 32-bit integer (lower runs first), got {self.priority!r}")
        if not isinstance(self.skip_reading_prefix_cache, bool):
            raise ValueError(
                f"skip_reading_prefix_cache must be a boolean, got {self.skip_reading_prefix_cache!r}"
            )
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids")
            for token, bias in self.logit_bias.items():
                if not is_int(token) or token < 0:
                    raise ValueError(f"logit_bias: {token!r} is not a token id")
                if not is_num(bias) or not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}")


class EngineError(ValueError):
    """A bad request (prompt too long, invalid parameters); the message is meant for the user."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (or the engine is shutting down): retry later."""


class EngineFailed(RuntimeError):
    """The engine failed while running a request (a step raised, or the engine process is gone)."""


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
    # With SamplingParams.prompt_logprobs, on the request's first output: one entry per prompt token,
    # None for the first (nothing precedes it), else {"token_id", "logprob", "rank", "top"} (rank: 1
    # for the most likely token given the prefix)
    prompt_logprobs: list[dict | None] | None = None


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
    weight_bytes: dict[int, int] = dataclasses.field(default_factory=dict)  # rank -> bytes (this pod's ranks)
    kv_capacity_tokens: int = 0  # tokens the KV cache holds (blocks x block size), as sized at start
    prefix_cache_queries: int = 0  # cumulative: prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # cumulative: of those, tokens found cached


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
        prompt_logprobs=later.prompt_logprobs if later.prompt_logprobs is not None else earlier.prompt_logprobs,
    )


@dataclass
class RequestValidator:
    """Checks a request against an engine's limits; the engine and a server in front of an engine
    process (which knows those limits but not the engine) share it."""

    tokenizer: object | None
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int
    max_context_tokens: int | None = None  # the step attention budget's limit on one context (None: none)
    max_step_attention_bytes: int = 0  # that budget, for the message
    grammars: Grammars | None = None  # checks structured output (None: made on first use)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or EngineError saying what is wrong with the request."""
        if not isinstance(params, SamplingParams):
            raise EngineError(f"sampling parameters must be SamplingParams, got {type(params).__name__}")
        try:
            params.validate(self.max_model_len)
        except ValueError as e:
            raise EngineError(str(e)) from None
        if params.structured is not None:
            if self.grammars is None:
                if self.tokenizer is None:
                    raise EngineError(f"{params.structured.field}: this engine has no tokenizer to hold output to it")
                self.grammars = Grammars(self.tokenizer, self.vocab_size, getattr(self.tokenizer, "eos_token_ids", ()))
            try:
                self.grammars.check(params.structured)
            except ValueError as e:
                raise EngineError(str(e)) from None
        if bad := [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]:
            raise EngineError(f"stop_token_ids {bad} are outside the vocabulary (0..{self.vocab_size - 1})")
        if bad := [t for t in params.logit_bias or () if not 0 <= t < self.vocab_size][:5]:
            raise EngineError(f"logit_bias token ids {bad} are outside the vocabulary (0..{self.vocab_size - 1})")
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
        if self.max_context_tokens is not None and len(ids) + 1 > self.max_context_tokens:
            raise EngineError(
                f"the prompt has {len(ids)} tokens, but one step's attention memory budget "
                f"({format_bytes(self.max_step_attention_bytes)}, --max-step-attention-memory) holds the "
                f"context of at most {self.max_context_tokens} tokens per sequence: shorten the prompt to "
                f"at most {self.max_context_tokens - 1} tokens"
            )
        return ids
