"""Structured output in the engine: grammar masks per request, applied before sampling; requests
without a grammar in the same batch are untouched; a checkpoint's BPE tokenizer (merged multi-byte
tokens) works as well as the builtins' byte-level one."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from model_runtime import load_model, load_tokenizer
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.core import LLMEngine
from model_runtime.engine.requests import EngineError, SamplingParams
from model_runtime.engine.sampling import allowed_tokens
from model_runtime.engine.structured import Grammars, StructuredOutput

pytestmark = pytest.mark.runtime

SRC = "builtin:tiny-qwen3-moe"
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"type": "string", "maxLength": 6},
                   "kind": {"enum": ["a", "b"]}},
    "required": ["id", "tag", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = load_model(SRC, dtype=torch.float32).eval()
    return LLMEngine(model, load_tokenizer(SRC), EngineConfig(num_kv_blocks=64, max_model_len=256, seed=0))


def run(engine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finals = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            assert getattr(out, "error", None) is None, out
            if out.finished:
                finals[out.request_id] = out
    return finals


def test_mixed_batch_guided_rows_match_and_the_others_are_untouched(engine):
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=4, ignore_eos=True)
    alone = run(engine, {"plain": ("Hello", plain), "seeded": ("Seeded", seeded)})
    json_out = StructuredOutput("json", SCHEMA, "guided_json")
    regex = StructuredOutput("regex", r"[0-9]{3}(-[a-f]{2})?", "guided_regex")
    mixed = run(engine, {
        "plain": ("Hello", plain),
        "seeded": ("Seeded", seeded),
        "json-greedy": ("{", SamplingParams(max_tokens=100, temperature=0, structured=json_out)),
        "json-sampled": ("x", SamplingParams(max_tokens=100, temperature=1.0, seed=9, top_k=20, structured=json_out)),
        "regex": ("y", SamplingParams(max_tokens=20, temperature=1.0, seed=2, min_p=0.05, structured=regex)),
    })
    assert mixed["plain"].token_ids == alone["plain"].token_ids
    assert mixed["seeded"].token_ids == alone["seeded"].token_ids
    for rid in ("json-greedy", "json-sampled"):
        assert mixed[rid].finish_reason == "stop", mixed[rid].text
        jsonschema.validate(json.loads(mixed[rid].text), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}(-[a-f]{2})?", mixed["regex"].text) and mixed["regex"].finish_reason == "stop"


def test_a_grammar_that_cannot_be_used_is_refused_naming_its_field(engine):
    with pytest.raises(EngineError, match="guided_regex"):
        engine.add_request("bad", "x", SamplingParams(structured=StructuredOutput("regex", "(", "guided_regex")))
    with pytest.raises(EngineError, match="response_format"):
        engine.validate("x", SamplingParams(structured=StructuredOutput("json", {"type": 5}, "response_format")))
    assert not engine.has_unfinished()


def test_checkpoint_bpe_tokenizer_masks_allow_only_valid_json(tmp_path):
    """A random walk over the tokens each mask allows, with a vocabulary of merged multi-byte
    tokens (and a model vocabulary larger than the tokenizer's), always spells valid JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(['{"id": 12, "tag": "abc", "kind": "a"} the quick brown fox'] * 50, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1, "vocab_size": 448}))
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer.encode('"kind"', add_special_tokens=False)) < 6  # merges exist
    grammars = Grammars(tokenizer, 448, tokenizer.eos_token_ids)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        matcher = grammars.matcher(StructuredOutput("json", SCHEMA, "guided_json"))
        ids = []
        for _ in range(200):
            allowed = allowed_tokens(grammars.bitmasks([matcher]), 448, "cpu")[0]  # [V]
            assert not allowed[420:].any()  # past the tokenizer's vocabulary: never
            choices = allowed.nonzero()[:, 0]
            token = int(choices[torch.randint(len(choices), (1,), generator=generator)])
            assert matcher.consume_token(token)
            if token not in tokenizer.eos_token_ids:
                ids.append(token)
            if matcher.is_stopped():
                break
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)
