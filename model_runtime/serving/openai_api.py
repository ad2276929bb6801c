"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

Shapes follow OpenAI's API reference: `usage` in every answer (for streams, on the chunk that
carries `finish_reason`, and also in a trailing choice-less chunk when
`stream_options.include_usage` asks for it), streams end with `data: [DONE]`, errors come as
`{"error": {"message", "type", "param", "code"}}`. `n` choices per prompt; a completions request's
batch of prompts answers prompt p's i-th choice as choice p x n + i, each choice its own
request. vLLM's extensions `top_k`, `ignore_eos` and `stop_token_ids` are accepted. Structured
output and tool calls: serving/openai_structured.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_runtime.engine.requests import MAX_LOGPROBS
from model_runtime.serving.openai_structured import (
    GuidedFields,
    NamedToolChoice,
    Tool,
    ToolCall,
    forced_tool_calls,
    structured_output_of,
    template_message,
    tool_call,
    tool_calls_of,
)
from model_runtime.serving.service import InferenceService, InvalidRequest, ServiceError, first_and_rest
from model_runtime.serving.sse import DONE, event_stream, sse

MAX_N = 16  # choices one request may ask for
MAX_CHOICES = 256  # prompts x n in one completions request (a batch of prompts)
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


class ClientDisconnected(ServiceError):
    """The client went away before its answer: its requests were aborted (counted as cancelled
    where they ran; nobody reads this answer)."""

    http_status, grpc_code, failure_reason, openai_type = 499, "CANCELLED", None, "client_closed_request"


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI (and vLLM) request fields this server does not implement: a request that sets one to
# anything but its no-op value is refused with 400 naming it, never served as if it were not there.
# docs/openai.md keeps the table of what is supported and what is refused.
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),  # completions (chat takes tools)
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "min_tokens": (None, 0),
    "length_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False),
    "logits_processors": (None, []),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
# Fields that change nothing a server computes (who asked, for their own bookkeeping): accepted.
NO_EFFECT = ("user", "metadata", "store", "service_tier")


class _SamplingFields(GuidedFields):
    # Unknown fields are refused (400 naming them): a field accepted and ignored would serve the
    # client something it did not ask for.
    model_config = ConfigDict(extra="allow", ser_json_inf_nan="null", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate (without stream)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="vLLM's: 1 = off")
    min_p: float = Field(0.0, ge=0, le=1)
    logit_bias: dict[str, float] | None = None
    priority: int = Field(0, ge=-(2**31), lt=2**31, description="vLLM's: lower runs first")
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                        description="vLLM's: top-n logprobs of every prompt token (not streamed)")
    user: str | None = None

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self):
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs: not available with stream: true (as vLLM)")
        return self

    @model_validator(mode="after")
    def _refuse_what_is_not_implemented(self):
        for name, value in (self.model_extra or {}).items():
            if name in NO_EFFECT:
                continue
            if name not in NOT_IMPLEMENTED:
                raise ValueError(f"{name}: unknown field (see docs/openai.md for the fields this server takes)")
            if value not in NOT_IMPLEMENTED[name]:
                raise ValueError(f"{name}: not supported by this server (only {_no_op(name)}); "
                                 "leave it out or see docs/openai.md")
        return self


def _no_op(name: str) -> str:
    values = [v for v in NOT_IMPLEMENTED[name] if v is not None]
    return "unset" + "".join(f" or {json.dumps(v)}" for v in values)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, description="0: only with echo (the prompt and its logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _max_tokens_0_echoes(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing; it is allowed only with echo: true")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool's answer: the call it answers


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # with "required": false allows one call only




