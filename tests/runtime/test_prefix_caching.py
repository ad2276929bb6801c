"""Automatic prefix caching in the engine: the same tokens with it on and off (greedy and seeded,
with and without preemption), hits counted in tokens, reuse of a previous turn's answer, the
least recently used prefix evicted first, a request that skips the cache, and /metrics."""

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model_runtime import load_model
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import SamplingParams
from model_runtime.serving import metrics

pytestmark = pytest.mark.runtime

MODELS = ["builtin:tiny-deepseek-v3", "builtin:tiny-mixtral", "builtin:tiny-qwen3-moe"]
BLOCK = 4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(0)
    return load_model(request.param, dtype=torch.float32).eval()


def random_tokens(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def shared_prefix_prompts(vocab: int, n: int) -> list[list[int]]:
    """n prompts behind one 37-token system prompt (9 full blocks of 4 and one token), some
    sharing a second part too."""
    system = random_tokens(vocab, 37, 1)
    return [system + random_tokens(vocab, 3 + (i * 7) % 19, 100 + i % 5) for i in range(n)]


def engine(model, on: bool, **config) -> LLMEngine:
    config = {"block_size": BLOCK, "max_num_batched_tokens": 64, "max_num_seqs": 8, **config}
    return LLMEngine(model, None, EngineConfig(enable_prefix_caching=on, **config))


def run(engine: LLMEngine, prompts, params, stagger: int = 2) -> dict[str, list[int]]:
    """Add the requests `stagger` steps apart (later ones find the earlier ones' blocks cached),
    then step until done; each request's generated tokens."""
    outs: dict[str, list[int]] = {}

    def step():
        for o in engine.step():
            outs[o.request_id] = o.token_ids

    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params[i])
        for _ in range(stagger):
            step()
    for _ in range(5000):
        if not engine.has_unfinished():
            assert engine.blocks.usage == 0.0  # cached blocks left behind count as free
            return outs
        step()
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("pool", ["roomy", "preempting"])
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_outputs_are_the_same_with_and_without_prefix_caching(model, pool, sampling):
    prompts = shared_prefix_prompts(model.config.vocab_size, 10)
    params = [
        SamplingParams(max_tokens=8 + i % 7, ignore_eos=True, temperature=0.0)
        if sampling == "greedy"
        else SamplingParams(max_tokens=8 + i % 7, ignore_eos=True, temperature=0.9, top_k=30, seed=i)
        for i in range(len(prompts))
    ]
    # preempting: 24 blocks of 4 tokens, for up to 8 sequences of 48 to 72 tokens
    config = {"num_kv_blocks": 24} if pool == "preempting" else {}
    cached, plain = engine(model, True, **config), engine(model, False, **config)
    with_cache, without = run(cached, prompts, params), run(plain, prompts, params)
    assert with_cache == without
    stats = cached.stats()
    assert stats.prefix_cache_hits >= 9 * 36  # each later prompt finds at least the system prompt's 9 blocks
    assert plain.stats().prefix_cache_queries == plain.stats().prefix_cache_hits == 0
    if pool == "preempting":
        assert cached.num_preemptions > 0 and plain.num_preemptions > 0


def test_hits_are_counted_in_tokens_and_the_last_token_is_computed(model):
    vocab = model.config.vocab_size
    e = engine(model, True)
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt = random_tokens(vocab, 4 * BLOCK, 2)  # 4 full blocks
    run(e, [prompt], [greedy])
    assert (e.stats().prefix_cache_queries, e.stats().prefix_cache_hits) == (16, 0)
    # the same prompt: 3 blocks are reused; the last block is computed again for the logits
    again = run(e, [prompt], [greedy])
    assert (e.stats().prefix_cache_queries, e.stats().prefix_cache_hits) == (32, 12)
    # a longer prompt behind it: the 4 blocks now, not the partial one
    run(e, [prompt + [5, 6, 7]], [greedy])
    assert (e.stats().prefix_cache_queries, e.stats().prefix_cache_hits) == (32 + 19, 12 + 16)
    assert again == run(engine(model, False), [prompt], [greedy])


