"""Output text of one request: detokenize the streamed ids and apply stop strings on the text (the router's job).

Text that could be the beginning of a stop string is held back until it is known not to be one, so a streaming
client never sees a stop string or a piece of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models import Detokenizer, Tokenizer


class OutputText:
    """``push(token_ids)`` -> (text to send now, stopped); ``flush()`` -> the held text at the end."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = (), min_tokens: int = 0) -> None:
        self._detokenizer = Detokenizer(tokenizer)
        self._min_tokens = min_tokens  # stop strings count only once this many tokens were generated
        self._stops = tuple(stops)
        self._hold = max((len(s) for s in self._stops), default=1) - 1  # chars that may start a stop string
        self._pending = ""  # decoded, not sent yet
        self.text = ""  # everything sent
        self.stopped = False
        self.token_ids: list[int] = []  # tokens pushed before the stop (the usage's completion_tokens)

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Add generated ids; returns the text that may be sent now and whether a stop string matched."""
        if self.stopped:
            return "", True
        for token_id in token_ids:
            piece = self._detokenizer.push(token_id)
            before = len(self._pending)
            self._pending += piece
            self.token_ids.append(token_id)
            if not piece or not self._stops or len(self.token_ids) < self._min_tokens:
                continue
            # Only a match that this token completes; one that began in text already sent cannot exist: that text
            # was held back while it could start one.
            found = [i for i in (self._pending.find(s, max(0, before - len(s) + 1)) for s in self._stops) if i >= 0]
            if found:
                out, self._pending, self.stopped = self._pending[: min(found)], "", True
                self.text += out
                return out, True
        split = len(self._pending) - self._hold
        out, self._pending = (self._pending[:split], self._pending[split:]) if split > 0 else ("", self._pending)
        self.text += out
        return out, False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def flush(self) -> str:
        """The held text at the end of the stream (a stop string never matched)."""
        if self.stopped:
            return ""
        out = self._pending + self._detokenizer.flush()
        self._pending = ""
        self.text += out
        return out
