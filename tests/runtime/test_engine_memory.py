"""Memory and failure: the KV cache sized from the host's memory (--gpu-memory-utilization) unless
--kv-cache-memory is given, each step's attention kept under --max-step-attention-memory, a request
too long for it refused alone, and an out-of-memory step failing only what cannot run alone while
the engine serves on."""

from __future__ import annotations

import asyncio
import logging
import threading

import httpx
import pytest
import torch

from model_runtime import load_model
from model_runtime.cli import build_parser, config_from_args
from model_runtime.engine import memory
from model_runtime.engine.async_engine import AsyncEngine
from model_runtime.engine.config import EngineConfig, MiB
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.memory import (
    CPU_KV_CACHE_MAX_BYTES,
    OutOfMemory,
    StepMemory,
    cgroup_memory_left,
    mem_available,
    plan_cpu_kv_cache,
    plan_cuda_kv_cache,
    size_kv_cache,
)
from model_runtime.engine.messages import AddRequest, RequestFailed
from model_runtime.engine.requests import EngineError, EngineFailed, SamplingParams

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin:tiny-mixtral", dtype=torch.float32).eval()


def fake_available(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(memory, "available_host_memory", lambda: (nbytes, "available (fake)"))


def prompts(n: int, lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def run_all(engine: LLMEngine, max_steps: int = 20_000) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not finish")


def tokens_of(outs: dict[str, list]) -> dict[str, list[int]]:
    return {rid: o[-1].token_ids for rid, o in outs.items() if not isinstance(o[-1], RequestFailed)}


def record_steps(engine: LLMEngine) -> list[tuple[int, int, int]]:
    """(sequences, most new tokens of one, longest context) of every forward pass the engine runs."""
    shapes = []
    forward = engine.model.forward_paged

    def recorded(tokens, batch, cache):
        new = batch.query_start[1:] - batch.query_start[:-1]
        shapes.append((batch.num_seqs, int(new.max()), int(batch.context_lens.max())))
        return forward(tokens, batch, cache)

    engine.model.forward_paged = recorded
    return shapes


@pytest.fixture
def restore_forward(model):
    yield
    model.__dict__.pop("forward_paged", None)  # the instance attribute tests set


# -- the KV cache's size ---------------------------------------------------------------------------


def test_cpu_capacity_follows_the_available_memory(model, monkeypatch, caplog):
    available = 256 * MiB
    fake_available(monkeypatch, available)
    weights = model.weight_bytes()
    per_block = model.kv_cache_bytes_per_token(torch.float32) * 16
    engines = {}
    with caplog.at_level(logging.INFO, logger="model_runtime.engine.core"):
        for util in (0.25, 0.5):
            config = EngineConfig(gpu_memory_utilization=util, max_step_attention_bytes=4 * MiB)
            engine = engines[util] = LLMEngine(model, None, config)
            step = StepMemory(model, torch.float32).step_peak_bytes(config)
            want = (int(util * (available + weights)) - weights - step) // per_block
            assert engine.blocks.num_blocks == want
            assert engine.stats().kv_capacity_tokens == want * 16 == engine.blocks.capacity_tokens
    # the fixed parts (weights, the step's estimate) cancel: the difference follows util alone
    grown = (engines[0.5].blocks.num_blocks - engines[0.25].blocks.num_blocks) * per_block
    assert abs(grown - 0.25 * (available + weights)) <= per_block
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:")]
    assert len(lines) == 2 and "0.25 x (256 MiB available (fake)" in lines[0], lines
    assert f"{engines[0.25].blocks.capacity_tokens} tokens" in lines[0]


def test_cpu_default_is_fixed_and_kv_cache_memory_wins(model, monkeypatch):
    def unexpected():
        raise AssertionError("the host's memory was read")

    monkeypatch.setattr(memory, "available_host_memory", unexpected)
    per_block = model.kv_cache_bytes_per_token(torch.float32) * 16
    assert LLMEngine(model, None, EngineConfig()).blocks.num_blocks == 256 * MiB // per_block
    engine = LLMEngine(model, None, EngineConfig(kv_cache_memory_bytes=2 * MiB, gpu_memory_utilization=0.5))
    assert engine.blocks.num_blocks == 2 * MiB // per_block
    assert engine.kv_cache_bytes == engine.blocks.num_blocks * per_block


def test_cpu_sizing_is_capped_and_refuses_when_nothing_is_left(monkeypatch):
    kv, how = plan_cpu_kv_cache(0.9, 1 << 50, "available (fake)", 10 * MiB, 100 * MiB)
    assert kv == CPU_KV_CACHE_MAX_BYTES and "capped at 64 GiB" in how
    kv, _ = plan_cpu_kv_cache(0.5, 1000 * MiB, "available", 0, 0, shared_by=2)  # two ranks share the host
    assert kv == 250 * MiB
    with pytest.raises(OutOfMemory, match="no host memory is left for the KV cache"):
        plan_cpu_kv_cache(0.1, 100 * MiB, "available", 0, 64 * MiB)


def test_the_host_memory_comes_from_proc_meminfo(model):
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    direct = int(fields["MemAvailable"].split()[0]) * 1024
    assert abs(mem_available() - direct) < 0.1 * direct + 256 * MiB  # it moves while we read
    config = EngineConfig(gpu_memory_utilization=0.5, max_step_attention_bytes=MiB)
    kv, how = size_kv_cache(model, config, torch.float32)  # sized, not allocated
    assert 0 < kv <= min(CPU_KV_CACHE_MAX_BYTES, mem_available())
    assert "MemAvailable" in how or "cgroup" in how


def test_cgroup_limit(tmp_path):
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("600000\n")
    (tmp_path / "memory.stat").write_text("anon 400000\ninactive_file 100000\n")
    assert cgroup_memory_left(str(tmp_path)) == 500000
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_left(str(tmp_path)) is None
    assert cgroup_memory_left(str(tmp_path / "absent")) is None


def test_cuda_sizing_arithmetic():
    GiB = 2**30
    kw = dict(free=60 * GiB, peak=12 * GiB, allocated=10 * GiB, reserved=11 * GiB, attention=GiB)
    kv, how = plan_cuda_kv_cache(0.9, total=80 * GiB, **kw)
    # outside torch: 80 - 60 - 11 = 9 GiB; 0.9 x 80 - 12 - 9 - 1 = 50 GiB; free less a step: 60 - 2 - 1 = 57
    assert kv == int(0.9 * 80 * GiB) - 22 * GiB and "0.9 x 80 GiB" in how
    # less free memory is more used outside torch (another process): the budget shrinks by as much
    kv, _ = plan_cuda_kv_cache(0.9, total=80 * GiB, **{**kw, "free": 30 * GiB})
    assert kv == int(0.9 * 80 * GiB) - 52 * GiB
    # at util 1 the free memory less a step's activations and the attention budget is the limit
    kv, how = plan_cuda_kv_cache(1.0, total=80 * GiB, **kw)
    assert kv == 60 * GiB - 2 * GiB - GiB and "limited by the free memory" in how
    with pytest.raises(OutOfMemory, match="no device memory is left"):
        plan_cuda_kv_cache(0.1, total=80 * GiB, **kw)


def test_the_flags(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m"])
    config = config_from_args(args)
    assert (config.kv_cache_memory_bytes, config.gpu_memory_utilization) == (None, None)
    assert config.max_step_attention_bytes == 2**30
    args = parser.parse_args(
        ["serve", "--model", "m", "--gpu-memory-utilization", "0.5", "--kv-cache-memory", "8Gi"]
        + ["--max-step-attention-memory", "64Mi"]
    )
    config = config_from_args(args)
    assert (config.gpu_memory_utilization, config.kv_cache_memory_bytes) == (0.5, 8 * 2**30)
    assert config.max_step_attention_bytes == 64 * MiB
    for bad in ("0", "1.5", "-0.2", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--model", "m", "--gpu-memory-utilization", bad])
    assert "must be in (0, 1] (a fraction of the device's memory), got 1.5" in capsys.readouterr().err
    for bad in (0, 1.01):
        with pytest.raises(ValueError, match=r"GPU memory utilization must be in \(0, 1\]"):
            EngineConfig(gpu_memory_utilization=bad)


# -- one step's attention --------------------------------------------------------------------------

BUDGET = 256 * 2**10  # tiny-mixtral: one sequence alone fits 378 tokens of context in it


def test_steps_stay_within_the_attention_budget(model, restore_forward):
    vocab = model.config.vocab_size
    ids = prompts(6, [150, 210, 250, 180], vocab)
    params = SamplingParams(max_tokens=8, **GREEDY)
    config = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_kv_blocks=1024)

    def run(engine):
        shapes = record_steps(engine)
        for i, p in enumerate(ids):
            engine.add_request(str(i), p, params)
        outs = run_all(engine)
        model.__dict__.pop("forward_paged")
        return tokens_of(outs), shapes

    free = LLMEngine(model, None, EngineConfig(**config))
    want, free_shapes = run(free)
    engine = LLMEngine(model, None, EngineConfig(**config, max_step_attention_bytes=BUDGET))
    assert engine.max_context_tokens == 378
    got, shapes = run(engine)
    assert got == want  # every request finished, with the tokens it gets unbudgeted

    per_token = model.kv_cache_bytes_per_token(torch.float32) // model.config.num_hidden_layers
    for S, Q, L in shapes:
        assert S * L * per_token <= BUDGET, (S, Q, L)
        assert engine.step_memory.attention_bytes(S, Q, L) <= BUDGET, (S, Q, L)
    assert max(S for S, _, _ in shapes) >= 2  # short contexts still share a step
    # unbudgeted, steps take several times the budget
    assert max(engine.step_memory.attention_bytes(*shape) for shape in free_shapes) > 4 * BUDGET


def test_a_request_too_long_for_the_budget_fails_alone(model):
    vocab = model.config.vocab_size
    engine = LLMEngine(
        model,
        None,
        EngineConfig(max_num_batched_tokens=64, num_kv_blocks=1024, max_step_attention_bytes=BUDGET),
    )
    long, short = prompts(2, [500, 40], vocab)
    params = SamplingParams(max_tokens=6, **GREEDY)
    with pytest.raises(EngineError, match=r"the prompt has 500 tokens.*256 KiB.*at most 378 tokens"):
        engine.add_request("long", long, params)
    # a request handed over already validated (as the server does) is failed by the scheduler
    for i in range(3):
        assert engine.apply(AddRequest(f"short-{i}", short, params, 0.0)) == []
    assert engine.apply(AddRequest("long", long, params, 0.0)) == []
    outs = run_all(engine)
    failed = outs["long"][-1]
    assert isinstance(failed, RequestFailed) and isinstance(failed.error, EngineError)
    assert "the request has 500 tokens" in str(failed.error) and "256 KiB" in str(failed.error)
    assert "at most 378 tokens" in str(failed.error)
    for i in range(3):
        assert outs[f"short-{i}"][-1].finish_reason == "length"
        assert len(outs[f"short-{i}"][-1].token_ids) == 6
    # a prompt that fits, but not with all its output: cut short ("length"), as at the model length
    engine.add_request("edge", prompts(1, [370], vocab)[0], SamplingParams(max_tokens=50, **GREEDY))
    out = run_all(engine)["edge"][-1]
    assert out.finish_reason == "length" and len(out.token_ids) == 378 - 370
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


# -- out of memory in a step -----------------------------------------------------------------------


def out_of_memory_above(engine: LLMEngine, num_seqs: int, error: Exception) -> list[int]:
    """The engine's forward pass raises `error` when a step has more than `num_seqs` sequences."""
    calls = []
    forward = engine.model.forward_paged

    def forward_or_oom(tokens, batch, cache):
        calls.append(batch.num_seqs)
        if batch.num_seqs > num_seqs:
            raise error
        return forward(tokens, batch, cache)

    engine.model.forward_paged = forward_or_oom
    return calls


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"
        ),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_runs_the_step_again_in_halves(model, restore_forward, error, caplog):
    vocab = model.config.vocab_size
    ids = prompts(7, [5, 30, 12, 60], vocab)
    params = SamplingParams(max_tokens=10, **GREEDY)
    config = EngineConfig(max_num_seqs=8, block_size=4, num_kv_blocks=512)
    free = LLMEngine(model, None, config)
    for i, p in enumerate(ids):
        free.add_request(str(i), p, params)
    want = tokens_of(run_all(free))

    engine = LLMEngine(model, None, config)
    calls = out_of_memory_above(engine, 2, error)
    for i, p in enumerate(ids):
        engine.add_request(str(i), p, params)
    with caplog.at_level(logging.WARNING, logger="model_runtime.engine.core"):
        outs = run_all(engine)
    assert tokens_of(outs) == want  # nobody failed, nothing changed
    assert max(calls) == 7 and "running them again in halves" in caplog.text
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_out_of_memory_in_a_long_prefill_chunk_runs_shorter_chunks(model, restore_forward):
    vocab = model.config.vocab_size
    ids = prompts(3, [90, 40, 70], vocab)
    params = SamplingParams(max_tokens=6, **GREEDY)
    config = EngineConfig(max_num_seqs=4, block_size=4, num_kv_blocks=256)
    free = LLMEngine(model, None, config)
    for i, p in enumerate(ids):
        free.add_request(str(i), p, params)
    want = tokens_of(run_all(free))

    engine = LLMEngine(model, None, config)
    forward = model.forward_paged
    sizes = []

    def oom_above_16_tokens(tokens, batch, cache):
        if batch.num_tokens > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        sizes.append(batch.num_tokens)
        return forward(tokens, batch, cache)

    model.forward_paged = oom_above_16_tokens
    for i, p in enumerate(ids):
        engine.add_request(str(i), p, params)
    assert tokens_of(run_all(engine)) == want
    assert max(sizes) <= 16


def test_out_of_memory_alone_fails_only_that_request(model, restore_forward):
    vocab = model.config.vocab_size
    engine = AsyncEngine(model, None, EngineConfig(max_num_seqs=8, block_size=4, num_kv_blocks=512))
    forward = model.forward_paged

    def oom_on_long_contexts(tokens, batch, cache):
        if int(batch.context_lens.max()) > 100:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(tokens, batch, cache)

    model.forward_paged = oom_on_long_contexts
    long, *short = prompts(5, [120, 20, 30, 25, 20], vocab)
    params = SamplingParams(max_tokens=12, **GREEDY)

    async def collect(rid, prompt):
        try:
            async for out in engine.generate(prompt, params, request_id=rid):
                last = out
            return last
        except Exception as e:
            return e

    async def main():
        await engine.start()
        try:
            results = await asyncio.gather(
                collect("long", long), *(collect(f"short-{i}", p) for i, p in enumerate(short))
            )
            after = await collect("after", short[0])  # the engine serves on
            return results, after
        finally:
            await engine.stop()

    (failed, *served), after = asyncio.run(main())
    assert isinstance(failed, EngineFailed), failed
    # its prefill ran in shorter chunks until one token over 101 did not fit
    assert "out of memory" in str(failed) and "context of 101 tokens" in str(failed)
    assert all(out.finish_reason == "length" and len(out.token_ids) == 12 for out in served), served
    assert after.finish_reason == "length" and after.token_ids == served[0].token_ids
    assert engine.engine.blocks.num_free_blocks == engine.engine.blocks.num_blocks


def test_out_of_memory_stays_fatal_in_a_distributed_replica(model, restore_forward):
    engine = LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=64))

    class Comm:  # a replica's comm as rank 0 sees it: the followers would be inside the step
        def send_step(self, tokens, batch):
            pass

    engine.comm = Comm()
    out_of_memory_above(engine, 0, torch.OutOfMemoryError("CUDA out of memory"))
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()


