"""Tokenizer, chat templates and the streaming Detokenizer, on tiny-random's byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvxfer.errors import ConfigError
from kvxfer.models import Detokenizer, Tokenizer, load_model
from kvxfer.models.chat import ChatTemplate
from kvxfer.models.tiny import SPECIAL_TOKENS, byte_tokenizer


def test_byte_tokenizer_round_trips_and_specials(tmp_path: Path) -> None:
    tokenizer = load_model("tiny-random", cache_dir=tmp_path).tokenizer
    text = "Grüße, 世界 🌍!\n\ttabs"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>a<|im_end|>") == [257, 97, 258]
    assert tokenizer.decode([257, 97, 258]) == "a"
    assert tokenizer.decode([257, 97, 258], skip_special_tokens=False) == "<|im_start|>a<|im_end|>"


def test_chat_template(tmp_path: Path) -> None:
    tokenizer = load_model("tiny-random", cache_dir=tmp_path).tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert (
        tokenizer.apply_chat_template(messages)
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi?<|im_end|>\n")
    with pytest.raises(ConfigError, match=r"messages\[0\]\.content"):
        tokenizer.apply_chat_template([{"role": "user", "content": 3}])  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="messages"):
        tokenizer.apply_chat_template([])


def test_detokenizer_holds_split_utf8_characters(tmp_path: Path) -> None:
    tokenizer = load_model("tiny-random", cache_dir=tmp_path).tokenizer
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in [*tokenizer.encode("a🌍é"), 258]]
    # 'a' alone, the emoji's four bytes only once complete, é's two bytes once complete, EOS adds nothing.
    assert pieces == ["a", "", "", "", "🌍", "", "é", ""]
    assert detokenizer.text == "a🌍é"


def test_detokenizer_flushes_an_incomplete_tail(tmp_path: Path) -> None:
    tokenizer = load_model("tiny-random", cache_dir=tmp_path).tokenizer
    detokenizer = Detokenizer(tokenizer)
    assert detokenizer.push(ord("x")) == "x"
    assert detokenizer.push(0xE4) == ""  # first byte of a three-byte character
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.flush() == ""


def test_detokenizer_never_raises_on_unknown_ids() -> None:
    tokenizer = byte_tokenizer()
    detokenizer = Detokenizer(tokenizer)
    assert [detokenizer.push(token) for token in (10**6, 259, -1, ord("o"), ord("k"))] == ["", "", "", "o", "k"]
    assert tokenizer.decode([10**6, -5, ord("a")]) == "a"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_detokenizer_pieces_add_up_to_the_text(text: str) -> None:
    assume(not any(token in text for token in SPECIAL_TOKENS))  # those become special ids, decoded to nothing
    tokenizer = byte_tokenizer()
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in tokenizer.encode(text)]
    assert "".join(pieces) == text == detokenizer.text
    assert detokenizer.flush() == ""
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


def test_chat_template_is_sandboxed() -> None:
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ConfigError, match="failed to render"):
        escape.render([{"role": "user", "content": "x"}])
    refusing = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(ConfigError, match="system first"):
        refusing.render([{"role": "user", "content": "x"}])
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_chat_template_sees_special_tokens_and_tojson() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert template.render([{"role": "user", "content": "é<>"}]) == '<s>{"role": "user", "content": "é<>"}</s>'


def test_tokenizer_files_round_trip(tmp_path: Path) -> None:
    byte_tokenizer().save(tmp_path)
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.eos_token_ids == (258,)  # from tokenizer_config.json's eos_token (no generation_config here)
    assert loaded.encode("<|im_start|>hé") == [257, 104, 195, 169]
    assert (
        loaded.apply_chat_template([{"role": "user", "content": "x"}])
        == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        Tokenizer.from_directory(tmp_path / "missing")
