"""Tokenizer: a ``tokenizers`` tokenizer (``tokenizer.json``) with its special tokens and chat template.

A model directory holds ``tokenizer.json`` and optionally ``tokenizer_config.json`` (``bos_token``, ``eos_token``,
``chat_template``), ``chat_template.jinja`` (preferred over the config's template), ``generation_config.json`` and
``config.json`` (``eos_token_id``): the files a Hugging Face model directory has.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from ..errors import ConfigError
from .chat import ChatTemplate

#: Longest text ``encode`` accepts (characters); the router bounds prompts in tokens as well.
MAX_TEXT_CHARS = 8 << 20


def _token_string(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: expected a JSON object, could not read it: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _template_from_config(value: object) -> str | None:
    """``chat_template`` of tokenizer_config.json: a string or a list of ``{"name", "template"}`` (the default)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _ids(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []


class Tokenizer:
    """Text <-> token ids, chat template rendering, and the end-of-sequence ids of one model.

    ``backend`` is a ``tokenizers.Tokenizer``; ``eos_token_ids`` are the ids that end generation (first: the
    primary one); ``bos_token`` / ``eos_token`` are the strings the chat template sees.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        eos_token_ids: Iterable[int],
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(t) for t in eos_token_ids))
        for token_id in self.eos_token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"Tokenizer: eos token id must lie in [0, {self.vocab_size}), got {token_id}")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template: ChatTemplate | None = (
            None if chat_template is None else ChatTemplate(chat_template, bos_token=bos_token, eos_token=eos_token)
        )

    # ---- loading and saving --------------------------------------------------------------------------------------

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer files of a model directory (see the module docstring)."""
        path = Path(directory)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"model directory {path}: expected tokenizer.json, not found")
        try:
            backend = BackendTokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises plain Exception for malformed files
            raise ConfigError(f"{file}: not a valid tokenizers file: {error}") from error
        settings = _read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        template = (
            template_file.read_text(encoding="utf-8")
            if template_file.is_file()
            else _template_from_config(settings.get("chat_template"))
        )
        bos, eos = _token_string(settings.get("bos_token")), _token_string(settings.get("eos_token"))
        eos_ids = _ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        eos_ids += _ids(_read_json(path / "config.json").get("eos_token_id"))
        eos_id = None if eos is None else backend.token_to_id(eos)
        if eos_id is not None:
            eos_ids.append(eos_id)
        return cls(backend, eos_token_ids=eos_ids, chat_template=template, bos_token=bos, eos_token=eos)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (if any) into
        ``directory`` (a Hugging Face ``PreTrainedTokenizerFast`` can load them too)."""
        path = Path(directory)
        self.backend.save(str(path / "tokenizer.json"))
        settings: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            (path / "chat_template.jinja").write_text(self.chat_template.source, encoding="utf-8")
            settings["chat_template"] = self.chat_template.source
        (path / "tokenizer_config.json").write_text(
            json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8"
        )

    # ---- use -----------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become their ids.

        ``add_special_tokens`` lets the tokenizer's post-processor add its tokens (e.g. a BOS), except when the text
        already starts with the BOS token (a rendered chat template usually does), so it is never doubled.
        """
        if not isinstance(text, str):
            raise ConfigError(f"Tokenizer.encode: text must be a str, got {type(text).__name__}")
        if len(text) > MAX_TEXT_CHARS:
            raise ConfigError(f"Tokenizer.encode: text must have at most {MAX_TEXT_CHARS} characters, got {len(text)}")
        if self.bos_token and text.startswith(self.bos_token):
            add_special_tokens = False
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False. Ids outside the
        vocabulary (a model's padded embedding rows) decode to nothing."""
        checked = [int(t) for t in ids if 0 <= int(t) < self.vocab_size]
        return str(self.backend.decode(checked, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": "user", "content": "..."}]``) through the model's template;
        with ``add_generation_prompt`` it ends where the assistant's reply begins. Encode it with :meth:`encode`."""
        if self.chat_template is None:
            raise ConfigError(
                "Tokenizer.apply_chat_template: this model has no chat template "
                "(chat_template.jinja or tokenizer_config.json's chat_template)"
            )
        return self.chat_template.render(messages, add_generation_prompt)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary token (e.g. ``"<|im_end|>"``), or None."""
        token_id = self.backend.token_to_id(token)
        return None if token_id is None else int(token_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )
