"""Incremental detokenisation against real `tokenizers` models: the streamed pieces always add up
to the full decode, and no piece ends inside a UTF-8 character."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model_runtime.engine.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.runtime

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Größenwahn und Übermut: naïve café déjà vu.",
    "价格是 €42，还是 ¥300？ 🙂🚀 emoji time",
    "    indented code:\n\tdef f(x):\n\t\treturn x ** 2",
] * 4


class Wrapped:
    """The engine's tokenizer interface over a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def byte_level_bpe() -> Wrapped:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    return Wrapped(tok)


def metaspace_bpe() -> Wrapped:  # SentencePiece-style: "▁" marks a word start, stripped at the front
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=alphabet))
    return Wrapped(tok)


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request):
    return byte_level_bpe() if request.param == "byte-level" else metaspace_bpe()


def stream(tokenizer, prompt_ids: list[int], ids: list[int], stop: list[str] | None = None):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop or [])
    pieces = []
    hit = None
    for t in ids:
        hit = detok.add(t)
        if hit is not None:
            break
        pieces.append(detok.take_new_text(finished=False))
    detok.flush()
    pieces.append(detok.take_new_text(finished=True))
    return pieces, detok.text, hit


@pytest.mark.parametrize("text", CORPUS[:4])
def test_streamed_pieces_add_up_to_the_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(" " + text)
    pieces, final, _ = stream(tokenizer, prompt, ids)
    # the continuation as it reads after the prompt (SentencePiece keeps the word's leading space)
    expected = tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)) :]
    assert "".join(pieces) == final == expected
    assert all("\ufffd" not in p for p in pieces)


def test_random_token_sequences_never_split_a_character(tokenizer):
    rng = random.Random(5)
    vocab = tokenizer.tok.get_vocab_size()
    for _ in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        pieces, final, _ = stream(tokenizer, [], ids)
        assert "".join(pieces) == final == tokenizer.decode(ids)
        for p in pieces[:-1]:  # before the final flush only whole characters are released
            assert not p.endswith("\ufffd")


def test_stop_string_spanning_tokens_is_trimmed(tokenizer):
    text = " naïve café déjà vu."
    ids = tokenizer.encode(text)
    pieces, final, hit = stream(tokenizer, [], ids, stop=["fé dé"])
    assert hit == "fé dé"
    assert "".join(pieces) == final == tokenizer.decode(ids)[: tokenizer.decode(ids).index("fé dé")]