# -- the server ------------------------------------------------------------------------------------


def test_server_refuses_a_prompt_too_long_for_the_budget_and_serves_the_rest(server_process):
    server = server_process(  # float32: the sizes below are its (512-byte tokens)
        "--dtype", "float32", "--max-step-attention-memory", "256Ki", "--kv-cache-memory", "4Mi", "--seed", "0"
    )
    base = server.base_url
    try:
        results = {}

        def short():
            body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
            results["short"] = httpx.post(f"{base}/v1/completions", json=body, timeout=60)

        thread = threading.Thread(target=short)
        thread.start()
        long = {"model": MODEL_NAME, "prompt": "x" * 600, "max_tokens": 4}
        r = httpx.post(f"{base}/v1/completions", json=long, timeout=60)
        thread.join(60)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "601 tokens" in message and "--max-step-attention-memory" in message and "378" in message
        r = httpx.post(f"{base}/v2/models/{MODEL_NAME}/generate", json={"text_input": "x" * 600}, timeout=60)
        assert r.status_code == 400 and "601 tokens" in r.text
        assert results["short"].status_code == 200, results["short"].text
        assert results["short"].json()["choices"][0]["finish_reason"] == "length"

        # capacity: 4 MiB of 512-byte tokens
        metrics = httpx.get(f"{base}/metrics").text
        assert f'moe_kv_cache_capacity_tokens{{model_name="{MODEL_NAME}"}} 8192.0' in metrics
    finally:
        assert server.stop() == 0
    logs = server.logs()
    assert "KV cache: 512 blocks of 16 tokens = 8192 tokens, 4 MiB (--kv-cache-memory 4 MiB)" in logs
    assert "up to 378 tokens" in logs