async def until_disconnected(request: Request, work):
    """Await `work` (a coroutine) unless the client goes away first: then cancel it, which aborts
    its requests in the engine at once (their blocks are freed; counted as cancelled)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientDisconnected("the client disconnected: its request was aborted")
    finally:
        if not task.done():
            task.cancel()


def params_of_choice(params, i: int):
    """The i-th of n choices: seed + i when the request is seeded (each reproducible), else its own noise."""
    return params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)


def choices_of(prompts: list, params, n: int) -> list[tuple[Any, Any]]:
    """(prompt, params) of each choice: prompt p's i-th choice is choice p x n + i (OpenAI's order)."""
    return [(prompt, params_of_choice(params, i)) for prompt in prompts for i in range(n)]


async def complete_n(service: InferenceService, prompt, params, n: int) -> list:
    """`n` completions of one prompt (choice i with `params_of_choice`)."""
    return await complete_all(service, choices_of([prompt], params, n))


async def complete_all(service: InferenceService, jobs: list[tuple[Any, Any]]) -> list:
    """The final output of each (prompt, params), run together; one that fails aborts the others."""
    if len(jobs) == 1:
        return [await service.complete(*jobs[0])]
    tasks = [asyncio.ensure_future(service.complete(prompt, params)) for prompt, params in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # done ones ignore it
            task.cancel()


async def stream_n(service: InferenceService, prompt, params, n: int):
    """The outputs of `n` streamed choices of one prompt: `stream_all`."""
    return await stream_all(service, choices_of([prompt], params, n))


async def stream_all(service: InferenceService, jobs: list[tuple[Any, Any]]):
    """The outputs of streamed choices, one per (prompt, params), as (choice index, output) in the
    order they come; each choice's first output is awaited first (a request that cannot run fails
    before any header). Closing it aborts every choice still running."""
    streams = []
    try:
        for prompt, params in jobs:
            streams.append(await first_and_rest(service.generate(prompt, params)))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise

    async def merged():
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i, stream):
            try:
                async for output in stream:
                    await queue.put((i, output))
            except BaseException as error:   # noqa: BLE001 (handed to the reader)
                await queue.put((i, error))
            finally:
                await queue.put((i, done))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            left = len(tasks)
            while left:
                i, item = await queue.get()
                if item is done:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                await stream.aclose()

    return merged()


def usage_of(finals: list) -> dict[str, int]:
    """One prompt's tokens (counted once, as vLLM and OpenAI count them) and every choice's."""
    return usage(len(finals[0].prompt_token_ids), sum(len(f.token_ids) for f in finals))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def prompts_of(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completion request: one (a string, or token ids) or a batch (a list of
    either)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt: empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def sampling_kwargs(
    req: _SamplingFields, max_tokens: int | None, logprobs: int | None, max_model_len: int
) -> dict:
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens if max_tokens is not None else max_model_len,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k or 0,
        "seed": req.seed,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
        "prompt_logprobs": req.prompt_logprobs,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "min_p": req.min_p,
        "logit_bias": dict(req.logit_bias) if req.logit_bias else None,
        "priority": req.priority,
        "structured": structured_output_of(req),
    }
    return kwargs


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def chat_prompt(
    tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True, tools: list[Tool] | None = None
) -> str:
    """The prompt text of a chat, rendered with the model's template (what /chat/completions serves
    and /tokenize counts), with the request's tools where given; InvalidRequest when the template
    rejects the conversation."""
    template = tokenizer.chat_template
    plain = [template_message(m.role, message_text(m), m.tool_calls, m.tool_call_id, template) for m in messages]
    extra = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as e:  # a template may reject a conversation (roles out of order, ...)
        raise InvalidRequest(f"the chat template rejected the messages: {e}") from None


def chat_answer(final, function: str | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice and its finish reason. `function`: the tool
    call its output was held to (a name, "" for any of the tools; None: none): a whole call is
    returned as `tool_calls` with reason "tool_calls"; one cut short (max_tokens) as text."""
    calls = tool_calls_of(final.text, function) if function is not None and final.finish_reason == "stop" else None
    if calls is None:
        return {"role": "assistant", "content": final.text}, final.finish_reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def completion_logprobs(tokenizer, entries: list[dict], text_offset: int = 0) -> tuple[dict[str, Any], int]:
    """Legacy completions' logprobs: parallel lists of tokens, their logprobs (null for an echoed
    prompt's first token), top-n maps and text offsets (each token's start in the text of the
    tokens before it, from `text_offset`); and the offset after the last token."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for entry in entries:
        token = _token_text(tokenizer, entry["token_id"])
        tokens.append(token)
        token_logprobs.append(entry["logprob"])
        top = entry.get("top")
        top_logprobs.append(None if top is None else {_token_text(tokenizer, t): lp for t, lp in top.items()})
        offsets.append(text_offset)
        text_offset += len(token)
    logprobs = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}
    return logprobs, text_offset


def echoed_prompt_entries(output, k: int) -> list[dict]:
    """An echoed prompt's tokens as logprob entries (the first with none), with the top k of each."""
    ids, entries = output.prompt_token_ids, output.prompt_logprobs or []
    first = {"token_id": ids[0], "logprob": None, "top": None}
    return [first] + [{**e, "top": dict(list(e["top"].items())[:k])} for e in entries[1:]]


