"""A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU), tensor-parallel over attention heads.

Column-parallel layers (q/k/v, gate/up) hold this rank's rows; row-parallel layers (o, down) hold its columns and
all-reduce their output. Embeddings, norms and the LM head are replicated, so every rank computes the same logits.
Numerics follow Hugging Face ``LlamaForCausalLM`` (RMSNorm and RoPE tables in float32).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .attention import AttentionBatch, causal_attention, paged_attention
from .checkpoint import WeightStore, random_weights, read_config
from .config import ModelConfig
from .kv_cache import KVCache
from .parallel import TensorParallel

LayerCallback = Callable[[int], None]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """RoPE in the "rotate half" convention, with optional Llama-3 frequency scaling."""

    cos: torch.Tensor  # buffers (register_buffer), [max positions, head_dim]
    sin: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if config.rope_scaling is not None:
            inv_freq = _llama3_scaled(inv_freq, *config.rope_scaling)
        freqs = torch.outer(torch.arange(config.max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Rotate each [n, heads, head_dim] tensor by its token's position (positions: int64[n])."""
        tables = self.tables(positions, tensors[0].dtype)
        return [self.rotate(x, tables) for x in tensors]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions`` (int64[n]), each [n, 1, head_dim] in ``dtype``: computed once per forward,
        shared by every layer."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    @staticmethod
    def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [n, heads, head_dim] rotated by :meth:`tables` of its positions."""
        cos, sin = tables
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def _llama3_scaled(inv_freq: torch.Tensor, factor: float, low: float, high: float, original: float) -> torch.Tensor:
    """Llama-3.1 RoPE: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    medium = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(medium, blended, scaled)


