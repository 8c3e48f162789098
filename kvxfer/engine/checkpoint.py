"""Weights by Hugging Face Llama name: seeded random, or read from / written to a local HF-style directory.

A directory holds ``config.json`` and one or more ``*.safetensors`` files (an index file is not needed: every file's
header is read). Tensors are read lazily and sliced on read, so a tensor-parallel rank loads only its shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import ModelConfig


def hf_names(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every (name, full shape) of a Llama checkpoint with this config, embeddings first."""
    hidden, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    yield "model.embed_tokens.weight", (config.vocab_size, hidden)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        yield prefix + "input_layernorm.weight", (hidden,)
        yield prefix + "self_attn.q_proj.weight", (q, hidden)
        yield prefix + "self_attn.k_proj.weight", (kv, hidden)
        yield prefix + "self_attn.v_proj.weight", (kv, hidden)
        yield prefix + "self_attn.o_proj.weight", (hidden, q)
        yield prefix + "post_attention_layernorm.weight", (hidden,)
        yield prefix + "mlp.gate_proj.weight", (config.intermediate_size, hidden)
        yield prefix + "mlp.up_proj.weight", (config.intermediate_size, hidden)
        yield prefix + "mlp.down_proj.weight", (hidden, config.intermediate_size)
    yield "model.norm.weight", (hidden,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (config.vocab_size, hidden)


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights (CPU tensors of ``config.dtype``) by HF name.

    Linear weights are N(0, 1/fan_in) and untied embeddings N(0, 1), not HF's N(0, 0.02): with unit-scale
    activations attention actually shapes the next token, so greedy-token tests notice a wrong KV cache. Tied
    embeddings are also the LM head and get its N(0, 1/hidden): at N(0, 1) a token's logit against its own
    embedding dominates and greedy decoding only repeats the last token. Norm weights are 1.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in hf_names(config):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            untied_embedding = name == "model.embed_tokens.weight" and not config.tie_word_embeddings
            std = 1.0 if untied_embedding else shape[1] ** -0.5
            tensor = torch.randn(shape, generator=generator) * std
        weights[name] = tensor.to(config.torch_dtype)
    return weights


class WeightStore:
    """Tensors by HF name, from a dict or a checkpoint directory; :meth:`get` reads one slice of one tensor."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, directory: str | os.PathLike | None = None):
        self._tensors = dict(tensors or {})
        self._files: dict[str, Path] = {}
        if directory is not None:
            from safetensors import safe_open

            files = sorted(Path(directory).glob("*.safetensors"))
            if not files:
                raise ConfigError(f"checkpoint directory {directory}: expected *.safetensors files, found none")
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    self._files.update((name, file) for name in handle.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self._files

    def get(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (CPU), sliced to ``[start, end)`` along ``dim`` when ``dim`` is given."""
        if name not in self:
            raise ConfigError(f"checkpoint: tensor {name!r} is missing")
        index = (slice(None),) * (dim or 0) + (slice(start, end),) if dim is not None else ()
        if name in self._tensors:
            return self._tensors[name][index] if index else self._tensors[name]
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_slice(name)[index] if index else handle.get_tensor(name)


def read_config(directory: str | os.PathLike, *, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of an HF-style checkpoint directory (``dtype`` overrides the stored one)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"checkpoint directory {directory}: expected config.json, not found")
    return ModelConfig.from_hf(json.loads(path.read_text()), name=Path(directory).resolve().name, dtype=dtype)


def save_hf(directory: str | os.PathLike, config: ModelConfig, weights: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF Llama names) into ``directory``; returns its path."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in hf_names(config):
        tensor = weights.get(name)
        if tensor is None or tuple(tensor.shape) != shape:
            actual = None if tensor is None else tuple(tensor.shape)
            raise ConfigError(f"save_hf: weights[{name!r}] must have shape {shape}, got {actual}")
        tensors[name] = tensor.detach().to("cpu").contiguous()
    (path / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
