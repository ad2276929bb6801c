"""Incremental detokenisation with stop strings.

Text is released only at character boundaries: while the decoded tail ends with U+FFFD (an
incomplete UTF-8 sequence of a byte-level tokenizer) the tokens are held back until the character
completes (or the request finishes). While a request has stop strings, the last
`len(longest stop) - 1` characters are held back too, so streamed text never contains the start
of a stop string that is trimmed later: the concatenated stream always equals the final text.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
# prompt tokens decoded ahead of the first generated token, so tokenizers that drop a leading space
# of the first token of a decode (SentencePiece) space the first generated word correctly
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all text so far (stop string trimmed once found)
        self.emitted = 0  # characters of `text` already returned by `take_new_text`

    def add(self, token_id: int) -> str | None:
        """Append one token; return the stop string it completed, else None."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return None
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return None  # no complete character yet
        return self._extend(full[len(prefix) :])

    def flush(self) -> str | None:
        """At the end of a request: release held-back bytes even if they are not valid UTF-8."""
        if self.tokenizer is None or self.read_offset >= len(self.ids):
            return None
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        return self._extend(full[len(prefix) :]) if len(full) > len(prefix) else None

    def _extend(self, new: str) -> str | None:
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        start = max(0, len(self.text) - self.hold)
        self.text += new
        if not self.stop:
            return None
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        at, hit = min(hits)
        self.text = self.text[:at]
        return hit

    @property
    def emitted_text(self) -> str:
        return self.text[: self.emitted]

    def take_new_text(self, finished: bool) -> str:
        """Text not returned before, holding back a possible stop-string prefix unless finished."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        new = self.text[self.emitted : end]
        self.emitted = end
        return new