def _linear(rows: int, columns: int, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(columns, rows, bias=False, dtype=dtype)
    layer.weight.requires_grad_(False)
    return layer


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, layer: int) -> None:
        super().__init__()
        self.tp, self.layer, self.head_dim = tp, layer, config.head_dim
        heads = tp.split(config.num_heads, "num_heads")
        kv_heads = tp.kv_head_range(config.num_kv_heads)
        self.num_heads, self.num_kv_heads = heads[1] - heads[0], kv_heads[1] - kv_heads[0]
        dim, dtype = config.head_dim, config.torch_dtype
        self.q_proj = _linear(self.num_heads * dim, config.hidden_size, dtype)
        self.k_proj = _linear(self.num_kv_heads * dim, config.hidden_size, dtype)
        self.v_proj = _linear(self.num_kv_heads * dim, config.hidden_size, dtype)
        self.o_proj = _linear(config.hidden_size, self.num_heads * dim, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        batch: AttentionBatch | None,
    ) -> torch.Tensor:
        """x: [n, hidden]; ``rope``: :meth:`Rotary.tables` of the tokens' positions."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        q, k = Rotary.rotate(q, rope), Rotary.rotate(k, rope)
        scale = self.head_dim**-0.5
        if cache is None or batch is None:
            out = causal_attention(q, k, v, scale)
        else:
            if batch.write_rows is None:
                cache.write(self.layer, batch.slots, k, v)
            else:
                cache.write(self.layer, batch.slots, k[batch.write_rows], v[batch.write_rows])
            keys, values = cache.layer(self.layer)
            out = paged_attention(q, keys, values, batch, scale)
        return self.tp.all_reduce(self.o_proj(out.reshape(n, -1)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        start, end = tp.split(config.intermediate_size, "intermediate_size")
        dtype = config.torch_dtype
        self.gate_proj = _linear(end - start, config.hidden_size, dtype)
        self.up_proj = _linear(end - start, config.hidden_size, dtype)
        self.down_proj = _linear(config.hidden_size, end - start, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.torch_dtype)
        self.self_attn = Attention(config, tp, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.torch_dtype)
        self.mlp = MLP(config, tp)


class Model(nn.Module):
    """The decoder of one TP rank. Parameter names are HF's without the leading ``model.``.

    Build with :meth:`random`, :func:`load_hf` or :meth:`from_weights`; all ranks of a group must be built from
    the same weights. Runs under ``torch.inference_mode`` (engines do that).
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.config, self.tp = config, tp or TensorParallel()
        dtype = config.torch_dtype
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, self.tp, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = _linear(config.vocab_size, config.hidden_size, dtype)
        self.rotary = Rotary(config)
        self.requires_grad_(False)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def num_local_kv_heads(self) -> int:
        return cast(DecoderLayer, self.layers[0]).self_attn.num_kv_heads

    @classmethod
    def from_weights(
        cls,
        config: ModelConfig,
        weights: WeightStore,
        tp: TensorParallel | None = None,
        device: torch.device | str = "cpu",
    ) -> Model:
        """Build and load this rank's shard of ``weights`` (HF names)."""
        model = cls(config, tp, device)
        tp = model.tp
        q_rows = [h * config.head_dim for h in tp.split(config.num_heads, "num_heads")]
        kv_rows = [h * config.head_dim for h in tp.kv_head_range(config.num_kv_heads)]
        mlp_rows = list(tp.split(config.intermediate_size, "intermediate_size"))
        shards = {
            "q_proj": (0, q_rows),
            "k_proj": (0, kv_rows),
            "v_proj": (0, kv_rows),
            "o_proj": (1, q_rows),
            "gate_proj": (0, mlp_rows),
            "up_proj": (0, mlp_rows),
            "down_proj": (1, mlp_rows),
        }
        for name, parameter in model.named_parameters():
            hf_name = name if name.startswith("lm_head") else "model." + name
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                hf_name = "model.embed_tokens.weight"
            dim, (start, end) = shards.get(name.split(".")[-2], (None, (0, None)))
            tensor = weights.get(hf_name, dim, start, end) if dim is not None else weights.get(hf_name)
            if tuple(tensor.shape) != tuple(parameter.shape):
                raise ConfigError(
                    f"weights[{hf_name!r}]: expected shape {tuple(parameter.shape)} for this rank, "
                    f"got {tuple(tensor.shape)}"
                )
            parameter.copy_(tensor.to(parameter.dtype))
        return model

    @classmethod
    def random(
        cls, config: ModelConfig, seed: int = 0, tp: TensorParallel | None = None, device: torch.device | str = "cpu"
    ) -> Model:
        """Seeded random weights (:func:`random_weights`); every rank with the same seed holds one model's shards."""
        return cls.from_weights(config, WeightStore(random_weights(config, seed)), tp, device)

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        batch: AttentionBatch | None = None,
        on_layer_done: LayerCallback | None = None,
    ) -> torch.Tensor:
        """Final hidden states [n, hidden] of ``n`` tokens (token_ids, positions: int64[n] on the model's device).

        With ``cache`` and ``batch`` the tokens' K/V are written into the paged cache and attention reads it;
        without them the tokens are one sequence attended densely (the no-cache reference). ``on_layer_done(l)``
        is called on the host right after layer ``l`` was issued (its K/V writes are enqueued on the current
        stream: a GPU consumer records an event before reading).
        """
        hidden = self.embed_tokens(token_ids)
        rope = self.rotary.tables(positions, hidden.dtype)
        for index, layer in enumerate(cast("list[DecoderLayer]", self.layers)):
            attn = layer.self_attn(layer.input_layernorm(hidden), rope, cache, batch)
            hidden = hidden + attn
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if on_layer_done is not None:
                on_layer_done(index)
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32[b, vocab] from hidden states [b, hidden]."""
        return self.lm_head(hidden).float()

    def dense_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits float32[n, vocab] of every position of one sequence, recomputed without any cache."""
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            return self.logits(self.forward(ids, torch.arange(len(token_ids), device=self.device)))

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """This model's weights by HF name (TP size 1 only): what :func:`save_hf` writes."""
        if self.tp.size != 1:
            raise ConfigError(f"Model.hf_weights: needs the full model (tp size 1), got tp size {self.tp.size}")
        weights = {
            ("" if name.startswith("lm_head") else "model.") + name: p.detach().clone()
            for name, p in self.named_parameters()
        }
        if self.config.tie_word_embeddings:
            del weights["lm_head.weight"]
        return weights


def load_hf(
    directory: str | os.PathLike,
    *,
    tp: TensorParallel | None = None,
    device: torch.device | str = "cpu",
    dtype: str | None = None,
) -> Model:
    """Load a local HF-style Llama directory (config.json + *.safetensors); each rank reads only its shard."""
    config = read_config(directory, dtype=dtype)
    return Model.from_weights(config, WeightStore(directory=directory), tp, device)