def vllm_prompt_logprobs(tokenizer, entries: list[dict | None] | None) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, else {token id: {"logprob",
    "rank", "decoded_token"}} for the prompt token and the top n."""
    if entries is None:
        return None
    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranked = {t: (lp, r) for r, (t, lp) in enumerate(e["top"].items(), start=1)}
        ranked[e["token_id"]] = (e["logprob"], e["rank"])
        out.append({str(t): {"logprob": lp, "rank": r, "decoded_token": _token_text(tokenizer, t)}
                    for t, (lp, r) in ranked.items()})
    return out


def chat_logprobs(tokenizer, entries: list[dict]) -> dict[str, Any]:
    """Chat logprobs: one entry per token with its top alternatives."""
    content = []
    for entry in entries:
        token = _token_text(tokenizer, entry["token_id"])
        content.append(
            {
                "token": token,
                "logprob": entry["logprob"],
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (t := _token_text(tokenizer, tid)),
                        "logprob": lp,
                        "bytes": list(t.encode("utf-8")),
                    }
                    for tid, lp in (entry.get("top") or {}).items()
                ],
            }
        )
    return {"content": content}


def _envelope(request_id: str, created: int, model_name: str):
    """The fields every answer and stream chunk of one request carries; `usage` with the final output."""

    def body(kind: str, choices: list[dict], final=None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": request_id,
            "object": kind,
            "created": created,
            "model": model_name,
            "choices": choices,
        }
        if final is not None:
            out["usage"] = usage(len(final.prompt_token_ids), len(final.token_ids))
        return out

    return body


def _chunk_template(request_id: str, kind: str, created: int, model_name: str, before: str, after: str,
                    index: int = 0):
    """An SSE event builder for the per-token chunk of a stream, which differs only in its text."""
    head = (
        f'data: {{"id": {json.dumps(request_id)}, "object": "{kind}", "created": {created}, '
        f'"model": {json.dumps(model_name)}, "choices": [{{"index": {index}, {before}'
    ).encode()
    tail = f'{after}, "logprobs": null, "finish_reason": null}}]}}\n\n'.encode()

    def build(text: str) -> bytes:
        return head + json.dumps(text, ensure_ascii=False).encode("utf-8", "replace") + tail

    return build


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None      # default: True for a prompt, False for messages
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


def create_tokenizer_router(service: InferenceService) -> APIRouter:
    """`/tokenize` and `/detokenize` with vLLM's request and response shapes (at the root, as vLLM)."""
    router = APIRouter(tags=["openai"])

    @router.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.model is not None:
            service.check_model(req.model)
        service.admit()
        tokenizer = service.tokenizer
        if req.messages is not None:
            text = chat_prompt(tokenizer, req.messages, req.add_generation_prompt)
            special = bool(req.add_special_tokens)
        else:
            text, special = req.prompt, req.add_special_tokens is not False
        tokens = tokenizer.encode(text, add_special_tokens=special)
        return {"count": len(tokens), "max_model_len": service.max_model_len, "tokens": tokens,
                "token_strs": [_token_text(tokenizer, t) for t in tokens] if req.return_token_strs else None}

    @router.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if req.model is not None:
            service.check_model(req.model)
        service.admit()
        vocab = service.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"tokens {bad[:8]} are outside the vocabulary (0..{vocab - 1})")
        return {"prompt": service.tokenizer.decode(req.tokens)}

    return router


