"""The engine on the builtin tiny models: batching never changes greedy results, preemption is
invisible, seeded sampling repeats, stop strings, length errors."""

import pytest
import torch

from model_runtime import load_model, load_tokenizer
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import EngineError, SamplingParams

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: OpenMP hand-offs between threads cost more than the matmuls (and the machine
    is shared), so one intra-op thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MODELS = ["builtin:tiny-deepseek-v3", "builtin:tiny-mixtral", "builtin:tiny-qwen3-moe"]


@pytest.fixture(scope="module", params=MODELS)
def model_src(request):
    return request.param


@pytest.fixture(scope="module")
def model(model_src):
    torch.manual_seed(0)
    return load_model(model_src, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(model_src):
    return load_tokenizer(model_src)


def mixed_prompts(vocab: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (int(2 + (i * 13) % 40),), generator=g).tolist() for i in range(n)]


def reference_greedy(model, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """Greedy decoding by recomputing whole sequences with model.forward (no cache), all at once:
    right padding cannot change a causal model's logits at the real positions."""
    seqs = [list(p) for p in prompts]
    with torch.inference_mode():
        for step in range(max(max_tokens)):
            live = [i for i, m in enumerate(max_tokens) if step < m]
            width = max(len(seqs[i]) for i in live)
            ids = torch.tensor([seqs[i] + [0] * (width - len(seqs[i])) for i in live])
            logits = model(ids)  # [B, T, V]
            for row, i in enumerate(live):
                seqs[i].append(int(logits[row, len(seqs[i]) - 1].argmax()))
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


def run_all(engine: LLMEngine, max_steps: int = 5000) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not finish")


def generate_alone(model, prompt, params, **config) -> list[int]:
    engine = LLMEngine(model, None, EngineConfig(**config))
    engine.add_request("alone", prompt, params)
    return run_all(engine)["alone"][-1].token_ids


@pytest.mark.parametrize("pool", ["roomy", "preempting"])
def test_16_concurrent_greedy_requests_match_alone_and_full_recompute(model, pool):
    vocab = model.config.vocab_size
    prompts = mixed_prompts(vocab, 16)
    max_tokens = [4 + (i * 5) % 13 for i in range(16)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    config = dict(block_size=4, max_num_batched_tokens=64, max_num_seqs=16)
    if pool == "preempting":  # far fewer blocks than 16 sequences of up to ~57 tokens need
        config["num_kv_blocks"] = 40
    engine = LLMEngine(model, None, EngineConfig(**config))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params[i])
    outs = run_all(engine)
    if pool == "preempting":
        assert engine.num_preemptions > 0
    assert engine.blocks.usage == 0.0
    expected = reference_greedy(model, prompts, max_tokens)
    for i in (0, 5, 11):  # each alone in the engine: spot-check three (slow)
        assert outs[str(i)][-1].token_ids == generate_alone(model, prompts[i], params[i], block_size=4)
    for i in range(16):
        final = outs[str(i)][-1]
        assert final.finish_reason == "length" and len(final.token_ids) == max_tokens[i]
        assert final.token_ids == expected[i], f"request {i}"


def test_seeded_sampling_repeats_whatever_shares_the_batch(model):
    vocab = model.config.vocab_size
    prompt = mixed_prompts(vocab, 1)[0]
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.95, seed=7, ignore_eos=True)
    alone = generate_alone(model, prompt, params, block_size=4)
    engine = LLMEngine(model, None, EngineConfig(block_size=4))
    engine.add_request("x", prompt, params)
    for i, p in enumerate(mixed_prompts(vocab, 6)):
        engine.add_request(f"o{i}", p, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
    assert run_all(engine)["x"][-1].token_ids == alone


def test_prompt_longer_than_the_model_is_refused_clearly(model):
    engine = LLMEngine(model, None, EngineConfig(max_model_len=32))
    with pytest.raises(EngineError, match="model length is 32"):
        engine.add_request("long", list(range(3, 40)), SamplingParams())
    engine.add_request(
        "ok", list(range(3, 30)), SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    )
    final = run_all(engine)["ok"][-1]
    assert len(final.token_ids) == 32 - 27 and final.finish_reason == "length"  # clamped


def test_stop_string_ends_the_text(model, tokenizer):
    prompt = tokenizer.encode("The quick brown fox")
    greedy = reference_greedy(model, [prompt], [24])[0]
    text = tokenizer.decode(greedy)
    # random weights emit arbitrary bytes: stop at the first two clean characters after the start
    k = next((k for k in range(3, len(text) - 1) if "\ufffd" not in text[k : k + 2]), None)
    if k is None:
        pytest.skip("the random model produced no two clean characters")
    stop = text[k : k + 2]
    engine = LLMEngine(model, tokenizer, EngineConfig())
    engine.add_request("s", "The quick brown fox", SamplingParams(max_tokens=24, temperature=0, stop=[stop]))
    outs = run_all(engine)["s"]
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].text == text[: text.index(stop)]
    assert "".join(o.new_text for o in outs) == outs[-1].text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_engine_streams_tokens(dtype):
    model = load_model("builtin:tiny-mixtral", dtype=dtype).eval()
    engine = LLMEngine(model, None, EngineConfig(block_size=4, kv_cache_memory_bytes=2**20))
    assert engine.kv_cache[0].dtype == dtype
    for i in range(4):
        engine.add_request(
            str(i), [5 + i, 6, 7], SamplingParams(max_tokens=6, temperature=0.7, seed=i, ignore_eos=True)
        )
    outs = run_all(engine)
    assert all(len(outs[str(i)][-1].token_ids) == 6 for i in range(4))
