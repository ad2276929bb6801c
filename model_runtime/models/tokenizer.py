"""Tokenizers: a checkpoint's `tokenizer.json` (through the `tokenizers` library) with its chat
template, or a byte-level tokenizer for the builtin models (and checkpoints that ship none).

API (what the engine and servers use): `encode(text)`, `decode(ids)`, `eos_token_ids`,
`bos_token_id`, `apply_chat_template(messages, add_generation_prompt=True)`.

`decode` works on any prefix of a token sequence; a prefix that ends inside a multi-byte UTF-8
character decodes with a trailing U+FFFD, which incremental detokenisers hold back until the next
token completes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer

from model_runtime.models.config import BYTE_SPECIALS, ModelConfig, token_ids

log = logging.getLogger(__name__)
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Tokenizer:
    """Common interface; see ByteTokenizer and HFTokenizer."""

    bos_token_id: int | None
    eos_token_ids: set[int]
    pad_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    chat_template: str
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens the tokenizer's BOS is prepended unless the
        text already starts with it (as chat templates' output does)."""
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """The prompt text for a chat: the checkpoint's template (jinja2) or a plain default."""
        return render_chat_template(
            self.chat_template,
            messages=[_plain_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )


class ByteTokenizer(Tokenizer):
    """256 byte tokens, then the specials of BYTE_SPECIALS; ids up to vocab_size are otherwise unused."""

    def __init__(self, vocab_size: int = 320, eos_token_ids: set[int] | None = None):
        if vocab_size < 261:
            raise ValueError(
                f"a byte-level tokenizer needs a vocabulary of at least 261 tokens, not {vocab_size}"
            )
        self.vocab_size = vocab_size
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.bos_token_id = BYTE_SPECIALS[self.bos_token]
        self.pad_token_id = BYTE_SPECIALS["<|pad|>"]
        self.eos_token_ids = set(eos_token_ids or ()) | {
            BYTE_SPECIALS["<|end_of_text|>"],
            BYTE_SPECIALS["<|im_end|>"],
        }
        self.chat_template = BYTE_CHAT_TEMPLATE
        self._special_text = {i: t for t, i in BYTE_SPECIALS.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in BYTE_SPECIALS) + ")")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in BYTE_SPECIALS:
                ids.append(BYTE_SPECIALS[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        if add_special_tokens and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if not skip_special_tokens:
                out.append(self._special_text.get(i, ""))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A checkpoint's tokenizer.json, with specials and chat template from tokenizer_config.json."""

    def __init__(self, path: Path, eos_token_ids: set[int] | None = None):
        self._tok = FastTokenizer.from_file(str(path / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        cfg = _read_json(path / "tokenizer_config.json")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        pad = _token_text(cfg.get("pad_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.pad_token_id = self._tok.token_to_id(pad) if pad else None
        eos = set(eos_token_ids or ())
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = eos
        self.chat_template = _chat_template(path, cfg) or PLAIN_CHAT_TEMPLATE

    @property
    def backend(self) -> FastTokenizer:
        """The `tokenizers` tokenizer (whose JSON a grammar library builds its token trie from)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self._tok.encode(text, add_special_tokens=add_special_tokens and not starts_with_bos).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(src: str | os.PathLike) -> Tokenizer:
    """The tokenizer for a model source (a checkpoint directory, hostpath:///PATH or builtin:NAME)."""
    src = str(src)
    if src.startswith("builtin:"):
        cfg = ModelConfig.from_name(src.removeprefix("builtin:"))
        return ByteTokenizer(cfg.vocab_size, cfg.eos_token_ids)
    path = Path(src.removeprefix("hostpath://"))
    config = _read_json(path / "config.json")
    eos = token_ids(config.get("eos_token_id")) | token_ids(
        _read_json(path / "generation_config.json").get("eos_token_id")
    )
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path, eos)
    log.warning("%s has no tokenizer.json: using the byte-level tokenizer", path)
    return ByteTokenizer(config.get("vocab_size", 320), eos)


def render_chat_template(template: str, **context: Any) -> str:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(**context)


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI content parts ([{"type": "text", "text": ...}]) joined into one string."""
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return {**message, "content": text}
    if content is None:
        return {**message, "content": ""}
    return message


def _chat_template(path: Path, cfg: dict[str, Any]) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = cfg.get("chat_template") or _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)
