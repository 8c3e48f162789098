"""``tiny-random``: the engine's ``tiny`` preset with seeded random weights and a byte-level tokenizer.

Needs no download; every process that builds it gets the same bytes (fixed seed), so workers in different
processes agree. Token ids 0-255 are the bytes; then ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from ..engine.checkpoint import random_weights, save_hf
from ..engine.config import PRESETS, ModelConfig
from .tokenizer import Tokenizer

NAME = "tiny-random"
SEED = 1234
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 256, 257, 258

#: ChatML, as SmolLM2 and many others use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (what byte-level BPE stores)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def tiny_config() -> ModelConfig:
    """The ``tiny`` preset with this tokenizer's vocabulary; ``<|im_end|>`` and ``<|endoftext|>`` end a reply."""
    return PRESETS["tiny"].replace(
        vocab_size=256 + len(SPECIAL_TOKENS), eos_token_ids=(IM_END_ID, ENDOFTEXT_ID), name=NAME
    )


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (id = byte value), plus the special tokens, as a byte-level BPE without merges."""
    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return Tokenizer(
        backend,
        eos_token_ids=(IM_END_ID, ENDOFTEXT_ID),
        chat_template=CHAT_TEMPLATE,
        bos_token=None,
        eos_token="<|im_end|>",
    )


def write_tiny_random(directory: Path) -> dict[str, Any]:
    """Fill ``directory`` with the model (config.json, model.safetensors, generation_config.json) and its
    tokenizer files; returns the cache marker's fields."""
    config = tiny_config()
    save_hf(directory, config, random_weights(config, seed=SEED))
    tokenizer = byte_tokenizer()
    tokenizer.save(directory)
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [IM_END_ID, ENDOFTEXT_ID]}), encoding="utf-8"
    )
    return {"name": NAME, "source": f"random weights, seed {SEED}, engine preset 'tiny'"}
