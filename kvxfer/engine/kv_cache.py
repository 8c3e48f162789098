"""The paged KV cache of one engine rank: one tensor laid out as a :class:`kvxfer.KVCacheSpec` describes."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..spec import DTYPE_SIZES, KVCacheSpec
from .config import TORCH_DTYPES


class KVCache:
    """K and V of every layer, in ``spec.num_blocks`` blocks of ``spec.block_size`` token slots.

    ``tensor`` is the one allocation, the thing to register with an agent: shape ``spec.tensor_shape``
    (``[layers, blocks, 2, heads, block_size, head_dim]`` for HND, ``[layers, blocks, 2, block_size, heads,
    head_dim]`` for NHD), dtype ``spec.dtype``, on ``device``; or, for a spec with explicit strides, a flat
    1-D buffer of ``spec.nbytes`` bytes. Slot ``s`` is token ``s % block_size`` of block ``s // block_size``.
    """

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu") -> None:
        if spec.num_kv_parts != 2:
            raise ConfigError(f"KVCache: num_kv_parts must be 2 (separate K and V), got {spec.num_kv_parts}")
        if spec.dtype not in TORCH_DTYPES:
            raise ConfigError(f"KVCache: dtype must be one of {sorted(TORCH_DTYPES)}, got {spec.dtype!r}")
        self.spec = spec
        dtype = TORCH_DTYPES[spec.dtype]
        if spec.strides is None and spec.offset == 0:
            self.tensor = torch.zeros(spec.tensor_shape, dtype=dtype, device=device)
        else:
            self.tensor = torch.zeros(-(-spec.nbytes // DTYPE_SIZES[spec.dtype]), dtype=dtype, device=device)
        # The same memory over spec.AXES (layer, block, kv, head, token, dim), whatever the layout.
        self._axes = self.tensor.as_strided(spec.shape, spec.element_strides, spec.offset)

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_blocks(self) -> int:
        return self.spec.num_blocks

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of one layer's K and V, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        kv = self._axes[layer].permute(1, 0, 3, 2, 4)  # [kv, block, token, head, dim]
        return kv[0], kv[1]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V of ``n`` tokens. slots: int64[n], device; k, v: [n, num_kv_heads, head_dim]."""
        keys, values = self.layer(layer)
        blocks, offsets = slots // self.block_size, slots % self.block_size
        keys[blocks, offsets] = k.to(keys.dtype)
        values[blocks, offsets] = v.to(values.dtype)

    def read(self, layer: int, block_ids: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (copies) of a sequence's first ``num_tokens`` tokens: each [num_tokens, num_kv_heads, head_dim]."""
        keys, values = self.layer(layer)
        ids = torch.as_tensor(block_ids, dtype=torch.int64, device=self.device)
        return keys[ids].flatten(0, 1)[:num_tokens], values[ids].flatten(0, 1)[:num_tokens]