def test_two_cpu_ranks_in_one_pod_size_from_their_share_and_agree(server_process):
    """Each rank sizes its cache from half the host's available memory (1% of it, so that this
    costs at most 2% of the host), after every rank has loaded; rank 0 takes the fewest blocks."""
    server = server_process(
        *("--device", "cpu", "--tensor-parallel-size", "2", "--max-model-len", "256"),
        *("--gpu-memory-utilization", "0.01", "--max-step-attention-memory", "1Mi"),
        model="builtin:tiny-deepseek-v3",
    )
    try:
        body = {"model": "tiny-deepseek-v3", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
        r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        metrics = httpx.get(f"{server.base_url}/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("moe_kv_cache_capacity_tokens{"))
        capacity = int(float(line.rsplit(" ", 1)[1]))
    finally:
        assert server.stop() == 0, server.logs()
    logs = server.logs()
    rooms = {}
    for rank in (0, 1):
        line = next(x for x in logs.splitlines() if f"rank {rank}: room for" in x)
        assert "0.01 x (" in line and "/ 2 ranks" in line, line
        rooms[rank] = int(line.split("room for ")[1].split()[0])
    assert capacity == min(rooms.values()) * 16 > 0
    assert f"KV cache: {min(rooms.values())} blocks of 16 tokens = {capacity} tokens" in logs
