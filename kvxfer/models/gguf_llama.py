"""Convert a Llama-architecture GGUF file (llama.cpp's format) into a Hugging Face style directory.

Weights are dequantized to float32 with the ``gguf`` package; llama.cpp's row permutation of ``q_proj`` /
``k_proj`` (its RoPE pairs adjacent values, HF's "rotate half" pairs the two halves) is undone the way
transformers' GGUF loader does; a missing ``output.weight`` means tied embeddings. The tokenizer is rebuilt from
the file's GPT-2 style byte-level BPE vocabulary and merges with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from ..engine.checkpoint import save_hf
from ..engine.config import ModelConfig
from ..errors import ConfigError
from .tiny import byte_to_unicode
from .tokenizer import Tokenizer

log = logging.getLogger("kvxfer.models")

#: GGUF tensor name (after ``blk.N.``) -> HF name (after ``model.layers.N.``).
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

#: llama.cpp pre-tokenizer names whose split we reproduce: GPT-2's regex, with single digits split first or not.
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
PLAIN_GPT2_PRE = ("gpt-2", "gpt2", "default")

CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4  # tokenizer.ggml.token_type values
_MISSING = object()


class GGUFFile:
    """Metadata access to one GGUF file (memory-mapped by ``gguf.GGUFReader``)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(str(path))
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path}: not a readable GGUF file: {error}") from error
        self.path = path

    def field(self, key: str, default: Any = _MISSING) -> Any:
        found = self.reader.fields.get(key)
        if found is None:
            if default is _MISSING:
                raise ConfigError(f"{self.path.name}: GGUF metadata {key!r} is missing")
            return default
        return found.contents()


def gguf_config(gguf: GGUFFile, name: str) -> ModelConfig:
    """The ModelConfig (float32) the GGUF metadata describes; only plain Llama models are accepted."""
    arch = gguf.field("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{gguf.path.name}: general.architecture must be 'llama', got {arch!r}")
    scaling = gguf.field("llama.rope.scaling.type", "none")
    tensor_names = {tensor.name for tensor in gguf.reader.tensors}
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"{gguf.path.name}: RoPE scaling is not supported by this converter, got {scaling!r}")
    hidden, heads = int(gguf.field("llama.embedding_length")), int(gguf.field("llama.attention.head_count"))
    head_dim = int(gguf.field("llama.attention.key_length", hidden // heads))
    rotary = int(gguf.field("llama.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ConfigError(
            f"{gguf.path.name}: partial rotary must not be used: rope.dimension_count={rotary}, head_dim={head_dim}"
        )
    tokens = gguf.field("tokenizer.ggml.tokens")
    return ModelConfig(
        vocab_size=int(gguf.field("llama.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(gguf.field("llama.feed_forward_length")),
        num_layers=int(gguf.field("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(gguf.field("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_float32(gguf.field("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=_float32(gguf.field("llama.attention.layer_norm_rms_epsilon")),
        max_position=int(gguf.field("llama.context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        eos_token_ids=_eos_ids(gguf),
        dtype="float32",
        name=name,
    )


def _float32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06): the
    value the model was configured with before llama.cpp stored it as float32."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _eos_ids(gguf: GGUFFile) -> tuple[int, ...]:
    ids = [gguf.field(f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot", "eom")]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def reverse_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, rows ``(dim/2, 2)`` back to ``(2, dim/2)``. float32[rows, cols]."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_weights(gguf: GGUFFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All tensors dequantized to float32, by HF Llama name."""
    from gguf.quants import dequantize

    weights: dict[str, torch.Tensor] = {}
    for tensor in gguf.reader.tensors:
        name, rest = tensor.name, ""
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest not in LAYER_TENSORS:
                raise ConfigError(f"{gguf.path.name}: unexpected tensor {name!r} for a Llama model")
            hf_name = f"model.layers.{int(layer)}.{LAYER_TENSORS[rest]}"
        elif name in GLOBAL_TENSORS:
            hf_name = GLOBAL_TENSORS[name]
        else:
            raise ConfigError(f"{gguf.path.name}: unexpected tensor {name!r} for a Llama model")
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # GGUF lists dims innermost first
        if rest == "attn_q.weight":
            array = reverse_permute(array, config.num_heads)
        elif rest == "attn_k.weight":
            array = reverse_permute(array, config.num_kv_heads)
        weights[hf_name] = torch.from_numpy(np.array(array, order="C"))  # a copy: GGUF F32 data is read-only
    return weights


def gguf_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """A byte-level BPE Tokenizer from ``tokenizer.ggml.*`` and ``tokenizer.chat_template``."""
    kind, pre = gguf.field("tokenizer.ggml.model"), gguf.field("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ConfigError(f"{gguf.path.name}: tokenizer.ggml.model must be 'gpt2' (byte-level BPE), got {kind!r}")
    if pre not in DIGIT_SPLIT_PRE + PLAIN_GPT2_PRE:
        raise ConfigError(
            f"{gguf.path.name}: tokenizer.ggml.pre must be one of {DIGIT_SPLIT_PRE + PLAIN_GPT2_PRE}, got {pre!r}"
        )
    tokens = [str(token) for token in gguf.field("tokenizer.ggml.tokens")]
    types = list(gguf.field("tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise ConfigError(
            f"{gguf.path.name}: tokenizer.ggml.token_type must have one entry per token ({len(tokens)}), "
            f"got {len(types)}"
        )
    alphabet = set(byte_to_unicode().values())
    spelling = byte_to_unicode()
    vocab = {
        (token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(str(merge).split(" ", 1)) for merge in gguf.field("tokenizer.ggml.merges")]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))  # type: ignore[arg-type]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre in DIGIT_SPLIT_PRE
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == CONTROL_TOKEN
        ]
    )
    backend.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == USER_DEFINED_TOKEN
        ]
    )

    def token(key: str) -> str | None:
        index = gguf.field(f"tokenizer.ggml.{key}_token_id", None)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos = token("bos")
    if gguf.field("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    template = gguf.field("tokenizer.chat_template", None)
    return Tokenizer(
        backend,
        eos_token_ids=_eos_ids(gguf),
        chat_template=None if template is None else str(template),
        bos_token=bos,
        eos_token=token("eos"),
    )


def convert_gguf(path: Path, directory: Path, *, name: str) -> ModelConfig:
    """Write ``config.json``, ``model.safetensors`` (float32), ``generation_config.json`` and the tokenizer files
    of the GGUF model at ``path`` into ``directory``."""
    gguf = GGUFFile(path)
    config = gguf_config(gguf, name)
    tokenizer = gguf_tokenizer(gguf)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"{path.name}: the tokenizer's {tokenizer.vocab_size} tokens must fit vocab_size {config.vocab_size}"
        )
    save_hf(directory, config, gguf_weights(gguf, config))
    tokenizer.save(directory)
    generation = {
        "eos_token_id": list(config.eos_token_ids),
        "bos_token_id": gguf.field("tokenizer.ggml.bos_token_id", None),
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    log.info("converted %s into %s (%d parameters)", path.name, directory, config.num_parameters())
    return config
