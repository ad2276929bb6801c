"""`echo` and prompt logprobs through the OpenAI API, checked against transformers, and
lm-evaluation-harness's `local-completions` model against the server.

transformers writes a tiny random Mixtral and a trained BPE tokenizer (a checkpoint as a user
has one); the server serves it in float32. What a client sees:

- `echo` with `logprobs`: the prompt's tokens, then the generated ones; each prompt token's
  logprob is transformers' log-softmax at the position before it (the first has none: null);
  `max_tokens: 0` answers the prompt alone; streamed, the first chunk carries the prompt;
- a batch of prompts (text and token ids) answers prompt p's i-th choice as choice p x n + i;
- vLLM's `prompt_logprobs` (completions and chat), refused when streamed;
- lm-eval on two tiny tasks written here (multiple choice: log-likelihood requests; generate_until):
  both run, and every log-likelihood lm-eval got equals transformers' for the same tokens.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch
from test_equivalence import randomise

pytestmark = pytest.mark.runtime
transformers = pytest.importorskip("transformers")

NAME = "echo-mixtral"
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts routes every token to a few experts.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
]
ATOL = 1e-4  # float32 server and reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers model, HF tokenizer): a tiny Mixtral with a BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("echo-checkpoint")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXT * 20, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer.save_pretrained(path)
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    randomise(model, seed=3)
    model.save_pretrained(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def server(checkpoint, server_process):
    s = server_process("--dtype", "float32", "--max-model-len", "256", "--seed", "0",
                       "--served-model-name", NAME, model=str(checkpoint[0]))
    yield s
    assert s.stop() == 0, s.logs()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax over the whole sequence, no cache: [T, V]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_logprobs_are_transformers_log_softmax_of_the_prompt(client, checkpoint):
    _, model, tokenizer = checkpoint
    prompt = TEXT[2]
    ids = tokenizer.encode(prompt)
    out = client.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=3, max_tokens=4,
                                    temperature=0, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    generated = choice.text[len(prompt):]
    assert choice.text.startswith(prompt) and out.usage.completion_tokens == 4
    assert len(lp.tokens) == len(ids) + 4
    assert lp.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert "".join(lp.tokens[len(ids):]) == generated
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = log_softmax(model, ids)
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(float(ref[p - 1, ids[p]]), abs=ATOL)
        top = ref[p - 1].topk(3)
        expected = {tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)}
        assert lp.top_logprobs[p] == pytest.approx(expected, abs=ATOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # the generated tokens follow, as transformers' greedy decoding picks them
    seq = list(ids)
    for j in range(4):
        row = log_softmax(model, seq)[-1]
        seq.append(int(row.argmax()))
        assert lp.tokens[len(ids) + j] == tokenizer.decode([seq[-1]])
        assert lp.token_logprobs[len(ids) + j] == pytest.approx(float(row.max()), abs=ATOL)


def test_max_tokens_0_echoes_the_prompt_alone(client, checkpoint):
    _, model, tokenizer = checkpoint
    ids = tokenizer.encode(TEXT[0])
    out = client.completions.create(model=NAME, prompt=ids, echo=True, logprobs=0, max_tokens=0, temperature=0)
    choice = out.choices[0]
    assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    ref = log_softmax(model, ids)
    expected = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=ATOL)
    assert all(top == {} for top in choice.logprobs.top_logprobs[1:])  # logprobs 0: the token's own only
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=0)


def test_streamed_echo_starts_with_the_prompt_and_equals_the_answer(client):
    kwargs = dict(model=NAME, prompt=TEXT[1], echo=True, logprobs=2, max_tokens=6, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert chunks[0].choices[0].text.startswith(TEXT[1])
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [x for c in chunks if c.choices[0].logprobs for x in getattr(c.choices[0].logprobs, field)]
        assert streamed == getattr(whole.logprobs, field), field
    zero = [c for c in client.completions.create(**{**kwargs, "max_tokens": 0}, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in zero) == TEXT[1]
    assert zero[-1].choices[0].finish_reason == "length"


def test_a_batch_of_prompts_answers_each_choice_in_order(client, checkpoint):
    tokenizer = checkpoint[2]
    prompts = [TEXT[0], TEXT[3]]
    single = [
        client.completions.create(model=NAME, prompt=p, max_tokens=5, temperature=0, seed=11, n=2)
        for p in prompts
    ]
    batch = client.completions.create(model=NAME, prompt=prompts, max_tokens=5, temperature=0, seed=11, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [c.text for s in single for c in s.choices]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)
    # token ids, echoed, streamed: each choice's chunks name it
    ids = [tokenizer.encode(p) for p in prompts]
    chunks = [c for c in client.completions.create(model=NAME, prompt=ids, echo=True, max_tokens=3, temperature=0,
                                                   stream=True) if c.choices]
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert [texts[0], texts[1]] == [c.text for c in client.completions.create(
        model=NAME, prompt=ids, echo=True, max_tokens=3, temperature=0).choices]
    assert texts[1].startswith(tokenizer.decode(ids[1]))
    # one bad prompt fails the batch with a 400 naming the problem
    with pytest.raises(openai.BadRequestError, match="model length"):
        client.completions.create(model=NAME, prompt=[TEXT[0], TEXT[0] * 30], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        client.completions.create(model=NAME, prompt=["a"] * 129, n=2, max_tokens=1)


def test_vllm_prompt_logprobs_in_completions_and_chat(client, server, checkpoint):
    _, model, tokenizer = checkpoint
    ids = tokenizer.encode(TEXT[3])
    ref = log_softmax(model, ids)

    def check(entries, ids, ref, k):
        assert entries[0] is None and len(entries) == len(ids)
        for p in range(1, len(ids)):
            row = ref[p - 1]
            top = row.topk(k).indices.tolist()
            assert set(entries[p]) == {str(t) for t in [ids[p], *top]}
            mine = entries[p][str(ids[p])]
            assert mine["logprob"] == pytest.approx(float(row[ids[p]]), abs=ATOL)
            assert mine["rank"] == int((row > row[ids[p]]).sum()) + 1
            assert mine["decoded_token"] == tokenizer.decode([ids[p]], skip_special_tokens=True)
            assert [entries[p][str(t)]["rank"] for t in top] == list(range(1, k + 1))

    r = httpx.post(f"{server.base_url}/v1/completions",
                   json={"model": NAME, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    check(r.json()["choices"][0]["prompt_logprobs"], ids, ref, 2)

    messages = [{"role": "user", "content": TEXT[0]}]
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)
    r = httpx.post(f"{server.base_url}/v1/chat/completions",
                   json={"model": NAME, "messages": messages, "max_tokens": 1, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(chat_ids)
    check(body["prompt_logprobs"], chat_ids, log_softmax(model, chat_ids), 1)

    for path, payload in (("completions", {"prompt": "x"}), ("chat/completions", {"messages": messages})):
        r = httpx.post(f"{server.base_url}/v1/{path}",
                       json={"model": NAME, **payload, "prompt_logprobs": 1, "stream": True})
        assert r.status_code == 400 and "prompt_logprobs" in r.text
        r = httpx.post(f"{server.base_url}/v1/{path}", json={"model": NAME, **payload, "prompt_logprobs": 21})
        assert r.status_code == 400 and "prompt_logprobs" in r.text


# -- lm-evaluation-harness --------------------------------------------------------------------------

MC_DOCS = [
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog.", " capital", " experts"], "answer": 0},
    {"question": "Paris is the capital of", "choices": [" France.", " Germany.", " ten."], "answer": 0},
    {"question": "One, two, three,", "choices": [" four", " five, six", " seven"], "answer": 0},
]
GEN_DOCS = [
    {"question": "Mixture of experts routes", "answer": " every token"},
    {"question": "Berlin is the capital of", "answer": " Germany."},
]


def write_tasks(root) -> None:
    """Two lm-eval tasks over local JSON lines (no download): multiple choice and generate_until."""
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
    (root / "echo_mc.yaml").write_text(
        f"task: echo_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    (root / "echo_gen.yaml").write_text(
        f"task: echo_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.mark.parametrize("batch_size", [1, 4])
def test_lm_eval_local_completions_loglikelihoods_equal_transformers(server, checkpoint, tmp_path, monkeypatch,
                                                                     batch_size):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    path, model, _ = checkpoint
    write_tasks(tmp_path)
    lm = get_model("local-completions")(
        model=NAME, base_url=f"{server.base_url}/v1/completions", tokenizer=str(path),
        tokenizer_backend="huggingface", tokenized_requests=True, batch_size=batch_size, max_retries=1,
        num_concurrent=1, max_length=256,
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["echo_mc", "echo_gen"], task_manager=TaskManager(include_path=str(tmp_path),
                                                                           include_defaults=False),
        log_samples=True, bootstrap_iters=0, random_seed=0,
    )
    assert set(results["results"]) == {"echo_mc", "echo_gen"}
    mc = results["samples"]["echo_mc"]
    assert len(mc) == len(MC_DOCS)
    checked = 0
    for sample in mc:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ll, _greedy = resp[0]
            ctx, cont = lm._encode_pair(context, continuation)
            ids = ctx + cont
            ref = log_softmax(model, ids)
            expected = sum(float(ref[p - 1, ids[p]]) for p in range(len(ctx), len(ids)))
            assert math.isfinite(ll) and ll == pytest.approx(expected, abs=1e-3), (context, continuation)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)
    gen = results["samples"]["echo_gen"]
    assert len(gen) == len(GEN_DOCS) and all(isinstance(s["resps"][0][0], str) for s in gen)


def test_two_ranks_report_the_prompt_logprobs_one_process_computes(server_process):
    """A tensor-parallel replica (2 ranks, gloo): rank 0 computes the prompt positions' logits,
    the other rank runs the plain step; the logprobs are the whole model's."""
    from model_runtime import load_model

    src, name = "builtin:tiny-deepseek-v3", "tiny-deepseek-v3"
    ids = [5, 71, 104, 33, 250, 7, 7, 19, 88, 140, 3, 61]
    s = server_process("--tensor-parallel-size", "2", "--device", "cpu", "--dtype", "float32",
                       "--max-model-len", "256", model=src)
    try:
        r = httpx.post(f"{s.base_url}/v1/completions", timeout=60,
                       json={"model": name, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0})
    finally:
        assert s.stop() == 0, s.logs()
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    ref = log_softmax_of(load_model(src, dtype=torch.float32).eval(), ids)
    assert got[0] is None
    assert got[1:] == pytest.approx([float(ref[p - 1, ids[p]]) for p in range(1, len(ids))], abs=ATOL)


def log_softmax_of(model, ids: list[int]) -> torch.Tensor:
    """Our model's log-softmax over the whole sequence (model(input_ids) returns logits)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)
