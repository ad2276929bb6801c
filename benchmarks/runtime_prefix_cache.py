"""Prefix caching benchmark: `python -m benchmarks.runtime_prefix_cache` (part of `make bench`).

One multi-turn chat, as a chat client holds it: a long system prompt, then TURNS turns, each
sending the whole conversation so far (every earlier question and answer) plus a new question as a
streaming OpenAI chat completion, and appending the answer. Two `moe-runtime serve` subprocesses on
loopback, one with prefix caching (the default) and one with --no-enable-prefix-caching, take
turns: conversation 1 on one, then on the other, and so on for --rounds conversations each (a
distinct system prompt per conversation, so none starts from another's blocks; an idle server
costs nothing). Prints, per turn, the conversation's prompt tokens and the median time to the
first streamed token (TTFT) on each server, and the prefix cache's counters from /metrics.

Then the same conversation in this process, straight through `LLMEngine` (one torch thread, token
ids: the answer's tokens appended as generated, the questions as bytes), on and off alternating:
the time from `add_request` to the step that yields the first token, which leaves out HTTP, the
chat template and the engine process's pipe, and so shows the prefill work saved more plainly on
a loaded host. Bounded in count (rounds x turns requests per server) and in time (--timeout per
request).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from model_runtime.serving import metrics

QUESTION = "Turn {turn}: how do the experts of layer {turn} share the tokens the router sends them? "


@dataclass
class Workload:
    model: str = "builtin:tiny-mixtral"
    turns: int = 6
    system_chars: int = 600
    question_chars: int = 80
    max_tokens: int = 24
    rounds: int = 5
    device: str = "cpu"
    timeout_s: float = 120.0
    dtype: str = "float32"  # the servers' and the in-process engine's (like against like)

    def system(self, conversation: int) -> str:
        text = f"Conversation {conversation}. You are a helpful assistant who knows mixture-of-experts models. "
        return (text * (self.system_chars // len(text) + 1))[: self.system_chars]

    def question(self, turn: int) -> str:
        text = QUESTION.format(turn=turn)
        return (text * (self.question_chars // len(text) + 1))[: self.question_chars]


@dataclass
class Turn:
    prompt_tokens: int
    ttft_s: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """`moe-runtime serve` on loopback, with or without prefix caching."""

    workload: Workload
    prefix_caching: bool
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        w = self.workload
        args = [sys.executable, "-m", "model_runtime.cli", "serve", "--model", w.model]
        args += ["--host", "127.0.0.1", "--http-port", str(self.port), "--grpc-port", "0"]
        args += ["--device", w.device, "--dtype", w.dtype, "--log-level", "warning"]
        args += ["--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        self.proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "POD_IP": ""})

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.base}/v2/health/ready", timeout=2).status_code == 200:
                    self.model_name = httpx.get(f"{self.base}/v1/models").json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling with a deadline
        raise TimeoutError(f"server not ready after {timeout_s:.0f}s")

    def chat_turn(self, messages: list[dict]) -> tuple[str, Turn]:
        """One streamed chat completion: (the answer's text, its prompt tokens and TTFT)."""
        body = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": self.workload.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.monotonic()
        ttft, text, prompt_tokens = None, [], 0
        with httpx.stream("POST", f"{self.base}/v1/chat/completions", json=body, timeout=self.workload.timeout_s) as r:
            if r.status_code != 200:
                raise RuntimeError(f"chat completion failed: {r.status_code} {r.read()[:300]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.monotonic() - start
                    text.append(chunk["choices"][0]["delta"]["content"])
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
        return "".join(text), Turn(prompt_tokens, ttft if ttft is not None else time.monotonic() - start)

    def counters(self) -> tuple[float, float]:
        """(moe_prefix_cache_queries_total, moe_prefix_cache_hits_total)."""
        values = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.base}/metrics").text):
            for sample in family.samples:
                values[sample.name] = sample.value
        return values.get(metrics.PREFIX_CACHE_QUERIES, 0.0), values.get(metrics.PREFIX_CACHE_HITS, 0.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def conversation(server: Server, workload: Workload, index: int) -> list[Turn]:
    messages = [{"role": "system", "content": workload.system(index)}]
    turns = []
    for t in range(1, workload.turns + 1):
        messages.append({"role": "user", "content": workload.question(t)})
        answer, turn = server.chat_turn(messages)
        messages.append({"role": "assistant", "content": answer})
        turns.append(turn)
    return turns


def run(workload: Workload) -> tuple[dict[bool, list[list[Turn]]], dict[bool, tuple[float, float]]]:
    """Each server's conversations (alternating, after one warm-up conversation each) and its
    prefix cache counters over the measured ones."""
    servers = {on: Server(workload, on) for on in (True, False)}
    for s in servers.values():
        s.launch()
    try:
        for s in servers.values():
            s.wait_ready()
        for on, s in servers.items():
            conversation(s, workload, index=1000 + on)  # warm-up: code paths, allocator
        before = {on: s.counters() for on, s in servers.items()}
        runs: dict[bool, list[list[Turn]]] = {True: [], False: []}
        for r in range(workload.rounds):
            for on, s in servers.items():
                runs[on].append(conversation(s, workload, index=r))
        counters = {}
        for on, s in servers.items():
            queries, hits = s.counters()
            counters[on] = (queries - before[on][0], hits - before[on][1])
        return runs, counters
    finally:
        for s in servers.values():
            s.stop()


def engine_conversation(model, workload: Workload, on: bool, index: int) -> list[Turn]:
    """The conversation as token ids through an in-process engine: each turn's TTFT."""
    import torch  # the servers' side of this benchmark needs no torch here

    from model_runtime.engine.config import EngineConfig
    from model_runtime.engine.core import LLMEngine
    from model_runtime.engine.requests import SamplingParams

    engine = LLMEngine(model, None, EngineConfig(enable_prefix_caching=on, device=workload.device))
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=0, ignore_eos=True)
    ids = list(workload.system(index).encode())
    turns = []
    with torch.inference_mode():
        for t in range(1, workload.turns + 1):
            ids += list(workload.question(t).encode())
            start, ttft = time.perf_counter(), None
            engine.add_request(str(t), ids, params)
            final = None
            while engine.has_unfinished():
                for out in engine.step():
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    final = out
            turns.append(Turn(len(ids), ttft))
            ids += final.token_ids
    return turns


def engine_runs(workload: Workload) -> dict[bool, list[list[Turn]]]:
    import torch

    from model_runtime import load_model

    torch.set_num_threads(1)
    model = load_model(workload.model, dtype=getattr(torch, workload.dtype), device=workload.device).eval()
    engine_conversation(model, workload, True, 2000)  # warm-up
    runs: dict[bool, list[list[Turn]]] = {True: [], False: []}
    for r in range(workload.rounds):
        for on in (True, False):
            runs[on].append(engine_conversation(model, workload, on, r))
    return runs


def table(workload: Workload, runs: dict[bool, list[list[Turn]]], counters) -> str:
    lines = [
        f"Multi-turn chat, {workload.model} on {workload.device} ({workload.dtype}): a {workload.system_chars}-char system prompt, "
        f"{workload.turns} turns of a {workload.question_chars}-char question and a {workload.max_tokens}-token "
        f"answer (greedy), streamed; median TTFT of {workload.rounds} conversations per server, alternating",
        f"{'turn':>4}  {'prompt tokens':>13}  {'TTFT off (ms)':>13}  {'TTFT on (ms)':>12}  {'speedup':>7}",
    ]
    for t in range(workload.turns):
        off = statistics.median(c[t].ttft_s for c in runs[False]) * 1e3
        on = statistics.median(c[t].ttft_s for c in runs[True]) * 1e3
        tokens = runs[True][0][t].prompt_tokens
        lines.append(f"{t + 1:>4}  {tokens:>13}  {off:>13.1f}  {on:>12.1f}  {off / on:>6.2f}x")
    total_off = sum(statistics.median(c[t].ttft_s for c in runs[False]) for t in range(workload.turns)) * 1e3
    total_on = sum(statistics.median(c[t].ttft_s for c in runs[True]) for t in range(workload.turns)) * 1e3
    lines.append(f"{'all':>4}  {'':>13}  {total_off:>13.1f}  {total_on:>12.1f}  {total_off / total_on:>6.2f}x")
    if counters is None:
        return "\n".join(lines)
    queries, hits = counters[True]
    lines.append(
        f"prefix cache on: {hits:.0f} of {queries:.0f} prompt tokens were hits ({hits / max(queries, 1):.0%}; "
        f"moe_prefix_cache_hits_total / moe_prefix_cache_queries_total); off: {counters[False][1]:.0f} hits"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runtime_prefix_cache", description=__doc__.split("\n")[0])
    d = Workload()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--turns", type=int, default=d.turns)
    parser.add_argument("--system-chars", type=int, default=d.system_chars)
    parser.add_argument("--question-chars", type=int, default=d.question_chars)
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens)
    parser.add_argument("--rounds", type=int, default=d.rounds, help="conversations per server")
    parser.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request")
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    workload = Workload(
        args.model,
        args.turns,
        args.system_chars,
        args.question_chars,
        args.max_tokens,
        args.rounds,
        args.device,
        args.timeout,
        args.dtype,
    )
    runs, counters = run(workload)
    print(table(workload, runs, counters), flush=True)
    print(f"load average over the run (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    print("\nThe same conversation in process (LLMEngine, token ids, one torch thread): add_request to first token")
    print("\n".join(table(workload, engine_runs(workload), None).splitlines()[1:]), flush=True)
    print(f"load average over the run (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
