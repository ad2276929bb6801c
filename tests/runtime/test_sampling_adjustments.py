"""Penalties, min_p and logit_bias, with vLLM's and OpenAI's meanings: the sampler's arithmetic
against transformers' logits processors, and what a client sees through the `openai` SDK and the
KServe generate endpoint."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from model_runtime.engine.requests import SamplingParams
from model_runtime.engine.sampling import SampleRow, adjust_logits, sample

pytestmark = pytest.mark.runtime
transformers = pytest.importorskip("transformers")

MODEL_NAME = "tiny-mixtral"


def row(params: SamplingParams, prompt=(), output=(), temperature=0.0) -> SampleRow:
    return SampleRow(temperature, 1.0, 0, None, None, min_p=params.min_p, params=params,
                     prompt_ids=list(prompt), output_ids=list(output))


def test_repetition_penalty_is_transformers_and_vllms():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    prompt, output = [3, 7, 7, 11], [20, 3]
    got = adjust_logits(logits, [row(SamplingParams(repetition_penalty=1.3), prompt, output)])
    want = transformers.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(got, want)


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 10)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = adjust_logits(logits, [row(params, prompt=[1, 1, 1], output=[4, 4, 4, 6])])[0]
    assert got[4].item() == pytest.approx(-(0.5 * 3 + 0.25))
    assert got[6].item() == pytest.approx(-(0.5 + 0.25))
    assert got[1].item() == 0.0  # a prompt token is not penalised (OpenAI's definition)
    assert logits.abs().sum() == 0  # the model's logits are not changed (logprobs report them)


def test_logit_bias_min_p_and_a_batch_of_mixed_rows():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    biased = SamplingParams(temperature=0, logit_bias={3: 100.0})
    plain = SamplingParams(temperature=0)
    result = sample(logits, [row(biased), SampleRow(0.0, 1.0, 0, None, None)])
    assert result.token_ids == [3, 0]   # only the biased row moves
    # min_p 0.5: only tokens at least half as likely as the best survive (0 and 1), for any seed
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        r = SampleRow(1.0, 1.0, 0, g, None, min_p=0.5)
        seen.add(sample(logits[:1], [r]).token_ids[0])
    assert seen == {0, 1}
    assert plain.adjusts_logits is False and biased.adjusts_logits is True


@pytest.fixture(scope="module")
def client(runtime_server):
    return openai.OpenAI(base_url=f"{runtime_server.base_url}/v1", api_key="none", max_retries=0)


def test_logit_bias_through_the_openai_sdk_forces_and_bans_tokens(client, runtime_server):
    def text_of(ids):
        return httpx.post(f"{runtime_server.base_url}/detokenize", json={"tokens": ids}).json()["prompt"]

    def greedy(bias):
        out = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=6, temperature=0,
                                        logit_bias=bias, extra_body={"ignore_eos": True})
        return out.choices[0].text

    assert greedy({"42": 100, "43": 99}) == text_of([42] * 6)   # forced
    assert greedy({"42": -100, "43": 100}) == text_of([43] * 6)  # 42 banned, 43 forced


def test_a_frequency_penalty_makes_greedy_text_repeat_less(client):
    def distinct(**extra):
        out = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True, **extra}, logprobs=0)
        ids = [t for t in out.choices[0].logprobs.tokens]
        return len(set(ids)), len(ids)

    plain, n = distinct()
    penalised, m = distinct(frequency_penalty=2.0)
    assert n == m == 40 and penalised > plain


def test_penalties_through_kserve_generate(runtime_server):
    body = {"text_input": "abc", "sampling_parameters": {"max_tokens": 8, "temperature": 0,
                                                          "repetition_penalty": 1.5, "logit_bias": {"42": 100},
                                                          "ignore_eos": True}}
    r = httpx.post(f"{runtime_server.base_url}/v2/models/{MODEL_NAME}/generate", json=body)
    assert r.status_code == 200, r.text
    bad = httpx.post(f"{runtime_server.base_url}/v2/models/{MODEL_NAME}/generate",
                     json={"text_input": "abc", "sampling_parameters": {"min_p": 2}})
    assert bad.status_code == 400 and "min_p" in bad.text


def test_n_choices_each_seeded_and_counted(client):
    out = client.completions.create(model=MODEL_NAME, prompt="once", max_tokens=8, temperature=1.0, seed=7, n=3,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.text for c in out.choices]
    assert len(set(texts)) > 1  # three different draws
    again = client.completions.create(model=MODEL_NAME, prompt="once", max_tokens=8, temperature=1.0, seed=7, n=3,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == texts  # and each reproducible
    assert out.usage.completion_tokens == 24 and out.usage.total_tokens == out.usage.prompt_tokens + 24
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, n=2, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same


def test_a_client_that_disconnects_frees_its_slot_at_once(runtime_server):
    """A non-streaming request whose client goes away is aborted in the engine (counted as
    cancelled), not run to its max_tokens for nobody."""
    import socket
    import time

    def metric(prefix):
        text = httpx.get(f"{runtime_server.base_url}/metrics").text
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix))

    def running():
        return metric("moe_num_requests_running{")

    succeeded = metric("moe_request_success_total{")
    cancelled = metric('moe_request_failure_total{model_name="tiny-mixtral",reason="cancelled"}')
    body = json.dumps({"model": MODEL_NAME, "prompt": "go", "max_tokens": 240, "ignore_eos": True,
                       "temperature": 0}).encode()
    host, port = runtime_server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 10
    while running() < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    sock.close()  # the client goes away without reading its answer
    started = time.monotonic()
    while running() > 0:
        assert time.monotonic() - started < 2.0, "the engine kept running a request nobody will read"
        time.sleep(0.01)
    time.sleep(0.2)
    assert metric("moe_request_success_total{") == succeeded  # it did not run to its 240 tokens
    assert metric('moe_request_failure_total{model_name="tiny-mixtral",reason="cancelled"}') == cancelled + 1


def test_streamed_n_choices_are_the_unstreamed_ones(server_process):
    """Seeded choices are the same streamed or not, bit for bit in float32. (In bfloat16, the CPU's
    default, the second request's prefix-cache hit computes fewer positions afresh, and rounding can
    tip a sampled token: docs/openai.md.)"""
    server = server_process("--max-model-len", "256", "--dtype", "float32")
    try:
        _streamed_n_choices_are_the_unstreamed_ones(
            openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0))
    finally:
        server.stop()


def _streamed_n_choices_are_the_unstreamed_ones(client):
    kwargs = dict(model=MODEL_NAME, prompt="once", max_tokens=8, temperature=1.0, seed=11, n=3,
                  extra_body={"ignore_eos": True})
    whole = [c.text for c in client.completions.create(**kwargs).choices]
    texts, finished, usage = {}, set(), None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
        usage = chunk.usage or usage
    assert [texts[i] for i in range(3)] == whole and finished == {0, 1, 2}
    assert usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, n=2, temperature=0, stream=True)
    indices = {c.index for chunk in chat for c in chunk.choices}
    assert indices == {0, 1}
