"""KVCache: the tensor is laid out exactly as its KVCacheSpec says (what a KVPipe relies on)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import KVCache
from kvxfer.errors import ConfigError
from kvxfer.spec import KVCacheSpec

pytestmark = pytest.mark.timeout(60)

LAYERS, BLOCKS, HEADS, DIM = 2, 5, 3, 4


def _spec(layout: str, block_size: int, strides: tuple[int, ...] | None = None) -> KVCacheSpec:
    return KVCacheSpec(
        num_layers=LAYERS,
        num_blocks=BLOCKS,
        block_size=block_size,
        num_kv_heads=HEADS,
        head_dim=DIM,
        dtype="float32",
        layout=layout,
        strides=strides,
    )


def _vllm_strides(block_size: int) -> tuple[int, ...]:
    """vLLM-style [layer][2, blocks, block_size, heads, dim] over AXES (layer, block, kv, head, token, dim)."""
    token = HEADS * DIM
    block = block_size * token
    kv = BLOCKS * block
    return (2 * kv, block, kv, DIM, token, 1)


def _bytes_of_block(cache: KVCache, layer: int, block: int, part: int) -> np.ndarray:
    offsets, piece = cache.spec.block_offsets([block], layers=[layer], parts=[part])
    raw = cache.tensor.contiguous().view(torch.uint8).numpy().ravel()
    return np.concatenate([raw[o : o + piece] for o in offsets]).view(np.float32)


@pytest.mark.parametrize("layout,strides", [("HND", False), ("NHD", False), ("NHD", True)])
@pytest.mark.parametrize("block_size", [1, 4])
def test_write_lands_where_spec_says(layout: str, strides: bool, block_size: int) -> None:
    spec = _spec(layout, block_size, _vllm_strides(block_size) if strides else None)
    cache = KVCache(spec)
    if not strides:
        assert tuple(cache.tensor.shape) == spec.tensor_shape and cache.tensor.is_contiguous()
    assert cache.tensor.numel() * 4 >= spec.nbytes
    block, layer = 3, 1
    slots = torch.arange(block * block_size, (block + 1) * block_size)
    k = torch.randn(block_size, HEADS, DIM)
    v = torch.randn(block_size, HEADS, DIM)
    cache.write(layer, slots, k, v)
    # Memory order of one block: heads-major for HND, tokens-major for NHD and the vLLM layout.
    order = (lambda x: x.transpose(0, 1)) if layout == "HND" else (lambda x: x)
    np.testing.assert_array_equal(_bytes_of_block(cache, layer, block, 0), order(k).contiguous().numpy().ravel())
    np.testing.assert_array_equal(_bytes_of_block(cache, layer, block, 1), order(v).contiguous().numpy().ravel())
    others = [(lay, b) for lay in range(LAYERS) for b in range(BLOCKS) if (lay, b) != (layer, block)]
    assert all(not _bytes_of_block(cache, lay, b, p).any() for lay, b in others for p in (0, 1))
    read_k, read_v = cache.read(layer, [block], block_size)
    assert torch.equal(read_k, k) and torch.equal(read_v, v)


def test_read_follows_block_table_order() -> None:
    cache = KVCache(_spec("HND", 2))
    k = torch.randn(5, HEADS, DIM)
    table = [4, 0, 2]  # tokens 0-1 in block 4, 2-3 in block 0, 4 in block 2
    slots = torch.tensor([table[t // 2] * 2 + t % 2 for t in range(5)])
    cache.write(0, slots, k, -k)
    read_k, read_v = cache.read(0, table, 5)
    assert torch.equal(read_k, k) and torch.equal(read_v, -k)


def test_rejects_single_part_specs() -> None:
    spec = KVCacheSpec(
        num_layers=1, num_blocks=2, block_size=2, num_kv_heads=1, head_dim=4, dtype="float32", num_kv_parts=1
    )
    with pytest.raises(ConfigError, match="num_kv_parts"):
        KVCache(spec)
