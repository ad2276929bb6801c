"""InferenceService: what the HTTP and gRPC front ends call, in front of one engine (which steps
in a child process, engine/process.py; `--no-engine-process`: in a thread).

It loads the model (the servers answer live-but-not-ready meanwhile), admits requests (503 while
loading or draining), wraps each generation with the request timeout and the injected faults,
records the metrics, and counts what is in flight so that SIGTERM can drain (serving/server.py).
An engine that dies makes the server not live (and 503 to requests): restart it.

Errors a client can cause are `ServiceError`s, each with its HTTP status, gRPC code and the
failure reason the metrics count it under.

A pod's ModelDeployment revision (--revision, $MOE_REVISION) is the served model's one version
(KServe metadata, `model_version` of answers) and goes out with every answer: the `x-moe-revision`
header of each HTTP response (uvicorn's default headers, so 4xx/5xx, streams and uvicorn's own
errors carry it too) and the initial metadata of each gRPC call (grpc_server.InitialMetadata).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator

from model_runtime.distributed.ranks import LocalRanks
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.messages import EngineSpec
from model_runtime.engine.process import EngineProcess
from model_runtime.engine.requests import EngineError, EngineFailed, EngineOverloaded, SamplingParams
from model_runtime.engine.worker import freeze_heap, spawn_engine
from model_runtime.models.tokenizer import load_tokenizer
from model_runtime.serving.config import LOG_FORMAT, ServerConfig
from model_runtime.serving.metrics import RuntimeMetrics

log = logging.getLogger("model_runtime.server")


def engine_cpu_threads(ranks: int = 1) -> int:
    """Torch threads for each of a pod's `ranks` engine processes on the CPU: one core is left to
    the event loop (HTTP, gRPC), else torch's spinning workers and the loop fight over cores and
    streamed throughput drops; the rest are shared by the ranks. OMP_NUM_THREADS, when set, decides."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (len(os.sched_getaffinity(0)) - 1) // ranks)


def engine_config_of(cfg: ServerConfig) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_step_attention_bytes=cfg.max_step_attention_bytes,
        memory_shared_by=cfg.parallel.ranks_per_node,  # this pod's ranks (on the CPU: one host's memory)
        max_waiting=cfg.max_waiting,
        enable_prefix_caching=cfg.enable_prefix_caching,
        device=cfg.device,
        max_model_len=cfg.max_model_len,
        seed=cfg.seed,
    )


def engine_spec(cfg: ServerConfig, engine_config: EngineConfig) -> EngineSpec:
    """What this pod's engine processes (rank 0, or every rank of a follower pod) are built from."""
    return EngineSpec(
        model=cfg.model,
        dtype=cfg.dtype,  # "auto" and the device are resolved where the model loads
        device=cfg.device,
        config=engine_config,
        quantization=cfg.quantization,
        num_threads=engine_cpu_threads(cfg.parallel.ranks_per_node),  # on the CPU
        log_level=logging.getLogger().getEffectiveLevel(),
        log_format=LOG_FORMAT,
        parallel=cfg.parallel,
        rank=cfg.parallel.global_ranks()[0],
    )


# --- errors ----------------------------------------------------------------------------------


class ServiceError(Exception):
    http_status = 500
    grpc_code = "INTERNAL"
    failure_reason: str | None = "internal"
    openai_type = "server_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.counted = False  # already counted in the failure metric


class InvalidRequest(ServiceError):
    http_status, grpc_code, failure_reason, openai_type = (
        400,
        "INVALID_ARGUMENT",
        "invalid_request",
        "invalid_request_error",
    )


class ModelNotFound(ServiceError):
    http_status, grpc_code, failure_reason, openai_type = 404, "NOT_FOUND", None, "not_found_error"


class Unavailable(ServiceError):
    http_status, grpc_code, failure_reason, openai_type = (
        503,
        "UNAVAILABLE",
        "unavailable",
        "service_unavailable",
    )


class Overloaded(ServiceError):
    http_status, grpc_code, failure_reason, openai_type = (
        429,
        "RESOURCE_EXHAUSTED",
        "overloaded",
        "rate_limit_error",
    )


class RequestTimeout(ServiceError):
    http_status, grpc_code, failure_reason, openai_type = 408, "DEADLINE_EXCEEDED", "timeout", "timeout_error"

    @classmethod
    def after(cls, seconds: float) -> RequestTimeout:
        return cls(f"request timed out after {seconds:g}s (--request-timeout)")


