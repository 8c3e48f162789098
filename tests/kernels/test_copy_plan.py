"""Host planning of KV copies: validation, segments, kernel tables (executed in NumPy), launch shapes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.errors import ConfigError, DescriptorError, LayoutMismatchError
from kvxfer.kernels import plan_kv_copy, reference, staging_spec
from kvxfer.kernels.copy_plan import KVCopyPlan
from kvxfer.kernels.launch import DEFAULT_TUNING, KernelTuning, fast_divisor, launch_shape
from kvxfer.spec import KVCacheSpec
from tests.kernels.cases import random_case, random_spec

pytestmark = pytest.mark.timeout(120)

SPEC = KVCacheSpec(num_layers=4, num_blocks=16, block_size=16, num_kv_heads=8, head_dim=64, layout="NHD")


def test_default_plan_covers_everything() -> None:
    plan = plan_kv_copy(SPEC, SPEC.replace(layout="HND"), [3, 1], [0, 7])
    assert plan.num_tokens == 32 and plan.num_heads == 8
    assert plan.src_layers.tolist() == [0, 1, 2, 3] and plan.dst_layers.tolist() == [0, 1, 2, 3]
    assert plan.parts.tolist() == [0, 1]
    assert plan.nbytes == 4 * 2 * 32 * 8 * 64 * 2


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(head_dim=128), LayoutMismatchError),
        (dict(dtype="float16"), LayoutMismatchError),
        (dict(dtype="float32"), LayoutMismatchError),
        (dict(num_kv_parts=1), LayoutMismatchError),
        (dict(num_kv_heads=4, total_kv_heads=None), LayoutMismatchError),  # default head ranges differ in size
    ],
)
def test_incompatible_specs(change: dict, error: type) -> None:
    with pytest.raises(error):
        plan_kv_copy(SPEC, SPEC.replace(**change), [0], [0])


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(src_block_ids=[16]), DescriptorError, "[0, 16)"),
        (dict(dst_block_ids=[-1]), DescriptorError, "[0, 16)"),
        (dict(src_block_ids=[[0]]), DescriptorError, "1-D"),
        (dict(src_block_ids=[0.5]), DescriptorError, "integers"),
        (dict(src_block_ids=[0, 1], dst_block_ids=[0, 1], num_tokens=16), DescriptorError, "need 1"),
        (dict(src_block_ids=[0, 1], dst_block_ids=[0, 1], num_tokens=40), DescriptorError, "need 3"),
        (dict(src_block_ids=[0, 1], dst_block_ids=[5, 5]), DescriptorError, "repeat"),
        (dict(src_layers=[0, 1], dst_layers=[2, 2]), DescriptorError, "repeat"),
        (dict(src_layers=[0, 1], dst_layers=[2]), DescriptorError, "pair"),
        (dict(src_layers=[4]), DescriptorError, "src_layers"),
        (dict(parts=[0, 0]), DescriptorError, "repeat"),
        (dict(parts=[2]), DescriptorError, "parts"),
        (dict(src_heads=(0, 4), dst_heads=(0, 3)), LayoutMismatchError, "as many heads"),
        (dict(src_heads=(4, 9), dst_heads=(0, 5)), ConfigError, "src_heads"),
        (dict(src_heads=(2, 2), dst_heads=(0, 0)), ConfigError, "src_heads"),
        (dict(src_heads="ab"), ConfigError, "pair"),
        (dict(num_tokens=-1), ConfigError, "num_tokens"),
        (dict(num_tokens=2.0), ConfigError, "num_tokens"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, words: str) -> None:
    arguments = dict(src_block_ids=[0], dst_block_ids=[1]) | kwargs
    src_ids, dst_ids = arguments.pop("src_block_ids"), arguments.pop("dst_block_ids")
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        plan_kv_copy(SPEC, SPEC, src_ids, dst_ids, **arguments)


def test_not_a_spec() -> None:
    with pytest.raises(ConfigError):
        plan_kv_copy("spec", SPEC, [0], [0])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        staging_spec(None, 4)  # type: ignore[arg-type]


def test_source_blocks_may_repeat_and_selections_accept_ranges() -> None:
    plan = plan_kv_copy(SPEC, SPEC, [2, 2], [0, 1], src_layers=range(1, 3), dst_layers=slice(2, 4), parts=[1])
    assert plan.src_layers.tolist() == [1, 2] and plan.dst_layers.tolist() == [2, 3] and plan.parts.tolist() == [1]


@settings(max_examples=150, deadline=None)
@given(tokens=st.integers(0, 200), src_block=st.integers(1, 40), dst_block=st.integers(1, 40))
def test_segments_are_maximal_runs_inside_one_block_per_side(tokens: int, src_block: int, dst_block: int) -> None:
    src = SPEC.replace(block_size=src_block, num_blocks=256, layout="HND")
    dst = SPEC.replace(block_size=dst_block, num_blocks=256)
    n_src, n_dst = -(-tokens // src_block), -(-tokens // dst_block)
    plan = plan_kv_copy(
        src,
        dst,
        np.arange(n_src)[::-1],
        np.arange(n_dst) * 2 % 256 if n_dst <= 128 else np.arange(n_dst),
        num_tokens=tokens,
    )
    tables = plan.tables
    counts = tables.segment_tokens
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    assert counts.sum() == tokens and (counts > 0).all()
    last = starts + counts - 1
    assert (starts // src_block == last // src_block).all() and (starts // dst_block == last // dst_block).all()
    # maximal: every boundary is a block boundary of at least one side
    inner = starts[1:]
    assert ((inner % src_block == 0) | (inner % dst_block == 0)).all()
    assert tables.num_layer_parts == 4 * 2


def _execute_tables(plan: KVCopyPlan, src: np.ndarray, dst: np.ndarray) -> None:
    """The kernel's walk over its tables, in NumPy: per (layer-part, segment) box, count x unit_rows rows."""
    t = plan.tables
    n = t.num_segments
    seg_src, seg_dst, seg_count = t.table[:n], t.table[n : 2 * n], t.table[2 * n : 3 * n]
    part_src, part_dst = t.table[3 * n : 3 * n + t.num_layer_parts], t.table[3 * n + t.num_layer_parts :]
    column = np.arange(t.row_nbytes)
    for lp in range(t.num_layer_parts):
        for s in range(n):
            unit = np.repeat(np.arange(seg_count[s]), t.unit_rows)
            row = np.tile(np.arange(t.unit_rows), int(seg_count[s]))
            a = t.src_base + part_src[lp] + seg_src[s] + unit * t.src_unit_stride + row * t.src_row_stride
            b = t.dst_base + part_dst[lp] + seg_dst[s] + unit * t.dst_unit_stride + row * t.dst_row_stride
            dst[(b[:, None] + column).ravel()] = src[(a[:, None] + column).ravel()]
    if t.contiguous:  # a run: count * row_nbytes bytes from the box start on both sides
        assert t.unit_rows == 1 and t.src_unit_stride == t.dst_unit_stride == t.row_nbytes


