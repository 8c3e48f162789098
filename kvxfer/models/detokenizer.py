"""Detokenizer: streaming text from token ids, one id at a time, emitting only complete characters."""

from __future__ import annotations

from .tokenizer import Tokenizer

#: Tokens held back at most while the text ends in an incomplete character (a UTF-8 character is at most 4 bytes;
#: byte-fallback and byte-level tokenizers spend at most one token a byte). Past this, the text goes out as is.
MAX_PENDING_TOKENS = 6

#: Tokens decoded before the new ones, so that tokenizers which treat the first token of a text specially (leading
#: space of SentencePiece) cut the new text at the right place.
CONTEXT_TOKENS = 4

REPLACEMENT = "\ufffd"


class Detokenizer:
    """``push(token_id)`` returns the text those tokens added since the last push (often ""); byte-level pieces
    that split a UTF-8 character are held until the character is complete. :meth:`flush` returns what is held at
    the end of a stream. Special tokens (EOS, role markers) produce no text.

    It decodes a small window of recent tokens each time (the same way vLLM does), so it works for any
    ``tokenizers`` model: byte-level BPE, SentencePiece with byte fallback, WordPiece.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # the window: context tokens, then emitted ones, then held ones
        self._read = 0  # window[:read] has been emitted
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one generated id; the new complete text (possibly "")."""
        self._ids.append(int(token_id))
        if len(self._ids) - self._read < MAX_PENDING_TOKENS and self.tokenizer.decode(self._ids).endswith(REPLACEMENT):
            return ""
        return self._emit()

    def flush(self) -> str:
        """The held text at the end of a stream (incomplete characters come out as U+FFFD)."""
        return self._emit() if self._read < len(self._ids) else ""

    def _emit(self) -> str:
        context = self.tokenizer.decode(self._ids[: self._read]) if self._read else ""
        full = self.tokenizer.decode(self._ids)
        # Text is appended, except by tokenizers that clean up across token boundaries: then the common prefix.
        cut = len(context) if full.startswith(context) else _common_prefix_len(context, full)
        delta = full[cut:]
        self._read = len(self._ids)
        if self._read > CONTEXT_TOKENS:  # keep a short context window, drop older tokens
            del self._ids[: self._read - CONTEXT_TOKENS]
            self._read = CONTEXT_TOKENS
        self.text += delta
        return delta


def _common_prefix_len(a: str, b: str) -> int:
    """The number of leading characters ``a`` and ``b`` share."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # strict=False: the strings differ in length on purpose
        if x != y:
            return i
    return min(len(a), len(b))
