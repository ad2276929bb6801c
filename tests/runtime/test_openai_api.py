"""The OpenAI-compatible API with the `openai` package: completions and chat, streamed and not."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"  # the served name of builtin:tiny-mixtral, conftest's model

GREEDY = {"temperature": 0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(runtime_server):
    with openai.OpenAI(base_url=f"{runtime_server.base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]


def test_completion_streamed_equals_non_streamed(client):
    full = client.completions.create(model=MODEL_NAME, prompt="Mixture of experts", **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.completion_tokens == 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + 10

    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt="Mixture of experts",
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_from_token_ids_with_logprobs_and_echo(client):
    result = client.completions.create(
        model=MODEL_NAME, prompt=[72, 105, 33], logprobs=2, echo=True, **GREEDY
    )
    choice = result.choices[0]
    assert result.usage.prompt_tokens == 3
    assert choice.text.startswith("Hi!")
    # echoed: the prompt's 3 tokens (the first without a logprob) then the 10 generated
    assert choice.logprobs.tokens[:3] == ["H", "i", "!"]
    assert len(choice.logprobs.tokens) == 13 == len(choice.logprobs.token_logprobs)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])  # keyed by text: may collide
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])


def test_seed_makes_sampling_repeatable(client):
    def sample():
        return (
            client.completions.create(
                model=MODEL_NAME, prompt="seeded", temperature=1.0, max_tokens=8, seed=1234
            )
            .choices[0]
            .text
        )

    assert sample() == sample()


def test_stop_string_ends_the_text(client):
    text = client.completions.create(model=MODEL_NAME, prompt="stop here", **GREEDY).choices[0].text
    stop = text[3:5]
    stopped = client.completions.create(model=MODEL_NAME, prompt="stop here", stop=[stop], **GREEDY).choices[
        0
    ]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and text.startswith(stopped.text)


def test_chat_streamed_equals_non_streamed(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    full = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, logprobs=True, top_logprobs=2, **GREEDY
    )
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 10
    assert full.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10  # usage on the finishing chunk, always


def test_errors_are_openai_shaped(client, runtime_server):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="model length"):
        client.completions.create(model=MODEL_NAME, prompt="x" * 1000, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=MODEL_NAME, prompt=[10**7], max_tokens=1)
    r = httpx.post(
        f"{runtime_server.base_url}/v1/chat/completions", json={"model": MODEL_NAME, "messages": []}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "messages" in error["message"]


def test_fields_not_implemented_are_refused_by_name_not_ignored(client):
    """A client asking for a feature or a field this server does not know gets a 400 that names the
    field, never a 200 with free text as if it had not asked (structured output and tools:
    test_openai_structured.py)."""
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    refused = [
        ({"extra_body": {"functions": [{"name": "f", "parameters": {}}]}}, "functions"),  # legacy: use tools
        ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
        ({"n": 17}, "n"),
        ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
        # implemented, but out of range: the 400 names the field
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ]
    for extra, field in refused:
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(**chat, **extra)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, best_of=3)
    # Their no-op values, and fields that change nothing computed, are served.
    ok = client.chat.completions.create(**chat, response_format={"type": "text"}, logit_bias={}, user="u1",
                                        extra_body={"repetition_penalty": 1.0, "min_p": 0})
    assert ok.choices[0].message.content is not None


def test_tokenize_and_detokenize_take_vllms_shapes(runtime_server):
    base = runtime_server.base_url
    r = httpx.post(f"{base}/tokenize", json={"model": MODEL_NAME, "prompt": "hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] > 0
    assert "".join(body["token_strs"]).strip().endswith("world")
    back = httpx.post(f"{base}/detokenize", json={"model": MODEL_NAME, "tokens": body["tokens"]}).json()
    assert back["prompt"].strip().endswith("hello world")
    chat = httpx.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 1
    for bad, field in (({"model": MODEL_NAME}, "prompt or messages"),
                       ({"prompt": "x", "nope": 1}, "nope"),
                       ({"model": "gpt-4", "prompt": "x"}, "unknown model")):
        r = httpx.post(f"{base}/tokenize", json=bad)
        assert r.status_code in (400, 404) and field in r.text, (bad, r.text)
    r = httpx.post(f"{base}/detokenize", json={"tokens": [10**7]})
    assert r.status_code == 400 and "vocabulary" in r.text


def test_unicode_prompt_round_trips(client):
    prompt = "Ünïcödé ✓ 混合专家 🚀"
    result = client.completions.create(
        model=MODEL_NAME, prompt=prompt, echo=True, max_tokens=2, temperature=0
    )
    assert result.choices[0].text.startswith(prompt)
    assert result.usage.prompt_tokens >= len(prompt.encode())  # byte-level tokenizer: a token per byte
