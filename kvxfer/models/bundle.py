"""ModelBundle and load_model: a model name or directory -> an HF-style directory, its config and tokenizer."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.checkpoint import read_config
from ..engine.config import ModelConfig
from ..engine.model import Model, load_hf
from ..engine.parallel import TensorParallel
from ..errors import ConfigError
from .cache import publish, resolve_cache_dir
from .smollm2 import NAME as SMOL_NAME
from .smollm2 import write_smollm2
from .tiny import NAME as TINY_NAME
from .tiny import write_tiny_random
from .tokenizer import Tokenizer

log = logging.getLogger("kvxfer.models")


@dataclass(frozen=True)
class ModelBundle:
    """A loadable model: ``directory`` (config.json, model.safetensors, tokenizer.json, ...), its ``config`` and
    ``tokenizer``. ``name`` is the id a server shows (``/v1/models``) and ``config.name`` (KV cache specs of
    prefill and decode workers must agree on it). With ``random_weights`` the model has this shape and tokenizer
    but seeded random weights (``seed``; the same in every process), whatever the directory holds."""

    name: str
    directory: Path
    config: ModelConfig
    tokenizer: Tokenizer
    random_weights: bool = False
    seed: int = 0

    def build(
        self, device: torch.device | str = "cpu", dtype: str | None = None, tp: TensorParallel | None = None
    ) -> Model:
        """The engine model of this rank (``tp`` None: the whole model) on ``device``; ``dtype`` ("float32",
        "bfloat16", "float16") overrides the stored one. Each rank reads only its shard of the weights."""
        if self.random_weights:
            config = self.config if dtype is None else self.config.replace(dtype=dtype)
            return Model.random(config, seed=self.seed, tp=tp, device=device)
        return load_hf(self.directory, tp=tp, device=device, dtype=dtype)


Builder = Callable[[Path, Path], dict[str, Any]]  # (temp directory to fill, cache directory) -> marker fields


def _tiny(directory: Path, cache_dir: Path) -> dict[str, Any]:
    return write_tiny_random(directory)


def _builtin_sources() -> dict[str, tuple[str, Builder]]:
    """Names that need no directory -> (cache dir name, builder)."""
    smol = (SMOL_NAME, write_smollm2)
    return {TINY_NAME: (TINY_NAME, _tiny), SMOL_NAME: smol, SMOL_NAME.lower(): smol, "smollm2": smol}


def known_models() -> list[str]:
    """The names :func:`load_model` resolves without a directory."""
    return sorted(_builtin_sources())


def load_model(
    model: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    random_weights: bool = False,
    seed: int = 0,
) -> ModelBundle:
    """Resolve ``model``: ``"tiny-random"``, ``"smollm2"`` / ``"SmolLM2-135M-Instruct"`` (converted once into the
    cache directory, see :mod:`kvxfer.models.cache`), or the path of a local Hugging Face Llama directory.
    Weights are not read here; :meth:`ModelBundle.build` reads them.

    ``random_weights``: build the model with seeded random weights (``seed``) of the directory's shape; then the
    directory needs only config.json and the tokenizer files (e.g. SmolLM2's shape and tokenizer on a machine
    without the GGUF)."""
    sources = _builtin_sources()
    key = os.fspath(model)
    if isinstance(model, str) and key in sources:  # a Path is always a directory, even one named "tiny-random"
        dir_name, builder = sources[key]
        cache = resolve_cache_dir(cache_dir)
        directory = publish(cache / dir_name, lambda temp: builder(temp, cache))
    else:
        directory = Path(key).expanduser()
        if not directory.is_dir():
            raise ConfigError(
                f"model {key!r}: expected one of {known_models()} or a local model directory "
                f"(config.json, *.safetensors, tokenizer.json), got neither"
            )
    directory = directory.resolve()
    if not random_weights and not any(directory.glob("*.safetensors")):
        raise ConfigError(
            f"model {key!r}: directory {directory} must hold *.safetensors weights, found none; pass "
            f"random_weights=True (kvxfer worker --random-weights) for seeded random weights of its "
            f"shape"
        )
    config = read_config(directory)
    tokenizer = Tokenizer.from_directory(directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"model {key!r}: tokenizer vocabulary must fit the model's vocab_size={config.vocab_size}, "
            f"got {tokenizer.vocab_size} tokens"
        )
    log.debug("model %s loaded from %s", config.name, directory)
    return ModelBundle(
        name=config.name,
        directory=directory,
        config=config,
        tokenizer=tokenizer,
        random_weights=bool(random_weights),
        seed=int(seed),
    )
