"""tiny-random: deterministic across loads and processes, a working byte tokenizer, an engine model that runs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvxfer.errors import ConfigError
from kvxfer.models import Detokenizer, ModelBundle, load_model


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_two_cache_dirs_hold_identical_weights(tmp_path: Path) -> None:
    first = load_model("tiny-random", cache_dir=tmp_path / "a")
    second = load_model("tiny-random", cache_dir=tmp_path / "b")
    assert first.directory != second.directory
    assert _digest(first.directory) == _digest(second.directory)
    ids = first.tokenizer.encode("determinism")
    assert torch.equal(first.build().dense_logits(ids), second.build().dense_logits(ids))


def test_another_process_builds_the_same_weights(tmp_path: Path) -> None:
    here = load_model("tiny-random", cache_dir=tmp_path / "here")
    code = ("import sys, hashlib; from kvxfer.models import load_model; "
            "d = load_model('tiny-random', cache_dir=sys.argv[1]).directory; "
            "print(hashlib.sha256((d / 'model.safetensors').read_bytes()).hexdigest())")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == _digest(here.directory)


def test_cached_load_reuses_the_directory(tmp_path: Path) -> None:
    first = load_model("tiny-random", cache_dir=tmp_path)
    stamp = (first.directory / "model.safetensors").stat().st_mtime_ns
    second = load_model("tiny-random", cache_dir=tmp_path)
    assert second.directory == first.directory
    assert (second.directory / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random"]  # no temp dirs left behind


def test_bundle_fields_and_model(tmp_path: Path) -> None:
    bundle = load_model("tiny-random", cache_dir=tmp_path)
    assert isinstance(bundle, ModelBundle)
    assert bundle.name == bundle.config.name == "tiny-random"
    assert bundle.tokenizer.vocab_size == bundle.config.vocab_size == 259
    assert bundle.tokenizer.eos_token_ids == (258, 256) == bundle.config.eos_token_ids
    model = bundle.build(dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and model.embed_tokens.weight.dtype == torch.bfloat16
    logits = model.dense_logits(bundle.tokenizer.encode("hi"))
    assert logits.shape == (2, 259) and torch.isfinite(logits).all()


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
    assert tokenizer.apply_chat_template(messages) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi?<|im_end|>\n")
    with pytest.raises(ConfigError, match=r"messages\[0\]\.content"):
        tokenizer.apply_chat_template([{"role": "user", "content": 3}])  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="messages"):
        tokenizer.apply_chat_template([])


def test_detokenizer_holds_split_utf8_characters(tmp_path: Path) -> None:
    tokenizer = load_model("tiny-random", cache_dir=tmp_path).tokenizer
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in tokenizer.encode("a🌍é") + [258]]
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


def test_unknown_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tiny-random"):
        load_model("no-such-model", cache_dir=tmp_path)