def test_the_next_turn_reuses_the_previous_answer(model):
    """Multi-turn chat: the next prompt is the previous prompt, its answer and a new message;
    the answer's blocks (computed while decoding) are found too."""
    vocab = model.config.vocab_size
    e = engine(model, True)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    turn1 = random_tokens(vocab, 10, 3)
    answer = run(e, [turn1], [greedy])["0"]
    turn2 = turn1 + answer + random_tokens(vocab, 5, 4)
    hits_before = e.stats().prefix_cache_hits
    reply = run(e, [turn2], [greedy])
    # 10 + 12 tokens: 21 of them computed (the last answer token never is), 5 full blocks
    assert e.stats().prefix_cache_hits - hits_before == 5 * BLOCK
    assert reply == run(engine(model, False), [turn2], [greedy])


def test_the_least_recently_used_prefix_is_evicted_first(model):
    vocab = model.config.vocab_size
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    # 12 blocks: three 3-block prefixes (+1 token) stay cached after they finish
    e = engine(model, True, num_kv_blocks=12)
    a, b, c = (random_tokens(vocab, 3 * BLOCK + 1, s) for s in (10, 11, 12))
    for p in (a, b, c):
        run(e, [p], [greedy])
    assert e.blocks.num_cached_blocks == 9 and e.blocks.usage == 0.0
    run(e, [a], [greedy])  # a is used again: b is now the least recently used
    # a 5-block prompt: 3 blocks are free, 2 must be evicted, from b (the later block of b first)
    run(e, [random_tokens(vocab, 5 * BLOCK - 1, 13)], [greedy])

    def hits_of(prompt) -> int:
        before = e.stats().prefix_cache_hits
        run(e, [prompt], [greedy])
        return e.stats().prefix_cache_hits - before

    assert hits_of(c) == 3 * BLOCK
    assert hits_of(a) == 3 * BLOCK
    assert hits_of(b) == 1 * BLOCK  # its first block survived


def test_a_request_can_skip_the_cache(model):
    vocab = model.config.vocab_size
    e = engine(model, True)
    prompt = random_tokens(vocab, 5 * BLOCK, 5)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = run(e, [prompt], [greedy])
    skip = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, skip_reading_prefix_cache=True)
    assert run(e, [prompt], [skip]) == first
    assert e.stats().prefix_cache_hits == 0 and e.stats().prefix_cache_queries == 20
    run(e, [prompt], [greedy])
    assert e.stats().prefix_cache_hits == 4 * BLOCK


def test_skip_reading_prefix_cache_must_be_a_boolean():
    with pytest.raises(ValueError, match="skip_reading_prefix_cache"):
        SamplingParams(skip_reading_prefix_cache="yes").validate(100)


# -- through the server -------------------------------------------------------------------------


def scrape(base_url: str, name: str) -> float:
    """The value of counter `name`, which carries the label model_name alone."""
    samples = [
        sample
        for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
        for sample in family.samples
        if sample.name == name
    ]
    assert [s.labels for s in samples] == [{"model_name": "tiny-mixtral"}]
    return samples[0].value


def complete(base_url: str, prompt: list[int]) -> dict:
    r = httpx.post(
        f"{base_url}/v1/completions",
        json={"model": "tiny-mixtral", "prompt": prompt, "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_metrics_count_shared_prefix_hits_in_tokens(runtime_server, server_process):
    """Three requests behind one 70-token prefix (block size 16: 4 full blocks) on the default
    server; the same requests on a server started with --no-enable-prefix-caching."""
    prefix = random_tokens(300, 70, 7)
    prompts = [prefix + random_tokens(300, 5, 20 + i) for i in range(3)]
    base = runtime_server.base_url
    queries, hits = (scrape(base, m) for m in (metrics.PREFIX_CACHE_QUERIES, metrics.PREFIX_CACHE_HITS))
    texts = [complete(base, p)["choices"][0]["text"] for p in prompts]
    assert scrape(base, metrics.PREFIX_CACHE_QUERIES) - queries == 3 * 75
    assert scrape(base, metrics.PREFIX_CACHE_HITS) - hits == 2 * 64  # the first computed them

    plain = server_process("--no-enable-prefix-caching", "--max-model-len", "256")
    try:
        assert [complete(plain.base_url, p)["choices"][0]["text"] for p in prompts] == texts
        assert scrape(plain.base_url, metrics.PREFIX_CACHE_HITS) == 0
        assert scrape(plain.base_url, metrics.PREFIX_CACHE_QUERIES) == 0
    finally:
        assert plain.stop() == 0, plain.logs()
