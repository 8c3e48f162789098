"""OpenAI-compatible request validation and error objects for the router's HTTP API.

Bodies are validated by hand (no pydantic models on the hot path): every field is checked for its type and range,
and a bad one raises :class:`ApiError`, which the API turns into ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status. Nothing from a client is trusted: sizes of prompts, message lists and stop lists are capped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Priority = Literal["high", "normal", "low"]
PrefillMode = Literal["auto", "local", "remote"]

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
MAX_BODY_BYTES = 8 << 20
MAX_MESSAGES = 1024
MAX_STOP = 8
MAX_STOP_LENGTH = 256
ROLES = ("system", "user", "assistant", "developer", "tool")


class ApiError(Exception):
    """An error answered to the client as an OpenAI-style error object with HTTP ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, dict[str, str | None]]:
        """The JSON error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """A 400 about one request field."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)


@dataclass
class GenerationParams:
    """A validated /v1/completions or /v1/chat/completions body (the prompt is tokenized later)."""

    kind: Literal["chat", "completion"]
    model: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    priority: Priority = "normal"
    timing: bool = False
    prefill: PrefillMode = "auto"
    return_token_ids: bool = False


def parse_json(raw: bytes) -> dict[str, object]:
    """Decode a request body: a JSON object of at most MAX_BODY_BYTES, else ApiError 400/413."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(
            413, f"request body of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES}", code="body_too_large"
        )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"invalid JSON body: {error}", code="invalid_json") from error
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _number(body: Mapping[str, object], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"expected a number, got {type(value).__name__}", "invalid_type")
    if not low <= value <= high:
        raise bad(name, f"must lie in [{low}, {high}], got {value}")
    return float(value)


def _integer(body: Mapping[str, object], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"expected an integer, got {type(value).__name__}", "invalid_type")
    if not low <= value <= high:
        raise bad(name, f"must lie in [{low}, {high}], got {value}")
    return value


def _flag(body: Mapping[str, object], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"expected a boolean, got {type(value).__name__}", "invalid_type")
    return value


def _stop(body: Mapping[str, object]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "expected a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
        raise bad("stop", f"at most {MAX_STOP} non-empty strings of at most {MAX_STOP_LENGTH} characters")
    return tuple(stops)


def _token_ids(value: object, name: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(name, "expected a list of integer token ids", "invalid_type")
    if any(not 0 <= t < vocab_size for t in value):
        raise bad(name, f"token ids must lie in [0, {vocab_size})")
    return tuple(value)


def _extension(body: Mapping[str, object], headers: Mapping[str, str]) -> tuple[Priority, bool, PrefillMode, bool]:
    """Priority (header ``x-priority`` or body ``priority``); from the body's ``kvxfer`` object: timing (also header
    ``x-kvxfer-timing: 1``), prefill mode (auto, local, remote) and token_ids (return the generated ids)."""
    priority = headers.get("x-priority") or body.get("priority") or "normal"
    if priority not in PRIORITIES:
        raise bad("priority", f"expected one of {', '.join(PRIORITIES)}, got {priority!r}")
    extra = body.get("kvxfer") or {}
    if not isinstance(extra, dict):
        raise bad("kvxfer", "expected an object", "invalid_type")
    unknown = set(extra) - {"timing", "prefill", "token_ids"}
    if unknown:
        raise bad("kvxfer", f"unknown keys {sorted(unknown)}; known: timing, prefill, token_ids")
    timing = extra.get("timing", False)
    if not isinstance(timing, bool):
        raise bad("kvxfer.timing", "expected a boolean", "invalid_type")
    timing = timing or headers.get("x-kvxfer-timing", "").lower() in ("1", "true", "yes")
    prefill = extra.get("prefill", "auto")
    if prefill not in ("auto", "local", "remote"):
        raise bad("kvxfer.prefill", f"expected auto, local or remote, got {prefill!r}")
    token_ids = extra.get("token_ids", False)
    if not isinstance(token_ids, bool):
        raise bad("kvxfer.token_ids", "expected a boolean", "invalid_type")
    return priority, timing, prefill, token_ids  # type: ignore[return-value]


def _content(message: Mapping[str, object], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}].content", "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{index}].content", "expected a string or a list of text parts", "invalid_type")


def _messages(body: Mapping[str, object]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad("messages", "expected a list of messages", "invalid_type" if messages is not None else "missing")
    if not messages:
        raise bad("messages", "must not be empty")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{index}]", "expected an object", "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"messages[{index}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": str(role), "content": _content(message, index)})
    return out


def parse_generation(
    body: Mapping[str, object], kind: Literal["chat", "completion"], headers: Mapping[str, str], vocab_size: int
) -> GenerationParams:
    """Validate a completions (``kind="completion"``) or chat completions body; raise ApiError 400 on a bad field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "expected a model name", "invalid_type" if model is not None else "missing")
    n = _integer(body, "n", 1, 128)
    if n not in (None, 1):
        raise bad("n", f"only n=1 is supported, got {n}", "unsupported_value")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise bad("logprobs", "logprobs are not supported", "unsupported_value")
    params = GenerationParams(kind=kind, model=model)
    if kind == "chat":
        params.messages = _messages(body)
        params.max_tokens = _integer(body, "max_completion_tokens", 1, 1 << 30)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise bad("prompt", "must not be empty")
            params.prompt = prompt
        elif isinstance(prompt, list) and prompt:
            params.prompt_token_ids = list(_token_ids(prompt, "prompt", vocab_size))
        else:
            raise bad(
                "prompt",
                "expected a non-empty string or list of token ids (one prompt)",
                "invalid_type" if prompt is not None else "missing",
            )
    max_tokens = _integer(body, "max_tokens", 1, 1 << 30)
    params.max_tokens = max_tokens if max_tokens is not None else params.max_tokens
    params.min_tokens = _integer(body, "min_tokens", 0, 1 << 30) or 0
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise bad("min_tokens", f"must not exceed max_tokens={params.max_tokens}, got {params.min_tokens}")
    params.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    params.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if params.top_p == 0.0:
        raise bad("top_p", "must be > 0")
    params.seed = _integer(body, "seed", -(1 << 63), (1 << 63) - 1)
    params.stop = _stop(body)
    if body.get("stop_token_ids") is not None:
        params.stop_token_ids = _token_ids(body["stop_token_ids"], "stop_token_ids", vocab_size)
    params.ignore_eos = _flag(body, "ignore_eos")
    params.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", "expected an object", "invalid_type")
        params.include_usage = _flag(options, "include_usage")
    params.priority, params.timing, params.prefill, params.return_token_ids = _extension(body, headers)
    return params
