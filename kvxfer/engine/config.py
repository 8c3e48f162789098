"""Model and cache configuration of the reference engines: frozen, validated, convertible to and from HF config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..spec import KVLayout

#: Model dtype names and their torch dtypes (the KV cache uses the model dtype).
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Keys of a Llama-3 style ``rope_scaling`` entry, in the order ModelConfig.rope_scaling stores them.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _positive(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{owner}.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

    ``head_dim`` 0 means ``hidden_size // num_heads``. ``rope_scaling`` is None (plain RoPE) or the Llama-3 values
    ``(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)``. ``name`` identifies the model
    in KV cache specs (prefill and decode must agree).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: tuple[float, float, float, float] | None = None
    rms_norm_eps: float = 1e-5
    max_position: int = 8192
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    name: str = ""

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position",
        ):
            _positive("ModelConfig", field, getattr(self, field))
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"ModelConfig.hidden_size={self.hidden_size} must be a multiple of "
                    f"num_heads={self.num_heads} when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _positive("ModelConfig", "head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in TORCH_DTYPES:
            raise ConfigError(f"ModelConfig.dtype must be one of {sorted(TORCH_DTYPES)}, got {self.dtype!r}")
        if self.rope_scaling is not None and len(self.rope_scaling) != len(LLAMA3_ROPE_KEYS):
            raise ConfigError(f"ModelConfig.rope_scaling must be {LLAMA3_ROPE_KEYS}, got {self.rope_scaling!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> ModelConfig:
        """``tiny`` (3 layers, hidden 64: CPU tests) or ``small`` (~108M parameters: GPU runs), with overrides."""
        if name not in PRESETS:
            raise ConfigError(f"ModelConfig.preset: name must be one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **changes)

    def num_parameters(self) -> int:
        """Parameter count of the full (unsharded) model."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (per_layer + 2 * self.hidden_size) + embeddings + self.hidden_size

    # ---- Hugging Face config.json --------------------------------------------------------------------------------

    def to_hf(self) -> dict[str, Any]:
        """A ``LlamaForCausalLM`` config.json dict (readable by transformers 4.x and 5.x)."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(dict(zip(LLAMA3_ROPE_KEYS, self.rope_scaling, strict=True)), rope_type="llama3")
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if self.rope_scaling is None else dict(rope),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
            "torch_dtype": self.dtype,
        }

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, name: str = "", dtype: str | None = None) -> ModelConfig:
        """Read a Llama config.json dict. Unsupported features (biases, other rope types) raise ConfigError."""
        if (
            hf.get("model_type", "llama") not in ("llama", "mistral")
            or hf.get("attention_bias")
            or hf.get("mlp_bias")
            or hf.get("hidden_act", "silu") != "silu"
            or hf.get("sliding_window")
        ):
            raise ConfigError(
                f"config.json: expected a bias-free SiLU Llama model without sliding window, got "
                f"model_type={hf.get('model_type')!r} attention_bias={hf.get('attention_bias')!r} "
                f"hidden_act={hf.get('hidden_act')!r} sliding_window={hf.get('sliding_window')!r}"
            )
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ConfigError(f"config.json: rope_type must be 'default' or 'llama3', got {kind!r}")
        scaling = tuple(float(rope[key]) for key in LLAMA3_ROPE_KEYS) if kind == "llama3" else None
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or 0),
            rope_theta=theta,
            rope_scaling=scaling,  # type: ignore[arg-type]
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_position=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            dtype=dtype or str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            name=name,
        )


PRESETS = {
    "tiny": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_position=2048,
        name="kvxfer-tiny",
    ),
    # ~108M parameters, head_dim 128 like Llama-3 (so KV fragments have realistic sizes); bfloat16 on GPUs.
    "small": ModelConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2048,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        max_position=16384,
        tie_word_embeddings=True,
        dtype="bfloat16",
        rope_theta=500000.0,
        name="kvxfer-small",
    ),
}


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache of one engine rank: ``num_blocks`` blocks of ``block_size`` tokens in ``layout``."""

    num_blocks: int = 256
    block_size: int = 16
    layout: KVLayout = KVLayout.HND
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _positive("CacheConfig", "num_blocks", self.num_blocks)
        _positive("CacheConfig", "block_size", self.block_size)
        try:
            object.__setattr__(self, "layout", KVLayout(self.layout))
        except ValueError:
            raise ConfigError(f"CacheConfig.layout must be 'NHD' or 'HND', got {self.layout!r}") from None
