"""Token ids to streamed text: UTF-8 safe, and cut at stop strings.

Byte-level tokenizers split multi-byte characters across tokens, and SentencePiece
tokenizers decide a token's leading space from its neighbours, so decoding one token
at a time gives broken text.  ``IncrementalDetokenizer`` re-decodes a short window
and releases text only once it no longer ends in a partial character.
``StopStringBuffer`` holds back the few characters that might still become the
start of a stop string, so the client never sees any part of the stop string or
anything after it.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens kept as decoding context for the first output token
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text pieces, one push per token."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the decoding window
        self._read = len(self._ids)  # ids before this are already released as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """New text completed by this token ('' while a character is incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a trailing partial character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text):]


class StopStringBuffer:
    """Accumulates output text, detects stop strings, releases only safe text."""

    def __init__(self, stop: list[str]):
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._sent = 0

    def append(self, piece: str) -> bool:
        """Add text; True when a stop string appeared (the text is cut before it)."""
        if not piece:
            return False
        start = max(0, len(self.text) - self._hold)  # a new match must end in `piece`
        self.text += piece
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def take(self, final: bool) -> str:
        """Text that can be sent now; everything that is left when ``final``."""
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent:end]
        self._sent = end
        return out
