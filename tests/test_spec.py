import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from kvxfer import ConfigError, DescriptorError, KVCacheSpec


def logical_view(spec: KVCacheSpec) -> np.ndarray:
    """Element indices of the cache, viewed through the spec's strides over (layer, block, kv, head, token, dim)."""
    flat = np.arange(spec.nbytes // spec.itemsize, dtype=np.int64)
    return as_strided(flat[spec.offset :], spec.shape, tuple(s * 8 for s in spec.element_strides))


def covered(spec: KVCacheSpec, offsets: np.ndarray, piece: int) -> np.ndarray:
    starts = offsets // spec.itemsize
    return np.sort((starts[:, None] + np.arange(piece // spec.itemsize)).ravel())


VLLM_LAYER = dict(num_layers=1, num_blocks=10, block_size=16, num_kv_heads=4, head_dim=8)


@pytest.mark.parametrize(
    "spec",
    [
        KVCacheSpec(3, 10, 16, 4, 8, layout="HND"),
        KVCacheSpec(3, 10, 16, 4, 8, layout="NHD", dtype="float32"),
        KVCacheSpec(2, 10, 1, 4, 8, layout="NHD", dtype="float8_e4m3fn"),
        # vLLM per layer: [2, num_blocks, block_size, heads, dim]
        KVCacheSpec(**VLLM_LAYER, strides=(0 + 2 * 10 * 16 * 4 * 8, 16 * 4 * 8, 10 * 16 * 4 * 8, 8, 4 * 8, 1)),
        # one tensor [num_layers, 2, num_blocks, heads, block_size, dim] with a leading offset
        KVCacheSpec(3, 10, 16, 4, 8, strides=(2 * 10 * 512, 512, 10 * 512, 128, 8, 1), offset=7),
    ],
)
@pytest.mark.parametrize("heads", [None, (1, 3), (0, 1)])
def test_block_offsets_cover_exactly_the_selected_elements(spec, heads):
    view = logical_view(spec)
    ids = np.array([7, 2, 9])
    layers = sorted({0, spec.num_layers - 1})
    offsets, piece = spec.block_offsets(ids, layers=layers, heads=heads)
    h0, h1 = heads or (0, spec.num_kv_heads)
    expected = np.sort(view[layers][:, ids][:, :, :, h0:h1].ravel())
    np.testing.assert_array_equal(covered(spec, offsets, piece), expected)
    assert len(np.unique(offsets)) == len(offsets)


def test_default_strides_are_the_tensor_shape_strides():
    for layout in ("HND", "NHD"):
        spec = KVCacheSpec(4, 32, 16, 8, 128, layout=layout)
        strides = np.empty(spec.tensor_shape, dtype=np.int8).strides
        assert spec.nbytes == np.prod(spec.tensor_shape) * 2
        if layout == "HND":
            assert spec.element_strides == strides
        else:
            assert spec.element_strides == (strides[0], strides[1], strides[2], strides[4], strides[3], 1)


def test_hnd_full_block_is_one_piece_nhd_head_slice_is_one_piece_per_token():
    hnd = KVCacheSpec(2, 8, 16, 8, 128)
    assert hnd.fragments()[1] == 2 * 8 * 16 * 128
    assert hnd.fragments((2, 4))[1] == 2 * 2 * 16 * 128
    nhd = hnd.replace(layout="NHD")
    offsets, piece = nhd.fragments((2, 4))
    assert (len(offsets), piece) == (16, 2 * 2 * 128)


def test_tp_head_ranges_including_replication():
    assert KVCacheSpec(1, 1, 1, 4, 8, tp_rank=1, tp_size=2).head_range() == (4, 8)
    replicated = [KVCacheSpec(1, 1, 1, 1, 8, tp_rank=r, tp_size=8, total_kv_heads=2).head_range() for r in range(8)]
    assert replicated == [(0, 1)] * 4 + [(1, 2)] * 4
    with pytest.raises(ConfigError, match="num_kv_heads"):
        KVCacheSpec(1, 1, 1, 3, 8, tp_size=2, total_kv_heads=8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="bfloat17"), "dtype"),
        (dict(layout="HDN"), "layout"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(tp_rank=2, tp_size=2), "tp_rank"),
        (dict(num_kv_parts=3), "num_kv_parts"),
        (dict(strides=(1, 1, 1, 1, 1, 1)), "overlap"),
        (dict(strides=(4096, 256, 128, 32, 8, 2)), "contiguous"),
        (dict(strides=(1, 2, 3)), "6 strides"),
    ],
)
def test_bad_specs_raise_config_error(kwargs, match):
    base = dict(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8)
    with pytest.raises(ConfigError, match=match):
        KVCacheSpec(**{**base, **kwargs})


def test_block_ids_out_of_range_and_spec_too_big_for_region():
    spec = KVCacheSpec(2, 4, 4, 2, 8)
    for bad in ([4], [-1], [[1, 2]], [0.5]):
        with pytest.raises(DescriptorError, match="block_ids"):
            spec.block_offsets(bad)
    with pytest.raises(ConfigError, match="needs"):
        spec.check_fits(spec.nbytes - 1)


def test_mla_single_part():
    spec = KVCacheSpec(2, 4, 16, 1, 576, num_kv_parts=1, tp_rank=1, tp_size=4, total_kv_heads=1)
    offsets, piece = spec.block_offsets([3])
    assert len(offsets) == 2 and piece == 16 * 576 * 2
    assert spec.head_range() == (0, 1)
