"""Tokenizers: the builtins' byte-level one and a checkpoint's tokenizer.json with its chat template."""

import json

import pytest

from model_runtime import load_tokenizer
from model_runtime.models.tokenizer import ByteTokenizer

pytestmark = pytest.mark.runtime

TEXT = "héllo wörld 🙂 done"


def test_byte_tokenizer_round_trip_and_specials():
    tok = load_tokenizer("builtin:tiny-deepseek-v3")
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id and all(i < 256 for i in ids[1:])
    assert tok.decode(ids) == TEXT
    assert tok.encode(TEXT, add_special_tokens=False) == list(TEXT.encode())
    assert {257, 260} <= tok.eos_token_ids
    assert tok.decode([104, 105, 257], skip_special_tokens=False) == "hi<|end_of_text|>"


def test_byte_decode_of_any_prefix_never_raises():
    tok = load_tokenizer("builtin:tiny-mixtral")
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) == 4
    for n in range(1, 4):  # inside the character: a replacement char the detokenizer holds back
        assert tok.decode(ids[:n]).endswith("\ufffd")
    assert tok.decode(ids) == "🙂"
    assert tok.decode([300, 65]) == "A"  # unused ids decode to nothing


def test_byte_chat_template():
    tok = load_tokenizer("builtin:tiny-qwen3-moe")
    prompt = tok.apply_chat_template(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    )
    assert prompt == (
        "<|begin_of_text|><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(prompt)
    assert ids.count(tok.bos_token_id) == 1 and ids.count(259) == 3
    assert not tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=False
    ).endswith("assistant\n")


@pytest.fixture
def hf_checkpoint(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT, "hello there, general"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template})
    )
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1, "vocab_size": 400}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    return tmp_path


def test_checkpoint_tokenizer(hf_checkpoint):
    tok = load_tokenizer(hf_checkpoint)
    assert tok.bos_token_id == 0 and tok.eos_token_ids == {1, 4}
    ids = tok.encode(TEXT)
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids[:1] + ids[1:3]) == tok.decode(ids[1:3])  # specials skipped, any prefix decodes
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert prompt == "<s><|user|>hello<|eot|><|assistant|>"
    chat_ids = tok.encode(prompt)
    assert chat_ids.count(0) == 1  # the template's BOS is not doubled
    assert tok.decode(chat_ids, skip_special_tokens=False) == prompt


def test_checkpoint_without_tokenizer_json_falls_back_to_bytes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1, "vocab_size": 1000}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and 1 in tok.eos_token_ids
    assert tok.decode(tok.encode("ok")) == "ok"