def create_openai_router(service: InferenceService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])
    model_name = service.model_name

    @router.get("/models")
    async def list_models():
        model = {"id": model_name, "object": "model", "created": 0, "owned_by": "moe-runtime"}
        if service.config.revision:
            model["revision"] = service.config.revision  # the ModelDeployment revision serving it
        if service.engine is not None:
            model["max_model_len"] = service.max_model_len
        return {"object": "list", "data": [model]}

    async def stream_events(outputs, make_chunk, stream_options: StreamOptions | None, usage_chunk):
        """SSE events for a stream of engine outputs; `make_chunk(output)` builds each chunk."""
        include_usage = bool(stream_options and stream_options.include_usage)
        final = None
        try:
            async for output in outputs:
                chunk = make_chunk(output)
                if chunk is not None:
                    yield chunk if isinstance(chunk, bytes) else sse(chunk)
                final = output
            if include_usage and final is not None:
                yield sse(usage_chunk(final))
        except ServiceError as e:
            yield sse(
                {"error": {"message": e.message, "type": e.openai_type, "param": None, "code": e.http_status}}
            )
        yield DONE

    def streamed_choices(merged, n: int, chunker, kind: str, answer, stream_options, count=usage_of):
        """The SSE stream of n choices: each chunk names its choice; the usage chunk (when asked for)
        counts the prompt once and every choice's tokens (`count` of the finals, in choice order)."""
        chunkers = [chunker(i) for i in range(n)]
        finals: dict[int, Any] = {}

        def chunk(item):
            i, output = item
            if output.finished:
                finals[i] = output
            return chunkers[i](output)

        def usage_chunk(_last):
            return {**answer(kind, []), "usage": count([finals[i] for i in sorted(finals)])}

        return event_stream(stream_events(merged, chunk, stream_options, usage_chunk))

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        service.check_model(req.model)
        service.admit()
        prompts = prompts_of(req.prompt)
        n = req.n
        if len(prompts) * n > MAX_CHOICES:
            raise InvalidRequest(f"prompt: {len(prompts)} prompts x n {n} choices: at most {MAX_CHOICES} in all")
        # max_tokens 0 with echo (lm-eval's log-likelihoods): one token is generated and dropped, as vLLM
        echo_only = req.echo and req.max_tokens == 0
        kwargs = sampling_kwargs(req, 1 if echo_only else req.max_tokens, req.logprobs, service.max_model_len)
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too
            kwargs["prompt_logprobs"] = max(req.logprobs, req.prompt_logprobs or 0)
        params = service.sampling_params(**kwargs)
        tokenizer = service.tokenizer
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        answer = _envelope(request_id, created, model_name)
        echo_texts = [(p if isinstance(p, str) else tokenizer.decode(p)) if req.echo else "" for p in prompts]
        jobs = choices_of(prompts, params, n)

        def count(finals: list) -> dict[str, int]:
            """Each prompt's tokens once (its choices are n consecutive finals), every choice's output."""
            prompt_tokens = sum(len(f.prompt_token_ids) for f in finals[::n])
            return usage(prompt_tokens, 0 if echo_only else sum(len(f.token_ids) for f in finals))

        def choice_parts(output, text: str, first: bool, echo_text: str) -> tuple[str, list[dict]]:
            """The text and logprob entries an output (its `text`) adds to its choice: the echoed
            prompt (and its tokens' logprobs) before the first output's, none of a dropped token."""
            text = "" if echo_only else text
            entries = [] if echo_only else list(output.logprobs or [])
            if first and req.echo:
                text = echo_text + text
                if req.logprobs is not None:
                    entries = echoed_prompt_entries(output, req.logprobs) + entries
            return text, entries

        if not req.stream:
            finals = await until_disconnected(request, complete_all(service, jobs))
            choices = []
            for i, final in enumerate(finals):
                text, entries = choice_parts(final, final.text, True, echo_texts[i // n])
                choice = {
                    "index": i,
                    "text": text,
                    "logprobs": completion_logprobs(tokenizer, entries)[0] if req.logprobs is not None else None,
                    "finish_reason": "length" if echo_only else final.finish_reason,
                }
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = vllm_prompt_logprobs(tokenizer, final.prompt_logprobs)
                choices.append(choice)
            return JSONResponse({**answer("text_completion", choices), "usage": count(finals)})

        def chunker(index: int):
            state = {"first": True, "offset": 0}
            text_chunk = _chunk_template(request_id, "text_completion", created, model_name, '"text": ', "", index)

            def chunk(output) -> dict | bytes | None:
                text, entries = choice_parts(output, output.new_text, state["first"], echo_texts[index // n])
                state["first"] = False
                if not text and not output.finished and not entries:
                    return None
                if not output.finished and req.logprobs is None:  # the common case, per token: one dumps
                    return text_chunk(text)
                logprobs = None
                if req.logprobs is not None:
                    logprobs, state["offset"] = completion_logprobs(tokenizer, entries, state["offset"])
                choice = {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": ("length" if echo_only else output.finish_reason) if output.finished else None,
                }
                body = answer("text_completion", [choice])
                if output.finished and len(jobs) == 1:
                    body["usage"] = count([output])
                return body

            return chunk

        if len(jobs) == 1:
            outputs = await first_and_rest(service.generate(*jobs[0]))
            return event_stream(
                stream_events(
                    outputs, chunker(0), req.stream_options,
                    lambda final: {**answer("text_completion", []), "usage": count([final])},
                )
            )
        return streamed_choices(await stream_all(service, jobs), len(jobs), chunker, "text_completion",
                                answer, req.stream_options, count)

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        service.check_model(req.model)
        service.admit()
        tokenizer = service.tokenizer
        prompt = chat_prompt(tokenizer, req.messages, tools=req.tools)
        logprobs_n = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        kwargs = sampling_kwargs(req, max_tokens, logprobs_n, service.max_model_len)
        call_schema, function = forced_tool_calls(req.tools, req.tool_choice, req.parallel_tool_calls)
        if call_schema is not None:
            if kwargs["structured"] is not None:
                raise InvalidRequest(f"tool_choice and {kwargs['structured'].field}: a request can ask for one "
                                     "structured output only")
            kwargs["structured"] = call_schema
        params = service.sampling_params(**kwargs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        answer = _envelope(request_id, created, model_name)

        if not req.stream:
            finals = await until_disconnected(request, complete_n(service, prompt, params, req.n))
            choices = []
            for i, final in enumerate(finals):
                message, finish_reason = chat_answer(final, function)
                choices.append({
                    "index": i,
                    "message": message,
                    "logprobs": chat_logprobs(tokenizer, final.logprobs or []) if req.logprobs else None,
                    "finish_reason": finish_reason,
                })
            body = {**answer("chat.completion", choices), "usage": usage_of(finals)}
            if req.prompt_logprobs is not None:  # vLLM's: of the one prompt, beside the choices
                body["prompt_logprobs"] = vllm_prompt_logprobs(tokenizer, finals[0].prompt_logprobs)
            return JSONResponse(body)

        def tool_chunker(index: int):
            """Chunks of a choice held to a tool call: a named function's arguments as they come
            (in `tool_calls` deltas), "required"'s calls once the list is whole."""
            state: dict[str, Any] = {"first": True, "text": ""}

            def chunk(output) -> dict | None:
                delta: dict[str, Any] = {"role": "assistant"} if state["first"] else {}
                state["text"] += output.new_text
                finish_reason = output.finish_reason
                if function:
                    if state["first"]:
                        delta["tool_calls"] = [{"index": 0, **tool_call(function, output.new_text)}]
                    elif output.new_text:
                        delta["tool_calls"] = [{"index": 0, "function": {"arguments": output.new_text}}]
                    if finish_reason == "stop":
                        finish_reason = "tool_calls"
                elif output.finished:
                    message, finish_reason = chat_answer(output, function)
                    if "tool_calls" in message:
                        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
                    else:
                        delta["content"] = state["text"]
                state["first"] = False
                if not delta and not output.finished and not output.logprobs:
                    return None
                choice = {
                    "index": index,
                    "delta": delta,
                    "logprobs": chat_logprobs(tokenizer, output.logprobs or []) if req.logprobs else None,
                    "finish_reason": finish_reason if output.finished else None,
                }
                return answer("chat.completion.chunk", [choice], output if output.finished and req.n == 1 else None)

            return chunk

        def chunker(index: int):
            if function is not None:
                return tool_chunker(index)
            state = {"first": True}
            content_chunk = _chunk_template(
                request_id, "chat.completion.chunk", created, model_name, '"delta": {"content": ', "}", index
            )

            def chunk(output) -> dict | bytes | None:
                if not state["first"] and not output.finished and not req.logprobs:
                    return content_chunk(output.new_text) if output.new_text else None
                delta: dict[str, Any] = {}
                if state["first"]:
                    delta["role"] = "assistant"
                    state["first"] = False
                if output.new_text or (delta and not output.finished):
                    delta["content"] = output.new_text
                if not delta and not output.finished and not output.logprobs:
                    return None
                choice = {
                    "index": index,
                    "delta": delta,
                    "logprobs": chat_logprobs(tokenizer, output.logprobs or []) if req.logprobs else None,
                    "finish_reason": output.finish_reason if output.finished else None,
                }
                return answer("chat.completion.chunk", [choice], output if output.finished and req.n == 1 else None)

            return chunk

        if req.n == 1:
            outputs = await first_and_rest(service.generate(prompt, params))
            return event_stream(
                stream_events(
                    outputs, chunker(0), req.stream_options, lambda final: answer("chat.completion.chunk", [], final)
                )
            )
        return streamed_choices(await stream_n(service, prompt, params, req.n), req.n, chunker,
                                "chat.completion.chunk", answer, req.stream_options)

    return router
