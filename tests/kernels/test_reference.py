"""The NumPy reference and the public kernel functions on host arrays."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvxfer.kernels as kernels
from kvxfer.errors import ConfigError, DescriptorError
from kvxfer.kernels import reference
from kvxfer.spec import KVCacheSpec
from tests.kernels.cases import DTYPE_OF_SIZE, naive_copy, random_bytes, random_case, random_spec

pytestmark = pytest.mark.timeout(120)


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.integers(1, 5),
    parts=st.integers(1, 2),
    layers=st.integers(1, 3),
    src_block=st.integers(1, 5),
    dst_block=st.integers(1, 5),
    src_heads=st.integers(1, 3),
    dst_heads=st.integers(1, 3),
    fraction=st.floats(0, 1),
)
def test_reference_equals_naive_per_element_copy(
    seed: int,
    itemsize: int,
    head_dim: int,
    parts: int,
    layers: int,
    src_block: int,
    dst_block: int,
    src_heads: int,
    dst_heads: int,
    fraction: float,
) -> None:
    rng = np.random.default_rng(seed)
    src_spec = random_spec(
        rng,
        num_layers=layers,
        num_blocks=5,
        block_size=src_block,
        num_kv_heads=src_heads,
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    dst_spec = random_spec(
        rng,
        num_layers=layers + 1,
        num_blocks=6,
        block_size=dst_block,
        num_kv_heads=dst_heads,
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    tokens = int(fraction * min(5 * src_block, 6 * dst_block))
    case = random_case(rng, src_spec=src_spec, dst_spec=dst_spec, num_tokens=tokens)
    expected, actual = case.dst.copy(), case.dst.copy()
    naive_copy(case.src, expected, case.plan)
    src_before = case.src.copy()
    kernels.copy_kv(case.src, actual, case.plan)
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(case.src, src_before)


def _cache(spec: KVCacheSpec, seed: int) -> np.ndarray:
    return random_bytes(np.random.default_rng(seed), spec.nbytes)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("itemsize, parts", [(2, 2), (1, 2), (2, 1), (4, 2)])  # bf16, fp8, MLA, fp32
def test_gather_then_scatter_restores_the_blocks(layout: str, itemsize: int, parts: int) -> None:
    spec = KVCacheSpec(
        num_layers=3,
        num_blocks=12,
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=DTYPE_OF_SIZE[itemsize],
        layout=layout,
        num_kv_parts=parts,
    )
    original = _cache(spec, 1)
    blocks = [7, 2, 9]
    layout_of_staging = kernels.staging_spec(spec, 10)
    staging = np.zeros(layout_of_staging.nbytes, dtype=np.uint8)
    used = kernels.gather_blocks(original, spec, blocks, staging, num_tokens=10)
    assert used == layout_of_staging
    restored = _cache(spec, 2)
    before = restored.copy()
    kernels.scatter_blocks(staging, used, restored, spec, [0, 11, 5])
    view_a = reference.element_view(original, spec, "a")
    view_b = reference.element_view(restored, spec, "b")
    view_before = reference.element_view(before, spec, "c")
    for src_block, dst_block, tokens in ((7, 0, 4), (2, 11, 4), (9, 5, 2)):
        np.testing.assert_array_equal(view_b[:, dst_block, :, :, :tokens], view_a[:, src_block, :, :, :tokens])
    np.testing.assert_array_equal(view_b[:, 5, :, :, 2:], view_before[:, 5, :, :, 2:])  # past the last token
    untouched = [b for b in range(12) if b not in (0, 11, 5)]
    np.testing.assert_array_equal(view_b[:, untouched], view_before[:, untouched])


def test_staging_layout_is_layer_part_head_token_dim() -> None:
    spec = KVCacheSpec(
        num_layers=2, num_blocks=4, block_size=2, num_kv_heads=3, head_dim=2, dtype="int16", layout="NHD"
    )
    cache = np.arange(spec.nbytes // 2, dtype=np.int16)
    staging = np.zeros(2 * 2 * 2 * 3 * 2, dtype=np.int16)  # 2 layers, 2 parts, 2 heads, 3 tokens, dim 2
    kernels.gather_blocks(cache, spec, [3, 1], staging, num_tokens=3, heads=(1, 3))
    tensor = cache.reshape(spec.tensor_shape)  # [layer, block, part, token, head, dim]
    expected = np.concatenate([tensor[:, 3], tensor[:, 1]], axis=2)[:, :, :3, 1:3]  # [layer, part, token, head, dim]
    np.testing.assert_array_equal(staging.reshape(2, 2, 2, 3, 2), expected.transpose(0, 1, 3, 2, 4))


def test_tp_split_then_merge_with_block_size_change_round_trips() -> None:
    prefill = KVCacheSpec(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=8, head_dim=16, layout="NHD")
    decode = [
        KVCacheSpec(
            num_layers=2, num_blocks=6, block_size=32, num_kv_heads=4, head_dim=16, layout="HND", tp_rank=r, tp_size=2
        )
        for r in range(2)
    ]
    source = _cache(prefill, 3)
    ranks = [np.zeros(d.nbytes, dtype=np.uint8) for d in decode]
    for spec, memory in zip(decode, ranks, strict=True):
        h0, h1 = spec.head_range()
        kernels.copy_blocks(source, prefill, [5, 1, 6], memory, spec, [4, 0], num_tokens=40, src_heads=(h0, h1))
    merged = np.zeros_like(source)
    for spec, memory in zip(decode, ranks, strict=True):
        kernels.copy_blocks(
            memory, spec, [4, 0], merged, prefill, [2, 3, 7], num_tokens=40, dst_heads=spec.head_range()
        )
    view_src, view_out = (reference.element_view(m, prefill, "x") for m in (source, merged))
    np.testing.assert_array_equal(view_out[:, [2, 3]], view_src[:, [5, 1]])
    np.testing.assert_array_equal(view_out[:, 7, :, :, :8], view_src[:, 6, :, :, :8])
    assert not view_out[:, 7, :, :, 8:].any() and not view_out[:, [0, 1, 4, 5, 6]].any()


def test_layer_group_streaming_into_a_smaller_staging() -> None:
    spec = KVCacheSpec(num_layers=4, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=4)
    cache = _cache(spec, 4)
    group = kernels.staging_spec(spec, 8, num_layers=2)
    staging = np.zeros(group.nbytes, dtype=np.uint8)
    kernels.gather_blocks(cache, spec, [1, 3], staging, group, layers=range(2, 4), staging_layers=range(2))
    out = np.zeros_like(cache)
    kernels.scatter_blocks(staging, group, out, spec, [0, 2], layers=[2, 3], staging_layers=[0, 1])
    a, b = reference.element_view(cache, spec, "a"), reference.element_view(out, spec, "b")
    np.testing.assert_array_equal(b[2:, [0, 2]], a[2:, [1, 3]])
    assert not b[:2].any()


def test_torch_cpu_tensors_of_any_dtype() -> None:
    torch = pytest.importorskip("torch")
    spec = KVCacheSpec(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8, layout="HND")
    src = torch.randn(spec.tensor_shape, dtype=torch.bfloat16)
    dst = torch.zeros(spec.tensor_shape, dtype=torch.bfloat16)
    kernels.copy_blocks(src, spec, [3, 0], dst, spec.replace(layout="HND"), [1, 2])
    assert torch.equal(dst[:, 1], src[:, 3]) and torch.equal(dst[:, 2], src[:, 0])
    assert not dst[:, [0, 3]].any()


def test_in_place_copy_between_disjoint_blocks_is_allowed_overlap_is_not() -> None:
    spec = KVCacheSpec(num_layers=1, num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4, dtype="int32")
    cache = np.arange(spec.nbytes // 4, dtype=np.int32)
    kernels.copy_blocks(cache, spec, [0], cache, spec, [3])
    view = cache.reshape(spec.tensor_shape)
    np.testing.assert_array_equal(view[:, 3], view[:, 0])
    with pytest.raises(DescriptorError, match="same blocks"):
        kernels.copy_blocks(cache, spec, [0, 1], cache, spec, [1, 2])
    staging = kernels.staging_spec(spec, 2)
    with pytest.raises(DescriptorError, match="overlap"):
        kernels.gather_blocks(cache, spec, [0], cache, staging)


def test_bad_buffers() -> None:
    spec = KVCacheSpec(num_layers=1, num_blocks=2, block_size=2, num_kv_heads=1, head_dim=4)
    good = np.zeros(spec.nbytes, dtype=np.uint8)
    plan = kernels.plan_kv_copy(spec, spec, [0], [1])
    with pytest.raises(ConfigError, match="needs"):
        kernels.copy_kv(good, np.zeros(spec.nbytes - 1, dtype=np.uint8), plan)
    with pytest.raises(ConfigError, match="C-contiguous"):
        kernels.copy_kv(np.zeros((spec.nbytes, 2), dtype=np.uint8)[:, 0], good, plan)
    readonly = np.zeros(spec.nbytes, dtype=np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(ConfigError, match="read-only"):
        kernels.copy_kv(good, readonly, plan)
    with pytest.raises(ConfigError, match="stream"):
        kernels.copy_kv(good, good.copy(), plan, stream=1)
    with pytest.raises(ConfigError, match="KVCopyPlan"):
        kernels.copy_kv(good, good.copy(), "plan")  # type: ignore[arg-type]

    class FakeDeviceArray:
        __cuda_array_interface__: ClassVar[dict[str, object]] = {
            "data": (1 << 20, False),
            "shape": (spec.nbytes,),
            "typestr": "|u1",
            "version": 3,
        }

    with pytest.raises(ConfigError, match="both be host or both CUDA"):
        kernels.copy_kv(good, FakeDeviceArray(), plan)


def test_arrays_of_another_element_size_than_the_spec_are_refused_before_anything_moves() -> None:
    spec = KVCacheSpec(num_layers=1, num_blocks=2, block_size=2, num_kv_heads=1, head_dim=4)  # bfloat16
    plan = kernels.plan_kv_copy(spec, spec, [0], [1])
    source = random_bytes(np.random.default_rng(6), spec.nbytes)
    wide = np.full(spec.nbytes // 4, -7.0, dtype=np.float32)
    with pytest.raises(
        ConfigError,
        match=r"^dst: KVCacheSpec dtype 'bfloat16' has 2-byte elements, the dst array "
        r"holds 4-byte elements",
    ):
        kernels.copy_kv(source, wide, plan)
    assert (wide == -7.0).all()
    target = np.zeros(spec.nbytes, dtype=np.uint8)
    with pytest.raises(ConfigError, match=r"^src: .* the src array holds 4-byte elements"):
        kernels.copy_kv(wide, target, plan)
    assert not target.any()
    torch = pytest.importorskip("torch")
    with pytest.raises(ConfigError, match=r"^dst: .* the dst array holds 4-byte elements"):
        kernels.copy_kv(source, torch.zeros(spec.nbytes // 4, dtype=torch.float32), plan)

    class FakeDeviceArray:
        device = types.SimpleNamespace(id=0)

        def __init__(self, address: int, typestr: str, count: int) -> None:
            self.__cuda_array_interface__ = {
                "data": (address, False),
                "shape": (count,),
                "typestr": typestr,
                "version": 3,
            }

    with pytest.raises(ConfigError, match=r"^src: .* the src array holds 4-byte elements"):
        kernels.copy_kv(
            FakeDeviceArray(1 << 20, "<f4", spec.nbytes // 4), FakeDeviceArray(1 << 30, "|u1", spec.nbytes), plan
        )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_bytes_and_arrays_of_the_spec_element_size_are_accepted(dtype: type) -> None:
    spec = KVCacheSpec(num_layers=1, num_blocks=2, block_size=2, num_kv_heads=1, head_dim=4)  # bfloat16
    source = random_bytes(np.random.default_rng(7), spec.nbytes)
    target = np.zeros(spec.nbytes, dtype=np.uint8)
    kernels.copy_kv(source.view(dtype), target.view(dtype), kernels.plan_kv_copy(spec, spec, [0], [1]))
    half = spec.nbytes // 2
    assert target[half:].tobytes() == source[:half].tobytes() and not target[:half].any()


def test_empty_copy_is_a_no_op() -> None:
    spec = KVCacheSpec(num_layers=1, num_blocks=2, block_size=2, num_kv_heads=1, head_dim=4)
    data = np.ones(spec.nbytes, dtype=np.uint8)
    plan = kernels.plan_kv_copy(spec, spec, [], [], num_tokens=0)
    assert plan.nbytes == 0
    kernels.copy_kv(data, data.copy(), plan)


def test_import_loads_neither_cupy_nor_torch() -> None:
    code = "import sys, kvxfer.kernels; print(sorted(m for m in ('cupy', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