class InjectedFault(ServiceError):
    http_status, grpc_code, failure_reason, openai_type = 500, "INTERNAL", "injected", "server_error"


# --- the service -----------------------------------------------------------------------------


class InferenceService:
    """The engine behind admission control, limits, fault injection, metrics and drain."""

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.model_name = config.model_name
        self.model_version = config.model_version
        self.engine = engine  # set by load(), or given (benchmarks, tests of a built engine)
        self.metrics = RuntimeMetrics(self.model_name, self._engine_stats)
        self.state = "ready" if engine is not None else "loading"  # loading|ready|draining|failed
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._random = random.Random()

    # -- lifecycle ------------------------------------------------------------------------------

    async def load(self) -> None:
        """Load weights and tokenizer off the loop, start the engine, warm up; then ready."""
        cfg = self.config
        started = time.monotonic()
        spec = engine_spec(cfg, engine_config_of(cfg))
        if cfg.engine_process:
            # Started first, so that the tokenizer loads here (off the loop) while the engine
            # process imports torch and loads the model. This process never imports torch.
            spawned = spawn_engine(spec)
            ranks = None
            if cfg.parallel.distributed:  # this pod's other ranks follow rank 0 (the engine process)
                ranks = LocalRanks(spec, cfg.parallel.global_ranks()[1:])
                ranks.start()
            try:
                tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model)
            except BaseException:
                spawned[0].kill()
                spawned[1].close()
                if ranks is not None:
                    ranks.stop()
                raise
            engine = EngineProcess(spec, tokenizer, model_name=self.model_name, spawned=spawned, ranks=ranks)
        else:
            engine = await self._thread_engine(spec)
        try:
            await engine.start()
            await engine.warmup()
        except BaseException:
            await engine.stop(drain_timeout=0)
            raise
        self.engine = engine
        freeze_heap()  # what this process serves with is loaded: out of the collector's way
        if self.state == "loading":
            self.state = "ready"
        log.info(
            "model %s ready in %.1fs (max_model_len %d)",
            self.model_name,
            time.monotonic() - started,
            engine.max_model_len,
        )

    async def _thread_engine(self, spec):
        """The engine in a thread of this process (--no-engine-process)."""
        # torch and the model stack: imported only when the engine runs in this process (in a
        # thread, off the loop, by the first import)
        await asyncio.to_thread(importlib.import_module, "model_runtime.engine.build")
        from model_runtime.engine.async_engine import AsyncEngine
        from model_runtime.engine.build import load_for_engine

        model, tokenizer, engine_config = await asyncio.to_thread(load_for_engine, spec)
        return AsyncEngine(model, tokenizer, model_name=self.model_name, config=engine_config)

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        if self.engine is not None:
            await self.engine.stop(drain_timeout=drain_timeout_s)

    @property
    def live(self) -> bool:
        """False once loading failed or the engine's step thread died: the pod should restart."""
        if self.state == "failed":
            return False
        return self.engine is None or self.state == "draining" or self.engine.is_running

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine.is_running

    def begin_drain(self) -> None:
        if self.state != "draining":
            log.info("draining: not ready; refusing new requests; %d in flight", self.in_flight)
        self.state = "draining"

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight (True) or the timeout passes (False)."""
        self.begin_drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            log.warning("drain timeout (%.0fs): %d requests still in flight", timeout_s, self.in_flight)
            return False

    def count_failure(self, error: ServiceError) -> None:
        """Count a request refused outside `generate` (requests failing inside it are counted there)."""
        if error.failure_reason is not None and not error.counted:
            self.metrics.request_failed(error.failure_reason)
            error.counted = True

    def _engine_stats(self):
        return self.engine.stats() if self.engine is not None else None

    # -- requests -------------------------------------------------------------------------------

    def check_model(self, name: str, version: str | None = None) -> None:
        """`version`: the KServe model version a request names ("" or None: any)."""
        if name != self.model_name:
            raise ModelNotFound(f"unknown model '{name}'; this server serves '{self.model_name}'")
        if version not in (None, "", self.model_version):
            raise ModelNotFound(f"model '{name}' has no version '{version}'; it has {self.model_version}")

    def admit(self) -> None:
        """Refuse at once what cannot be served now."""
        if self.state == "loading":
            raise Unavailable("the model is still loading; retry when /v2/health/ready answers 200")
        if self.state == "draining":
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.state != "ready":
            raise Unavailable("the server is not ready")
        if not self.engine.is_running:
            raise Unavailable("the engine has stopped: this server reports not live and is to be restarted")

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.validator.vocab_size

    def sampling_params(self, **kwargs):
        """SamplingParams from keyword arguments, or InvalidRequest saying which one is wrong."""
        try:
            params = SamplingParams(**kwargs)
            params.validate(self.max_model_len)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(str(e)) from None
        return params

    async def generate(self, prompt: str | list[int], params, request_id: str | None = None) -> AsyncIterator:
        """The engine's outputs for one request. Raises a ServiceError before the first output
        for a request that cannot run; closing the iterator early aborts it in the engine."""
        self.admit()
        arrival = time.monotonic()
        self.in_flight += 1
        self._idle.clear()
        failure = "cancelled"
        try:
            try:
                async for output in self._generate(prompt, params, request_id or uuid.uuid4().hex, arrival):
                    yield output
                failure = None
            except ServiceError as e:
                failure = e.failure_reason
                e.counted = True
                raise
            except Exception as e:
                failure = "internal"
                log.exception("request failed")
                error = ServiceError(f"internal error: {type(e).__name__}")
                error.counted = True
                raise error from e
        finally:
            if failure is not None:
                self.metrics.request_failed(failure)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _generate(self, prompt, params, request_id: str, arrival: float) -> AsyncIterator:
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.request_timeout_s
        if cfg.inject_latency_ms > 0:  # injected, added before the first token
            latency = cfg.inject_latency_ms / 1000
            if loop.time() + latency >= deadline:
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                raise RequestTimeout.after(cfg.request_timeout_s)
            await asyncio.sleep(latency)
        if cfg.inject_error_rate > 0 and self._random.random() < cfg.inject_error_rate:
            raise InjectedFault("injected error (--inject-error-rate)")
        metrics = self.metrics
        try:
            outputs = self.engine.generate(prompt, params, request_id)
        except EngineError as e:
            raise InvalidRequest(str(e)) from None
        except EngineOverloaded as e:
            raise Overloaded(f"server overloaded: {e}") from None
        # One timer per request (not one per token): past the deadline the engine aborts it.
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            self.engine.abort(request_id)

        timer = loop.call_at(deadline, expire)
        last_token_time = None
        try:
            async for output in outputs:
                if output.new_token_ids:
                    now = time.monotonic()
                    if last_token_time is None:
                        metrics.ttft.observe(now - arrival)
                        for _ in output.new_token_ids[1:]:  # came with the first (a reader that fell behind)
                            metrics.itl.observe(0.0)
                    else:
                        gap = (now - last_token_time) / len(output.new_token_ids)
                        for _ in output.new_token_ids:
                            metrics.itl.observe(gap)
                    last_token_time = now
                if output.finished:
                    if output.finish_reason == "abort":
                        if timed_out:
                            raise RequestTimeout.after(cfg.request_timeout_s)
                        raise Unavailable("the request was aborted: the engine is shutting down")
                    metrics.e2e.observe(time.monotonic() - arrival)
                    metrics.prompt_tokens.inc(len(output.prompt_token_ids))
                    metrics.generation_tokens.inc(len(output.token_ids))
                    metrics.request_succeeded(output.finish_reason)
                yield output
                if output.finished:
                    return
        except EngineError as e:  # refused when the engine picks it up (too long for a step's memory)
            raise InvalidRequest(str(e)) from None
        except EngineOverloaded as e:
            raise Overloaded(f"server overloaded: {e}") from None
        except EngineFailed as e:  # its step failed (out of memory even alone; the engine is gone): 500
            raise ServiceError(str(e)) from None
        finally:
            timer.cancel()
            await outputs.aclose()

    async def complete(self, prompt, params, request_id: str | None = None):
        """The final output of a request (all text, all token ids; logprobs and prompt logprobs
        gathered)."""
        logprobs = [] if params.logprobs is not None else None
        prompt_logprobs = None
        final = None
        async for output in self.generate(prompt, params, request_id):
            if logprobs is not None and output.logprobs:
                logprobs.extend(output.logprobs)
            prompt_logprobs = output.prompt_logprobs or prompt_logprobs
            final = output
        if final is None:
            raise ServiceError("the engine returned no output")
        final.logprobs = logprobs
        final.prompt_logprobs = prompt_logprobs
        return final


async def first_and_rest(outputs: AsyncIterator) -> AsyncIterator:
    """Start a stream: the first output is awaited now (so a request that cannot run raises here,
    before any response header is sent); the returned iterator yields it and the rest."""
    try:
        first = await anext(outputs)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await outputs.aclose()
        raise

    async def rest():
        try:
            if first is not None:
                yield first
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()

    return rest()


