"""The block-id KV copy's address derivation (kvxfer/kernels/id_copy.py) against today's table path: the same boxes
in the same order, the same rows, the same bytes, over many specs, head slices, block sizes and shuffled ids."""

from __future__ import annotations

import numpy as np
import pytest

import kvxfer.kernels as kernels
from kvxfer.kernels import KVCopyPlan, reference
from kvxfer.kernels.id_copy import id_copy_form
from kvxfer.kernels.id_reference import Boxes, box_rows, derive_boxes
from kvxfer.spec import KVCacheSpec
from tests.kernels.cases import random_bytes
from tests.kernels.id_cases import (
    buffer_of,
    cut_rows,
    form_of,
    live_boxes,
    random_request,
    table_boxes,
    table_rows,
)

pytestmark = pytest.mark.timeout(120)


def _check(plan: KVCopyPlan, src: np.ndarray, dst: np.ndarray) -> Boxes:
    """Assert the id path derives exactly the table path's fragments of ``plan`` and lands the same bytes."""
    form = form_of(plan)
    assert form is not None
    tables = plan.tables
    assert (form.src_base, form.dst_base) == (tables.src_base, tables.dst_base)
    assert tables.alignment % form.alignment == 0 or form.alignment % tables.alignment == 0
    buffer = buffer_of(plan, form)
    boxes = derive_boxes(buffer)
    for mine, theirs in zip(live_boxes(boxes), table_boxes(plan), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    piece = plan.src_spec.head_dim * plan.src_spec.itemsize
    my_src, my_dst, my_row = box_rows(buffer, boxes, 1)
    table_src, table_dst, table_row = table_rows(plan)
    np.testing.assert_array_equal(
        cut_rows(my_src, my_dst, my_row, piece), cut_rows(table_src, table_dst, table_row, piece)
    )
    expected = dst.copy()
    reference.copy_kv(src, expected, plan)
    pairs = cut_rows(my_src, my_dst, my_row, piece)
    byte = np.arange(piece, dtype=np.int64)
    dst[(pairs[:, 1:2] + form.dst_base + byte).ravel()] = src[(pairs[:, 0:1] + form.src_base + byte).ravel()]
    np.testing.assert_array_equal(dst, expected)
    return boxes


@pytest.mark.parametrize("seed", range(80))
def test_random_requests_derive_the_table_paths_fragments(seed: int) -> None:
    case = random_request(seed)
    _check(case.plan, case.src, case.dst)


def _llama(block_size: int, layout: str, heads: int = 8, tp: tuple[int, int] = (1, 0), blocks: int = 40) -> KVCacheSpec:
    return KVCacheSpec(
        num_layers=3,
        num_blocks=blocks,
        block_size=block_size,
        num_kv_heads=heads,
        head_dim=128,
        dtype="bfloat16",
        layout=layout,
        tp_size=tp[0],
        tp_rank=tp[1],
        total_kv_heads=8,
    )


@pytest.mark.parametrize(
    "src_block, dst_block, src_layout, dst_layout, src_tp, dst_tp, tokens",
    [
        (16, 16, "HND", "HND", 1, 1, 16 * 9),  # same layout: every box one contiguous run
        (16, 16, "HND", "HND", 1, 1, 16 * 9 - 5),  # a partly filled last block: the odd shape
        (16, 16, "NHD", "HND", 1, 1, 150),
        (16, 32, "HND", "NHD", 1, 1, 200),
        (32, 16, "NHD", "NHD", 1, 1, 199),
        (16, 16, "HND", "HND", 1, 2, 160),  # TP 1 -> 2: each decode rank takes half the heads
        (16, 16, "NHD", "NHD", 1, 2, 77),
        (16, 16, "HND", "HND", 2, 1, 160),  # TP 2 -> 1: each prefill rank fills half the heads
        (32, 16, "HND", "NHD", 2, 1, 301),
        (256, 256, "NHD", "HND", 1, 1, 600),  # 512 KiB blocks: cut into 64 KiB pieces
        (64, 256, "NHD", "NHD", 1, 2, 700),
    ],
)
def test_llama_shaped_requests(
    src_block: int, dst_block: int, src_layout: str, dst_layout: str, src_tp: int, dst_tp: int, tokens: int
) -> None:
    rng = np.random.default_rng(src_block * 7 + dst_block + tokens)
    for src_rank in range(src_tp):
        for dst_rank in range(dst_tp):
            src_spec = _llama(
                src_block, src_layout, 8 // src_tp, (src_tp, src_rank), blocks=-(-tokens // src_block) + 4
            )
            dst_spec = _llama(
                dst_block, dst_layout, 8 // dst_tp, (dst_tp, dst_rank), blocks=-(-tokens // dst_block) + 4
            )
            lo = max(src_spec.head_range()[0], dst_spec.head_range()[0])
            hi = min(src_spec.head_range()[1], dst_spec.head_range()[1])
            if lo >= hi:
                continue
            src_heads = (lo - src_spec.head_range()[0], hi - src_spec.head_range()[0])
            dst_heads = (lo - dst_spec.head_range()[0], hi - dst_spec.head_range()[0])
            src_ids = rng.permutation(src_spec.num_blocks)[: -(-tokens // src_block)]
            dst_ids = rng.permutation(dst_spec.num_blocks)[: -(-tokens // dst_block)]
            plan = kernels.plan_kv_copy(
                src_spec,
                dst_spec,
                src_ids,
                dst_ids,
                num_tokens=tokens,
                src_layers=[2, 0],
                dst_layers=[1, 2],
                src_heads=src_heads,
                dst_heads=dst_heads,
            )
            boxes = _check(plan, random_bytes(rng, src_spec.nbytes), random_bytes(rng, dst_spec.nbytes))
            form = form_of(plan)
            assert form is not None and form.pieces == -(-min(src_block, dst_block) // form.most)
            if src_layout == dst_layout == "HND" and src_block == dst_block and tokens % src_block == 0:
                assert form.full.contiguous and bool(boxes.full[boxes.count > 0].all())


def test_mla_single_part_and_every_layer() -> None:
    rng = np.random.default_rng(3)
    spec = KVCacheSpec(num_layers=4, num_blocks=12, block_size=16, num_kv_heads=1, head_dim=576, num_kv_parts=1)
    other = spec.replace(block_size=64, num_blocks=5)
    plan = kernels.plan_kv_copy(spec, other, rng.permutation(12)[:10], rng.permutation(5)[:3], num_tokens=150)
    _check(plan, random_bytes(rng, spec.nbytes), random_bytes(rng, other.nbytes))


def test_unsupported_pairs_take_the_table_path() -> None:
    spec = KVCacheSpec(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=4, head_dim=8)
    assert id_copy_form(spec, spec.replace(block_size=24), (0, 4), (0, 4)) is None  # 24 and 16 do not divide
    assert id_copy_form(spec, spec.replace(head_dim=16), (0, 4), (0, 4)) is None
    assert id_copy_form(spec, spec.replace(dtype="float32"), (0, 4), (0, 4)) is None
    assert id_copy_form(spec, spec.replace(num_kv_parts=1), (0, 4), (0, 4)) is None
    assert id_copy_form(spec, spec, (0, 4), (0, 2)) is None
    assert id_copy_form(spec, spec.replace(block_size=64, layout="NHD"), (1, 3), (2, 4)) is not None


def test_empty_and_one_token_requests() -> None:
    spec = KVCacheSpec(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=4, head_dim=8)
    plan = kernels.plan_kv_copy(spec, spec, [], [], num_tokens=0)
    form = form_of(plan)
    assert form is not None and form.num_segments(0) == 0
    assert derive_boxes(buffer_of(plan, form)).count.size == 0
    rng = np.random.default_rng(4)
    one = kernels.plan_kv_copy(spec, spec.replace(layout="NHD"), [3], [5], num_tokens=1)
    boxes = _check(one, random_bytes(rng, spec.nbytes), random_bytes(rng, spec.nbytes))
    assert boxes.count.tolist() == [1, 1, 1, 1] and not boxes.full.any()
