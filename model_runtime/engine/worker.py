"""The engine process's side: what it builds and its step loop (EngineProcess, in
model_runtime.engine.process, is the server's side). No torch at import: the server starts this
process before it imports torch itself, so that the two imports overlap.

Why the engine has a process of its own: docs/decisions.md #15.

The two talk over a duplex `multiprocessing` pipe, in pickled tuples:

    server -> engine  ("add", request_id, prompt_ids, params, arrival) | ("abort", request_id) | ("stop",)
    engine -> server  ("ready", EngineInfo) | ("failed", message)     once, at start
                      ("out", [delta | (request_id, error)], counts, EngineStats | None)
                                                                       after each step

A delta carries what a step added to one request (new token ids, new text, finish reason,
logprobs, first token time); the server keeps each stream's token ids and text, so a message's
size does not grow with the output's length. Every message carries the counts (adds taken in,
running, waiting, KV cache usage), so the queue-full check is as exact as in one process; the full
stats (expert counts) ride along at most every 50 ms and always before the engine goes idle.

The engine process ignores SIGINT and SIGTERM: the server decides when it stops (after the drain),
and it exits by itself once the server is gone (its end of the pipe closes).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass

from model_runtime.engine.config import EngineConfig

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.05


@dataclass
class EngineSpec:
    """What the engine process builds: the model, its placement, and the engine's settings."""

    model: str
    dtype: str  # auto (bfloat16 on CUDA, float32 on the CPU) | float32 | bfloat16 | float16
    device: str  # auto (CUDA when there is one) | cpu | cuda | cuda:N
    config: EngineConfig  # its device is set to the one the engine process picks
    quantization: str | None = None
    num_threads: int | None = None  # torch threads (CPU)
    log_level: int = logging.INFO
    log_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class EngineInfo:
    """The engine's limits, which the server checks requests against before sending them."""

    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int
    device: str
    dtype: str


# -- the engine process ---------------------------------------------------------------------------


def spawn_engine(spec: EngineSpec):
    """Start the engine process; (process, the server's end of the pipe). It loads the model and
    then sends ("ready", EngineInfo) or ("failed", message)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads, CUDA
    conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(
        target=run_engine_process, args=(child_conn, spec), name="moe-engine", daemon=True
    )
    process.start()
    child_conn.close()
    return process, conn


def run_engine_process(conn, spec: EngineSpec) -> None:
    """The engine process's main: build the engine, report ready (or why not), then step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format=spec.log_format)
    try:
        engine = build_engine(spec)
    except BaseException as e:
        log.exception("the engine could not start")
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(
        (
            "ready",
            EngineInfo(
                vocab_size=engine.vocab_size,
                max_model_len=engine.max_model_len,
                kv_capacity_tokens=engine.blocks.capacity_tokens,
                device=str(engine.device),
                dtype=str(engine.kv_dtype).removeprefix("torch."),
            ),
        )
    )
    try:
        conn.send(("out", [], (0, 0, 0, 0.0), engine.stats()))
        step_loop(conn, engine)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server is gone: nothing left to serve
    # Nothing is left to clean up; the interpreter's teardown of torch would take the server's
    # shutdown a second or more.
    logging.shutdown()
    os._exit(0)


def build_engine(spec: EngineSpec):
    from model_runtime.engine.core import LLMEngine

    model, tokenizer, config = load_for_engine(spec)
    return LLMEngine(model, tokenizer, config)


def load_for_engine(spec: EngineSpec):
    """(model, tokenizer, engine config) for `spec`, with "auto" device and dtype resolved and the
    CPU's torch threads set; what an engine, in this process or the server's, is built from."""
    import torch

    from model_runtime import load_model, load_tokenizer

    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = spec.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if spec.num_threads and device == "cpu":
        torch.set_num_threads(spec.num_threads)
    log.info("loading %s (%s on %s)", spec.model, dtype, device)
    model = load_model(spec.model, dtype=getattr(torch, dtype), device=device)
    if spec.quantization == "int8":
        from model_runtime.kernels.quant import quantize_int8

        model = quantize_int8(model)
    return model, load_tokenizer(spec.model), dataclasses.replace(spec.config, device=device)


def step_loop(conn, engine) -> None:
    """Apply the server's commands, step while there is work, send each step's outputs."""
    from model_runtime.engine.core import apply_command, fail_all

    last_stats = 0.0
    applied_adds = 0
    while True:
        commands = []
        timeout = None if not engine.has_unfinished() else 0  # idle: block until told something
        while conn.poll(timeout):
            commands.append(conn.recv())
            timeout = 0
        outputs: list = []
        stopping = False
        for command in commands:
            if command[0] == "stop":
                stopping = True
                continue
            applied_adds += command[0] == "add"
            outputs.extend(apply_command(engine, command))
        if stopping:
            for rid in list(engine.requests):
                outputs.append(engine.abort_request(rid))
        elif engine.has_unfinished():
            try:
                outputs.extend(engine.step())
            except Exception as e:  # a failed step fails its requests, not the engine
                log.exception("engine step failed")
                outputs.extend(fail_all(engine, e))
        now = time.monotonic()
        stats = None
        if stopping or now - last_stats >= STATS_INTERVAL_S or not engine.has_unfinished():
            stats, last_stats = engine.stats(), now
        if outputs or commands or stats is not None:
            # the counts ride on every message: the server's queue-full check and gauges are exact
            counts = (applied_adds, engine.num_running, engine.num_waiting, engine.blocks.usage)
            conn.send(("out", [_wire(o) for o in outputs], counts, stats))
        if stopping:
            return


def _wire(output) -> tuple:
    from model_runtime.engine.core import EngineError, EngineOverloaded

    if isinstance(output, tuple):  # (request_id, error)
        rid, error = output
        kind = "failed"
        if isinstance(error, EngineError):
            kind = "invalid"
        elif isinstance(error, EngineOverloaded):
            kind = "overloaded"
        return (rid, kind, str(error))
    return (
        output.request_id,
        output.new_token_ids,
        output.new_text,
        output.finish_reason if output.finished else None,
        output.logprobs,
        output.first_token_time,
    )
