"""Prompt logprobs in the engine: each prompt token's logprob given its prefix equals the
log-softmax of the model's full-sequence logits, through chunked prefill and preemption (whose
recomputation never repeats an entry), and asking for them changes no generated token."""

import pytest
import torch

from model_runtime import load_model
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import EngineError, SamplingParams

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["builtin:tiny-mixtral", "builtin:tiny-deepseek-v3"])
def model(request):
    return load_model(request.param, dtype=torch.float32).eval()


def prompts(vocab: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (int(3 + (i * 11) % 37),), generator=g).tolist() for i in range(n)]


def run_all(engine: LLMEngine, max_steps: int = 5000) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not finish")


def reference(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over the whole prompt, no cache: [T, V]."""
    with torch.inference_mode():
        return model(torch.tensor([prompt]))[0].float().log_softmax(-1)


def check_entries(entries, prompt, ref, k):
    assert len(entries) == len(prompt) and entries[0] is None
    for p in range(1, len(prompt)):
        e, row = entries[p], ref[p - 1]
        assert e["token_id"] == prompt[p]
        assert e["logprob"] == pytest.approx(float(row[prompt[p]]), abs=1e-4)
        assert e["rank"] == int((row > row[prompt[p]]).sum()) + 1
        top = row.topk(k)
        assert list(e["top"]) == top.indices.tolist()
        assert list(e["top"].values()) == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("pool", ["roomy", "chunked", "preempting"])
def test_prompt_logprobs_equal_the_full_sequence_log_softmax(model, pool):
    vocab = model.config.vocab_size
    ps = prompts(vocab, 12)
    config = dict(block_size=4, max_num_batched_tokens=64, max_num_seqs=12)
    if pool == "chunked":  # prompts of up to 39 tokens in chunks of at most 7
        config["max_num_batched_tokens"] = 7
    if pool == "preempting":  # far fewer blocks than 12 sequences of up to ~55 tokens need
        config["num_kv_blocks"] = 30
    engine = LLMEngine(model, None, EngineConfig(**config))
    plain = LLMEngine(model, None, EngineConfig(block_size=4))
    for i, p in enumerate(ps):
        k = i % 4  # 0: the prompt token's own logprob only
        engine.add_request(str(i), p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                     prompt_logprobs=k, logprobs=1 if i % 2 else None))
        plain.add_request(str(i), p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    outs, plain_outs = run_all(engine), run_all(plain)
    if pool == "preempting":
        assert engine.num_preemptions > 0
    assert engine.blocks.usage == 0.0
    for i, p in enumerate(ps):
        got = [o.prompt_logprobs for o in outs[str(i)] if o.prompt_logprobs is not None]
        assert len(got) == 1 and outs[str(i)][0].prompt_logprobs is not None  # once, with the first output
        check_entries(got[0], p, reference(model, p), i % 4)
        # asking for prompt logprobs changes no generated token
        assert outs[str(i)][-1].token_ids == plain_outs[str(i)][-1].token_ids


def test_a_one_token_prompt_has_one_null_entry_and_bad_values_are_refused(model):
    engine = LLMEngine(model, None, EngineConfig(block_size=4))
    engine.add_request("one", [7], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    assert run_all(engine)["one"][0].prompt_logprobs == [None]
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(EngineError, match="prompt_logprobs"):
            engine.add_request("bad", [7, 8], SamplingParams(prompt_logprobs=bad))


def test_a_request_for_prompt_logprobs_takes_no_prefix_cache_hits(model):
    """Its prompt's blocks are cached by an earlier request: it still computes (and reports) every
    prompt position."""
    prompt = prompts(model.config.vocab_size, 3)[2]  # 25 tokens: six full blocks of 4
    engine = LLMEngine(model, None, EngineConfig(block_size=4))
    engine.add_request("warm", prompt, SamplingParams(max_tokens=2, temperature=0))
    run_all(engine)
    engine.add_request("again", prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))
    check_entries(run_all(engine)["again"][0].prompt_logprobs, prompt, reference(model, prompt), 1)
