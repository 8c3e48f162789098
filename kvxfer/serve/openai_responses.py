"""OpenAI-shaped response bodies and SSE chunks (chat.completion, text_completion and their streaming chunks)."""

from __future__ import annotations

import json
from typing import Literal

Kind = Literal["chat", "completion"]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, object]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens the decode worker found in its
    prefix cache (as vLLM reports them)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    text: str,
    finish: str | None,
    usage_: dict[str, object],
    timing: dict[str, object] | None,
) -> dict[str, object]:
    """A complete (non-streaming) response; ``timing`` (the TTFT breakdown) as a top-level ``kvxfer`` field."""
    if kind == "chat":
        choice: dict[str, object] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        body: dict[str, object] = {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage_,
        }
    else:
        body = {
            "id": f"cmpl-{rid}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage_,
        }
    if timing is not None:
        body["kvxfer"] = timing
    return body


class ChunkWriter:
    """Builds the SSE events of one streamed response."""

    def __init__(self, kind: Kind, rid: str, created: int, model: str) -> None:
        self.kind = kind
        self.created = created
        self.model = model
        self.id = f"chatcmpl-{rid}" if kind == "chat" else f"cmpl-{rid}"
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _event(self, choices: list[dict[str, object]], extra: dict[str, object] | None = None) -> bytes:
        body: dict[str, object] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if extra:
            body.update(extra)
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def start(self) -> bytes | None:
        """The opening chunk (chat: the assistant role); None for completions."""
        if self.kind != "chat":
            return None
        return self._event(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def text(self, text: str, finish: str | None = None, timing: dict[str, object] | None = None) -> bytes:
        """A chunk with new text and/or the finish reason (and the TTFT breakdown on the last one, if asked)."""
        if self.kind == "chat":
            delta: dict[str, object] = {"content": text} if text or finish is None else {}
            choice: dict[str, object] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._event([choice], {"kvxfer": timing} if timing is not None else None)

    def usage(self, usage_: dict[str, object]) -> bytes:
        """The final usage chunk (``stream_options.include_usage``): no choices."""
        return self._event([], {"usage": usage_})

    @staticmethod
    def error(body: dict[str, object]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