@pytest.mark.parametrize("seed", range(40))
def test_kernel_tables_describe_the_reference_copy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    itemsize, head_dim, parts = int(rng.choice([1, 2, 4, 8])), int(rng.integers(1, 9)), int(rng.integers(1, 3))
    src_spec = random_spec(
        rng,
        num_layers=3,
        num_blocks=8,
        block_size=int(rng.integers(1, 7)),
        num_kv_heads=int(rng.integers(1, 5)),
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    dst_spec = random_spec(
        rng,
        num_layers=3,
        num_blocks=10,
        block_size=int(rng.integers(1, 7)),
        num_kv_heads=int(rng.integers(1, 5)),
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    capacity = min(8 * src_spec.block_size, 10 * dst_spec.block_size)
    case = random_case(rng, src_spec=src_spec, dst_spec=dst_spec, num_tokens=int(rng.integers(0, capacity + 1)))
    expected, actual = case.dst.copy(), case.dst.copy()
    reference.copy_kv(case.src, expected, case.plan)
    _execute_tables(case.plan, case.src, actual)
    np.testing.assert_array_equal(actual, expected)
    t = case.plan.tables
    assert 16 % t.alignment == 0 and t.row_nbytes % t.alignment == 0


def test_heads_merge_into_one_row_when_adjacent_on_both_sides() -> None:
    nhd = SPEC
    plan = plan_kv_copy(nhd, nhd.replace(num_kv_heads=4, tp_size=2), [0], [1], src_heads=(4, 8), num_tokens=15)
    assert plan.tables.unit_rows == 1 and plan.tables.row_nbytes == 4 * 64 * 2 and not plan.tables.contiguous
    hnd = plan_kv_copy(nhd.replace(layout="HND"), nhd, [0], [1], num_tokens=15).tables
    assert hnd.unit_rows == 8 and hnd.row_nbytes == 128 and hnd.max_count == 15


@pytest.mark.parametrize(
    "case, expected",
    [
        # (unit count, unit rows, row bytes, contiguous); SPEC: 16-token blocks, 8 heads x 64 x bf16 (128 B rows)
        ("NHD full heads -> NHD, partial block", (16, 1, 8 * 128, True)),
        ("HND -> HND same block size, whole blocks", (1, 1, 8 * 16 * 128, True)),
        ("HND -> HND TP half, whole blocks", (1, 1, 4 * 16 * 128, True)),
        ("HND -> HND staging, whole blocks", (8, 1, 16 * 128, False)),
        ("HND -> HND staging, partial block", (16, 8, 128, False)),
        ("NHD -> HND, whole blocks", (16, 8, 128, False)),
        ("NHD -> NHD staging, partial block", (16, 1, 8 * 128, True)),
    ],
)
def test_box_forms_fold_what_is_contiguous_on_both_sides(case: str, expected: tuple) -> None:
    hnd, nhd = SPEC.replace(layout="HND"), SPEC
    half = hnd.replace(num_kv_heads=4, tp_size=2, tp_rank=1)
    plans = {
        "NHD full heads -> NHD, partial block": lambda: plan_kv_copy(nhd, nhd, [0, 1], [5, 3], num_tokens=31),
        "HND -> HND same block size, whole blocks": lambda: plan_kv_copy(hnd, hnd, [0, 1], [5, 3]),
        "HND -> HND TP half, whole blocks": lambda: plan_kv_copy(hnd, half, [0, 1], [5, 3], src_heads=(4, 8)),
        "HND -> HND staging, whole blocks": lambda: plan_kv_copy(hnd, staging_spec(hnd, 32), [0, 1], [0]),
        "HND -> HND staging, partial block": lambda: plan_kv_copy(hnd, staging_spec(hnd, 31), [0, 1], [0]),
        "NHD -> HND, whole blocks": lambda: plan_kv_copy(nhd, hnd, [0, 1], [5, 3]),
        "NHD -> NHD staging, partial block": lambda: plan_kv_copy(
            nhd, staging_spec(nhd, 31, layout="NHD"), [0, 1], [0]
        ),
    }
    plan = plans[case]()
    t = plan.tables
    assert (t.max_count, t.unit_rows, t.row_nbytes, t.contiguous) == expected
    assert t.narrow
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, plan.src_spec.nbytes, dtype=np.uint8)
    expected_dst = rng.integers(0, 256, plan.dst_spec.nbytes, dtype=np.uint8)
    actual = expected_dst.copy()
    reference.copy_kv(src, expected_dst, plan)
    _execute_tables(plan, src, actual)
    np.testing.assert_array_equal(actual, expected_dst)


def test_boxes_reaching_past_2_gib_are_wide() -> None:
    # Token axis outermost: one box's tokens lie a whole layer-block grid apart (> 2 GiB here).
    big = KVCacheSpec(
        num_layers=2,
        num_blocks=4,
        block_size=4,
        num_kv_heads=1,
        head_dim=64,
        strides=(4 * 2 * 64, 2 * 64, 64, 64, 2**30, 1),
    )
    plan = plan_kv_copy(big, staging_spec(big, 7), [0, 2], [0], num_tokens=7)
    assert not plan.tables.narrow and plan.tables.unit_rows == 1 and plan.tables.max_count == 4
    assert launch_shape(plan.tables, 0, 0, DEFAULT_TUNING).entry == "kvxfer_rows_wide_v16"


def test_fast_divisor_matches_integer_division() -> None:
    picks = random.Random(3)
    divisors = list(range(1, 600)) + [picks.randrange(1, 2**31) for _ in range(400)] + [2**31 - 1, 2**30 + 1]
    for divisor in divisors:
        multiplier, shift = fast_divisor(divisor)
        assert 0 <= multiplier < 2**32
        for n in [0, 1, divisor - 1, divisor, 2**31 - 1] + [picks.randrange(2**31) for _ in range(20)]:
            quotient = n if multiplier == 0 else ((n * multiplier) >> 32) >> shift
            assert quotient == n // divisor, (divisor, n)
    with pytest.raises(ConfigError):
        fast_divisor(0)


def test_launch_shape_vector_width_and_groups() -> None:
    bf16 = KVCacheSpec(num_layers=32, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=128, layout="NHD")
    plan = plan_kv_copy(bf16, staging_spec(bf16, 16 * 4), [1, 5, 9, 2], [0])  # NHD -> HND staging: rows
    shape = launch_shape(plan.tables, 1 << 20, 2 << 20, DEFAULT_TUNING)
    assert shape.vector_bytes == 16 and shape.entry == "kvxfer_rows_v16" and shape.threads == 256
    assert shape.scalars[5] == 256 // 16  # vectors per row: one head's 128 bf16
    assert 1 << int(shape.scalars[-1]) == 256  # 32 KiB boxes: a whole CTA per box
    assert shape.num_ctas == plan.tables.num_boxes
    assert launch_shape(plan.tables, (1 << 20) + 4, 2 << 20, DEFAULT_TUNING).vector_bytes == 4
    assert launch_shape(plan.tables, 1 << 20, 2 << 20, DEFAULT_TUNING, max_ctas=10).num_ctas == 10
    small_cta = launch_shape(plan.tables, 0, 0, KernelTuning(threads=128))
    assert small_cta.threads == 128 and 1 << int(small_cta.scalars[-1]) == 128
    one_head = bf16.replace(num_kv_heads=1, total_kv_heads=8, tp_size=8)
    small = plan_kv_copy(one_head, staging_spec(one_head, 64), [1, 5, 9, 2], [0])  # 4 KiB boxes
    shape = launch_shape(small.tables, 0, 0, DEFAULT_TUNING)
    assert shape.entry == "kvxfer_run_v16"  # one head: a block's tokens are one run on both sides
    assert 1 << int(shape.scalars[-1]) == 64 and shape.num_ctas == -(-small.tables.num_boxes // 4)
    assert launch_shape(small.tables, 0, 0, KernelTuning(runs=False)).entry == "kvxfer_rows_v16"
    with pytest.raises(ConfigError):
        KernelTuning(threads=96)
    with pytest.raises(ConfigError):
        KernelTuning(unroll=3)


def test_staging_spec_is_contiguous_layer_part_head_token_dim() -> None:
    spec = staging_spec(SPEC, 40, heads=(2, 6))
    assert spec.tensor_shape == (4, 1, 2, 4, 40, 64)
    assert spec.element_strides == (2 * 4 * 40 * 64, 2 * 4 * 40 * 64, 4 * 40 * 64, 40 * 64, 64, 1)
    assert spec.nbytes == 4 * 2 * 4 * 40 * 64 * 2 and spec.dtype == SPEC.dtype
    assert staging_spec(SPEC, 8, num_layers=2, layout="NHD", offset=10).element_strides[3:] == (64, 8 * 64, 1)
    with pytest.raises(ConfigError):
        staging_spec(SPEC, 0)


def test_long_runs_are_cut_into_boxes_of_at_most_max_box_bytes() -> None:
    from kvxfer.kernels.copy_plan import MAX_BOX_BYTES

    big = KVCacheSpec(num_layers=2, num_blocks=4, block_size=256, num_kv_heads=8, head_dim=128, layout="HND")
    staging = staging_spec(big, 600)
    plan = plan_kv_copy(big, staging, [3, 0, 2], [0], num_tokens=600)
    per_token = 8 * 128 * 2
    counts = plan.tables.segment_tokens
    assert counts.max() == MAX_BOX_BYTES // per_token
    assert counts.sum() == 600 and counts.max() * per_token <= MAX_BOX_BYTES
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, big.nbytes, dtype=np.uint8)
    expected, actual = np.zeros(staging.nbytes, np.uint8), np.zeros(staging.nbytes, np.uint8)
    reference.copy_kv(src, expected, plan)
    _execute_tables(plan, src, actual)
    np.testing.assert_array_equal(actual, expected)
