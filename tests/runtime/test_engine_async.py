"""The engine fronts: streaming from a step loop in a background thread (AsyncEngine) or in a child
process (EngineProcess); concurrency, cancellation, shutdown. Each test runs against both."""

import asyncio

import pytest
import torch

from model_runtime import load_model, load_tokenizer
from model_runtime.engine.async_engine import AsyncEngine
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.messages import EngineSpec
from model_runtime.engine.process import EngineProcess
from model_runtime.engine.requests import EngineError, EngineOverloaded, SamplingParams

pytestmark = pytest.mark.runtime

SRC = "builtin:tiny-mixtral"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return load_model(SRC, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SRC)


@pytest.fixture(params=["thread", "process"])
def make_engine(request, model, tokenizer):
    """An engine front of each kind over the same model and settings (not started)."""

    def make(config: EngineConfig):
        if request.param == "thread":
            return AsyncEngine(model, tokenizer, config)
        return EngineProcess(EngineSpec(SRC, "float32", "cpu", config, num_threads=1), tokenizer)

    return make


@pytest.fixture
async def engine(make_engine):
    eng = make_engine(EngineConfig(max_num_seqs=8, block_size=4, num_kv_blocks=128))
    await eng.start()
    yield eng
    await eng.stop(drain_timeout=0)


async def collect(engine, prompt, params, request_id=None):
    return [o async for o in engine.generate(prompt, params, request_id=request_id)]


async def test_stream_delivers_one_token_per_output_and_matches_the_sync_engine(engine, model, tokenizer):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = await collect(engine, "Hello there", params)
    assert all(o.new_token_ids for o in outs) and sum(len(o.new_token_ids) for o in outs) == 10
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert outs[0].first_token_time >= outs[0].arrival_time
    assert outs[-1].prompt_token_ids == tokenizer.encode("Hello there")


async def test_a_reader_that_falls_behind_gets_what_queued_up_as_one_output(engine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    outs = []
    async for out in engine.generate("Hello there", params):
        outs.append(out)
        if len(outs) == 1:
            await asyncio.sleep(1.0)  # the engine runs on; its outputs queue up meanwhile
    assert len(outs) < 12 and max(len(o.new_token_ids) for o in outs) > 1
    assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert sum(len(o.logprobs) for o in outs) == 12
    assert outs[-1].finished and outs[-1].finish_reason == "length"


async def test_concurrent_streams_equal_sequential_runs(engine, model):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5 + i, 17, 30 + 2 * i] * (1 + i % 3) for i in range(12)]
    alone = [(await collect(engine, p, params))[-1].token_ids for p in prompts[:3]]
    together = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    assert [outs[-1].token_ids for outs in together[:3]] == alone
    assert all(len(outs[-1].token_ids) == 8 for outs in together)


async def test_leaving_the_stream_aborts_and_frees_blocks(engine):
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    stream = engine.generate([7, 8, 9] * 10, params)
    first = await anext(stream)
    assert not first.finished
    assert engine.stats().kv_cache_usage > 0
    await stream.aclose()
    await _until(lambda: engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0)


async def test_task_cancellation_aborts_the_request(engine):
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0)


async def test_abort_by_id_ends_the_stream_with_reason_abort(engine):
    outs = []
    async for o in engine.generate([4, 5], SamplingParams(max_tokens=500, ignore_eos=True), request_id="r1"):
        outs.append(o)
        if len(outs) == 2:
            engine.abort("r1")
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert engine.stats().kv_cache_usage == 0


async def test_bad_requests_raise_at_once(engine):
    with pytest.raises(EngineError, match="model length"):
        engine.generate([1] * (engine.max_model_len + 5), SamplingParams())
    with pytest.raises(EngineError, match="temperature"):
        engine.generate("hi", SamplingParams(temperature=-1))
    with pytest.raises(EngineError, match="empty"):
        engine.generate("", SamplingParams())
    # the engine still serves
    assert (await collect(engine, "hi", SamplingParams(max_tokens=2, ignore_eos=True)))[-1].finished


async def test_stats_and_expert_counts(engine):
    await collect(engine, "count experts", SamplingParams(max_tokens=3, ignore_eos=True))
    s = engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0
    assert s.expert_tokens and all(sum(c) > 0 for c in s.expert_tokens.values())


async def test_overload_stop_and_warmup(make_engine):
    eng = make_engine(EngineConfig(max_num_seqs=1, max_waiting=1, num_kv_blocks=64))
    with pytest.raises(EngineOverloaded, match="not running"):
        eng.generate("x", SamplingParams())
    await eng.warmup()  # starts the engine
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    first = eng.generate([1, 2], long)
    await anext(first)  # running
    waiting_task = asyncio.create_task(collect(eng, [5, 6], long))
    await _until(lambda: eng.stats().num_waiting == 1)
    with pytest.raises(EngineOverloaded, match="waiting"):
        eng.generate([7], long)
    await eng.stop(drain_timeout=0)  # aborts what is in flight, joins the thread
    assert (await waiting_task)[-1].finish_reason == "abort"
    rest = [o async for o in first]  # tokens streamed before the abort, then the abort
    assert rest[-1].finish_reason == "abort" and all(not o.finished for o in rest[:-1])
    with pytest.raises(EngineOverloaded, match="shutting down"):
        eng.generate("x", SamplingParams())
    assert not eng.is_running


async def test_stop_drains_requests_in_flight(make_engine):
    eng = make_engine(EngineConfig(num_kv_blocks=64))
    await eng.start()
    task = asyncio.create_task(collect(eng, "drain me", SamplingParams(max_tokens=6, ignore_eos=True)))
    await _until(lambda: eng.stats().num_running + eng.stats().num_waiting > 0 or task.done())
    await eng.stop(drain_timeout=30)
    outs = await task
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 6


async def _until(predicate, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_many_streams_with_random_aborts_leave_no_blocks_behind(make_engine):
    import random

    eng = make_engine(EngineConfig(max_num_seqs=8, block_size=4, num_kv_blocks=48, max_num_batched_tokens=32))
    await eng.start()
    rng = random.Random(3)

    async def one(i: int):
        params = SamplingParams(
            max_tokens=rng.randrange(1, 30), temperature=rng.choice([0, 0.8]), ignore_eos=True
        )
        stop_after = rng.choice([None, 1, 3])
        n = 0
        async for _ in eng.generate([3 + i % 50] * rng.randrange(1, 40), params, request_id=f"s{i}"):
            n += 1
            if stop_after == n:
                if i % 2:
                    eng.abort(f"s{i}")
                else:
                    break
        return n

    counts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(48))), 120)
    assert all(n >= 1 for n in counts)
    await _until(lambda: eng.stats().kv_cache_usage == 0 and eng.stats().num_running == 0)
    assert eng.stats().num_waiting == 0
    if isinstance(eng, AsyncEngine):
        assert not eng.engine.requests
    await eng.stop(drain_timeout=0)
