"""Chat templates: a Hugging Face style jinja2 template rendered in a sandbox over validated messages."""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError

#: Bounds on what a client may put through a template (the router also bounds request bodies).
MAX_MESSAGES = 4096
MAX_TEMPLATE_CHARS = 1 << 20


def _raise_exception(message: str) -> None:
    raise ConfigError(f"chat template: {message}")


def _tojson(value: object, indent: int | None = None) -> str:
    # HF's variant: no HTML escaping (jinja2's built-in tojson escapes <, >, & and ').
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(pattern: str) -> str:
    return datetime.datetime.now().strftime(pattern)


class ChatTemplate:
    """One compiled template. ``render`` takes messages as ``[{"role": ..., "content": ...}]`` (strings only)."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"chat template: expected a non-empty jinja2 string, got {source!r:.80}")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ConfigError(f"chat template: expected at most {MAX_TEMPLATE_CHARS} characters, got {len(source)}")
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as error:
            raise ConfigError(f"chat template does not compile: {error}") from error
        self.source = source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (ConfigError for malformed messages or a failing template)."""
        checked = validate_messages(messages)
        try:
            return self._template.render(
                messages=checked,
                add_generation_prompt=bool(add_generation_prompt),
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ConfigError:
            raise
        except jinja2.TemplateError as error:  # includes sandbox SecurityError
            raise ConfigError(f"chat template failed to render: {error}") from error


def validate_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Plain copies of ``messages``; each must be a mapping with string ``role`` and ``content`` (other string
    fields such as ``name`` are kept)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ConfigError(f"messages: expected a list of {{'role', 'content'}} maps, got {type(messages).__name__}")
    if not 0 < len(messages) <= MAX_MESSAGES:
        raise ConfigError(f"messages: expected 1 to {MAX_MESSAGES} messages, got {len(messages)}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(f"messages[{index}]: expected a map, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ConfigError(f"messages[{index}].{key}: expected a string, got {message.get(key)!r:.80}")
        if not all(isinstance(key, str) and isinstance(value, str) for key, value in message.items()):
            raise ConfigError(f"messages[{index}]: expected string keys and values, got {dict(message)!r:.120}")
        checked.append(dict(message))
    return checked
