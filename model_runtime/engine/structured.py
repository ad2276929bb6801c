"""Structured output: a request's output held to a JSON schema, a regular expression, a list of
choices or a grammar, by masking every token the constraint does not allow before sampling.

The grammar work is llguidance's (docs/decisions.md #23): it turns the constraint into a grammar,
checks it, and keeps one matcher per request that answers, at each step, which tokens may come next
(a bitmask over the vocabulary, computed lazily from the tokenizer's token trie; no per-grammar
precompilation) and takes the token that was sampled. This module is the glue: the constraint as
it crosses the engine process's pipe (`StructuredOutput`, plain values), the llguidance tokenizer
built from ours, and the batch's bitmasks. The engine (engine/core.py) applies the masks to the
logits (engine/sampling.py) and finishes a request with "stop" when its grammar has terminated.

No torch here (the server process checks constraints without loading a model); llguidance and
numpy are imported when first used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

# JSON is generated compact with one space after ',' and ':' (how models write JSON), never with
# free whitespace: a grammar that allows any run of whitespace lets a model (a small or random
# one surely) pad an object until max_tokens and never close it. A schema's own "x-guidance"
# options (llguidance's) override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Kind = Literal["json", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match, and the request field it came from (named in errors).

    kind "json": `spec` is a JSON schema (a dict; {"type": "object"} for any JSON object);
    "regex": a regular expression (Rust regex syntax, matched as a whole);
    "choice": a list of strings, exactly one of which is the output;
    "grammar": a Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's, converted).
    """

    kind: Kind
    spec: Any
    field: str

    def grammar(self) -> str:
        """The llguidance grammar; ValueError naming the field when the spec is not of its kind."""
        import llguidance
        from llguidance.gbnf_to_lark import any_to_lark

        spec, field = self.spec, self.field
        if self.kind == "json":
            if not isinstance(spec, dict):
                raise ValueError(f"{field}: a JSON schema must be a JSON object, got {type(spec).__name__}")
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
            except ValueError as e:
                raise ValueError(f"{field}: not a usable JSON schema: {e}") from None
        if self.kind == "regex":
            if not isinstance(spec, str) or not spec:
                raise ValueError(f"{field}: a regular expression must be a non-empty string")
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if self.kind == "choice":
            if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
                raise ValueError(f"{field}: choices must be a non-empty list of non-empty strings")
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        if self.kind == "grammar":
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError(f"{field}: a grammar must be a non-empty string (Lark or GBNF)")
            try:
                return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec))
            except Exception as e:  # GBNF that does not convert
                raise ValueError(f"{field}: not a Lark or GBNF grammar: {e}") from None
        raise ValueError(f"{field}: unknown kind of structured output {self.kind!r}")


def _ll_vocabulary(tokenizer, vocab_size: int) -> list[bytes]:
    """Each token id's bytes, for a tokenizer without a tokenizer.json (the byte-level one):
    ids below 256 are the bytes themselves, the rest special tokens (their text, or a name)."""
    return [
        bytes([i]) if i < 256 else (tokenizer.decode([i], skip_special_tokens=False) or f"<|unused_{i}|>").encode()
        for i in range(vocab_size)
    ]


class _ByteTokenizerSource:
    """What llguidance's TokenizerWrapper reads of a tokenizer given as a vocabulary."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int):
        self.eos_token_id = eos_token_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.tokens = _ll_vocabulary(tokenizer, vocab_size)
        self.special_token_ids = list(range(256, vocab_size))
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)


class Grammars:
    """Constraints checked and matchers made for one tokenizer and vocabulary (the model's, which
    may be larger than the tokenizer's: the ids past it are never allowed). The llguidance tokenizer
    is built on first use (about a second for a large vocabulary), then kept."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids or ())
        self._ll_tokenizer = None
        self._executor = None

    @property
    def ll_tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance

            fast = getattr(self.tokenizer, "backend", None)  # HFTokenizer: the `tokenizers` object
            eos = self.eos_token_ids or None
            if fast is not None:
                self._ll_tokenizer = llguidance.LLTokenizer(fast.to_str(), n_vocab=self.vocab_size, eos_token=eos)
            else:
                source = _ByteTokenizerSource(self.tokenizer, self.vocab_size, (eos or [0])[0])
                self._ll_tokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(source), n_vocab=self.vocab_size, eos_token=eos
                )
        return self._ll_tokenizer

    def check(self, constraint: StructuredOutput) -> str:
        """The constraint's grammar; ValueError naming its field when it cannot be used (a bad
        schema, regex or grammar)."""
        import llguidance

        grammar = constraint.grammar()
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise ValueError(f"{constraint.field}: {_first_lines(error)}")
        return grammar

    def matcher(self, constraint: StructuredOutput):
        """A fresh matcher (llguidance.LLMatcher) for one request; ValueError as `check`."""
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer, self.check(constraint), log_level=0)
        if matcher.is_error():
            raise ValueError(f"{constraint.field}: {_first_lines(matcher.get_error())}")
        return matcher

    def bitmasks(self, matchers: list):
        """The next-token bitmasks of `matchers` (numpy int32 [G, ceil(V / 32)], bit i of word w
        allows token 32 w + i), computed in parallel off the GIL."""
        import llguidance
        import numpy as np

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        masks = np.full((len(matchers), (self.vocab_size + 31) // 32), -1, dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], masks.ctypes.data, masks.shape[1] * 4, len(matchers)
        )
        return masks


def _first_lines(message: str, n: int = 6) -> str:
    return "\n".join(message.strip().splitlines()[:n])
