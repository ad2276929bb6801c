"""HTTP load benchmark: `python -m benchmarks.runtime_http` (part of `make bench`).

One workload, run twice in the same process's lifetime: N concurrent clients, each sending R
greedy requests one after another (fixed prompt and output lengths, EOS ignored), first straight
through `AsyncEngine.generate`, then as streaming OpenAI completions against `moe-runtime serve`
started as a subprocess on loopback. Prints TTFT p50/p99, inter-token latency p50/p99 and
generated tokens per second for both, and what HTTP costs in throughput (goal: at most 15%).
Bounded in count (N x R requests) and in time (--time-limit per run).

Reading the numbers: the server's engine steps in a child process (docs/decisions.md #15), so
the per-token work of HTTP (one SSE event per new piece of text) runs on the server's own core
beside the step; in process, the engine shares one GIL with its readers, so HTTP can come out
ahead. `--no-engine-process` runs the server's engine in a thread beside its event loop instead:
there that work waits for the step to release the GIL, which a tiny model's step on the CPU holds
for most of its time. The CPU line counts the server with its engine process. TTFT and ITL count
visible text (a tokenizer that decodes single tokens to nothing shows no ITL).
"""

from __future__ import annotations

import argparse
import asyncio
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

import aiohttp

from model_runtime.cli import GIL_SWITCH_INTERVAL_S
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.messages import EngineSpec
from model_runtime.engine.requests import SamplingParams
from model_runtime.serving.service import engine_cpu_threads

GOAL_MAX_OVERHEAD = 0.15


@dataclass
class Workload:
    model: str = "builtin:tiny-mixtral"
    clients: int = 16
    requests_per_client: int = 4
    prompt_chars: int = 64
    max_tokens: int = 64
    device: str = "auto"
    dtype: str = "auto"
    time_limit_s: float = 180.0
    engine_process: bool = True  # the server's engine in a child process (its default)

    def prompt(self, client: int, request: int) -> str:
        text = f"client {client} request {request}: the experts route tokens. "
        return (text * (self.prompt_chars // len(text) + 1))[: self.prompt_chars]


@dataclass
class RunResult:
    name: str
    wall_s: float = 0.0
    tokens: int = 0
    requests: int = 0
    failures: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(
        default_factory=dict
    )  # CPU seconds by process ("engine", "server", "client")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def _run_clients(workload: Workload, one_request) -> tuple[float, list]:
    """N clients of R sequential requests each; `one_request(prompt)` returns its measurements."""
    deadline = time.monotonic() + workload.time_limit_s

    async def client(c: int):
        results = []
        for r in range(workload.requests_per_client):
            if time.monotonic() > deadline:
                break
            results.append(await one_request(workload.prompt(c, r)))
        return results

    start = time.monotonic()
    per_client = await asyncio.gather(*(client(c) for c in range(workload.clients)))
    return time.monotonic() - start, [m for results in per_client for m in results]


def _collect(name: str, wall_s: float, measurements: list) -> RunResult:
    result = RunResult(name, wall_s=wall_s)
    for m in measurements:
        if m is None:
            result.failures += 1
            continue
        ttft, gaps, tokens = m
        result.requests += 1
        result.tokens += tokens
        result.ttft_s.append(ttft)
        result.itl_s.extend(gaps)
    return result


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads) and of its children (the server's
    engine process); this process alone when pid is None."""
    if pid is None:
        return time.process_time()
    total = 0.0
    for stat in [Path(f"/proc/{pid}/stat"), *_children_stats(pid)]:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children_stats(pid: int) -> list[Path]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(stat)
        except (OSError, ValueError, IndexError):
            continue
    return children


class EngineRunner:
    """The workload straight through an in-process AsyncEngine (no server in between)."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self.engine = None

    async def start(self) -> None:
        # torch and the model stack, imported here: the server subprocess is launched first and
        # loads its model meanwhile (compare)
        from model_runtime.engine.async_engine import AsyncEngine
        from model_runtime.engine.build import load_for_engine

        w = self.workload
        spec = EngineSpec(  # the engine as the server builds it (threads, dtype): like against like
            model=w.model,
            dtype=w.dtype,
            device=w.device,
            config=EngineConfig(max_num_seqs=max(w.clients, 1)),
            num_threads=engine_cpu_threads(),
        )
        model, tokenizer, config = await asyncio.to_thread(load_for_engine, spec)
        self.engine = AsyncEngine(model, tokenizer, config)
        await self.engine.start()
        await self.engine.warmup()

    async def stop(self) -> None:
        await self.engine.stop()

    async def run(self) -> RunResult:
        engine = self.engine
        params = SamplingParams(max_tokens=self.workload.max_tokens, temperature=0, ignore_eos=True)

        async def one_request(prompt: str):
            start = time.monotonic()
            last, ttft, gaps, tokens = None, None, [], 0
            async for output in engine.generate(prompt, params):
                if output.new_text:  # visible text, as an HTTP client sees it
                    now = time.monotonic()
                    if last is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                tokens = len(output.token_ids)
            return ttft, gaps, tokens

        cpu = process_cpu_s()
        wall, measurements = await _run_clients(self.workload, one_request)
        result = _collect("engine (in process)", wall, measurements)
        result.cpu_s["engine"] = process_cpu_s() - cpu
        return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HttpRunner:
    """The workload as streaming OpenAI completions against a `moe-runtime serve` subprocess."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.session = None

    def launch(self) -> None:
        w = self.workload
        args = [
            sys.executable,
            "-m",
            "model_runtime.cli",
            "serve",
            "--model",
            w.model,
            "--host",
            "127.0.0.1",
            "--http-port",
            str(self.port),
            "--grpc-port",
            "0",
            "--max-num-seqs",
            str(max(w.clients, 1)),
            "--device",
            w.device,
            "--dtype",
            w.dtype,
            "--log-level",
            "warning",
            "--engine-process" if w.engine_process else "--no-engine-process",
        ]
        self.proc = subprocess.Popen(
            args, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "POD_IP": ""}
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.workload.clients + 4)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                async with self.session.get(f"{self.base}/v2/health/ready") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready after 300s")
            await asyncio.sleep(0.1)  # polling with a deadline
        async with self.session.get(f"{self.base}/v1/models") as r:
            self.model_name = (await r.json())["data"][0]["id"]
        await self._one_request("warm up the connection")

    async def _one_request(self, prompt: str):
        body = {
            "model": self.model_name,
            "prompt": prompt,
            "max_tokens": self.workload.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        start = time.monotonic()
        last, ttft, gaps, tokens = None, None, [], 0
        async with self.session.post(f"{self.base}/v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return None
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                now = time.monotonic()
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    if last is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return ttft if ttft is not None else time.monotonic() - start, gaps, tokens

    async def run(self) -> RunResult:
        server_cpu, client_cpu = process_cpu_s(self.proc.pid), process_cpu_s()
        wall, measurements = await _run_clients(self.workload, self._one_request)
        result = _collect("HTTP (OpenAI, streaming)", wall, measurements)
        result.cpu_s["server"] = process_cpu_s(self.proc.pid) - server_cpu
        result.cpu_s["client"] = process_cpu_s() - client_cpu
        return result

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def compare(workload: Workload, rounds: int) -> tuple[RunResult, RunResult]:
    """Alternate the two runs `rounds` times (the machine's noise hits both); best of each."""
    engine, http = EngineRunner(workload), HttpRunner(workload)
    http.launch()  # the server loads while the in-process engine does
    try:
        await engine.start()
        await http.start()
        engine_runs, http_runs = [], []
        for _ in range(rounds):
            engine_runs.append(await engine.run())
            http_runs.append(await http.run())
    finally:
        if engine.engine is not None:
            await engine.stop()
        await http.stop()
    return max(engine_runs, key=lambda r: r.tokens_per_s), max(http_runs, key=lambda r: r.tokens_per_s)


def table(workload: Workload, engine: RunResult, http: RunResult, rounds: int = 1) -> str:
    def ms(x: float) -> str:
        return f"{1000 * x:8.1f}"

    header = (
        f"{'run':<26} {'reqs':>5} {'fail':>4} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8}   (ms)"
    )
    lines = [
        f"HTTP load: {workload.model}, {workload.clients} concurrent streaming clients x "
        f"{workload.requests_per_client} requests, {workload.prompt_chars}-char prompts, "
        f"{workload.max_tokens} tokens each (greedy, EOS ignored); best of {rounds} alternating rounds; "
        f"the server's engine in {'a child process' if workload.engine_process else 'a thread'}",
        header,
        "-" * len(header),
    ]
    for run in (engine, http):
        lines.append(
            f"{run.name:<26} {run.requests:>5} {run.failures:>4} {run.tokens_per_s:>9.1f} "
            f"{ms(percentile(run.ttft_s, 50))} {ms(percentile(run.ttft_s, 99))} "
            f"{ms(percentile(run.itl_s, 50))} {ms(percentile(run.itl_s, 99))}"
        )
    overhead = 1 - http.tokens_per_s / engine.tokens_per_s if engine.tokens_per_s else float("nan")
    verdict = "ok" if overhead <= GOAL_MAX_OVERHEAD and not http.failures else "MISSED"
    lines.append(
        f"HTTP cost in throughput: {100 * overhead:.1f}% (goal <= {100 * GOAL_MAX_OVERHEAD:.0f}%): {verdict}"
    )
    per_k = {
        name: 1e6 * cpu / max(run.tokens, 1) for run in (engine, http) for name, cpu in run.cpu_s.items()
    }
    if "engine" in per_k and "server" in per_k:
        lines.append(
            f"CPU per 1k tokens: engine run {per_k['engine']:.0f} ms; server {per_k['server']:.0f} ms "
            f"(+{per_k['server'] - per_k['engine']:.0f} ms for HTTP), load client {per_k['client']:.0f} ms, "
            f"on {os.cpu_count()} cores"
        )
    if engine.itl_s and http.itl_s:
        lines.append(
            f"mean inter-token latency: engine {ms(statistics.fmean(engine.itl_s)).strip()} ms, "
            f"HTTP {ms(statistics.fmean(http.itl_s)).strip()} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runtime_http", description=__doc__.split("\n")[0]
    )
    defaults = Workload()
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--requests-per-client", type=int, default=defaults.requests_per_client)
    parser.add_argument("--prompt-chars", type=int, default=defaults.prompt_chars)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--device", default=defaults.device, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--time-limit", type=float, default=defaults.time_limit_s, help="seconds per run")
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=defaults.engine_process,
        help="the server's engine in a child process (its default) or in a thread",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating runs of each; the best is reported"
    )
    args = parser.parse_args(argv)
    workload = Workload(
        args.model,
        args.clients,
        args.requests_per_client,
        args.prompt_chars,
        args.max_tokens,
        args.device,
        args.dtype,
        args.time_limit,
        args.engine_process,
    )
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as the server sets it: like against like
    engine, http = asyncio.run(compare(workload, args.rounds))
    print(table(workload, engine, http, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
