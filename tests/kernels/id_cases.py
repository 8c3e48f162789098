"""Requests of the block-id KV copy (kvxfer/kernels/id_copy.py) built from table-path plans, and the table path's
boxes and rows to compare them with."""

from __future__ import annotations

import numpy as np

from kvxfer.kernels import KVCopyPlan
from kvxfer.kernels.id_copy import HEADER_LEN, IdCopyForm, buffer_entries, fill_buffer, id_copy_form
from kvxfer.kernels.id_reference import Boxes, derive_boxes
from tests.kernels.cases import Case, random_case, random_spec

BLOCK_SIZES = (1, 2, 4, 8, 16, 32)


def random_request(seed: int) -> Case:
    """A random table-path plan (every K/V part) whose block sizes divide one another, with host buffers:
    layouts, padded strides, offsets, head slices, layer subsets and shuffled ids vary with ``seed``."""
    rng = np.random.default_rng(seed)
    itemsize = int(rng.choice([1, 2, 4]))
    head_dim = int(rng.choice([1, 4, 8, 64]))
    parts, layers = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    src_block = int(rng.choice(BLOCK_SIZES))
    dst_block = src_block * int(rng.choice([1, 2, 4])) if seed % 2 else max(1, src_block // int(rng.choice([1, 2])))
    src_spec = random_spec(
        rng,
        num_layers=layers,
        num_blocks=int(rng.integers(3, 10)),
        block_size=src_block,
        num_kv_heads=int(rng.integers(1, 5)),
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    dst_spec = random_spec(
        rng,
        num_layers=layers + int(rng.integers(0, 2)),
        num_blocks=int(rng.integers(6, 12)),
        block_size=dst_block,
        num_kv_heads=int(rng.integers(1, 5)),
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    capacity = min(src_spec.num_blocks * src_block, dst_spec.num_blocks * dst_block)
    tokens = int(rng.integers(1, capacity + 1))
    return random_case(rng, src_spec=src_spec, dst_spec=dst_spec, num_tokens=tokens, part_subset=False)


def form_of(plan: KVCopyPlan) -> IdCopyForm | None:
    """The id form of a plan's specs and head ranges (None where the id path does not apply)."""
    return id_copy_form(plan.src_spec, plan.dst_spec, plan.src_heads, plan.dst_heads)


def buffer_of(plan: KVCopyPlan, form: IdCopyForm, vector: int = 1, group: int = 32) -> np.ndarray:
    """The id buffer of the same request as ``plan`` (which must move every K/V part)."""
    assert np.array_equal(plan.parts, np.arange(plan.src_spec.num_kv_parts))
    out = np.full(
        buffer_entries(len(plan.src_block_ids), len(plan.dst_block_ids), len(plan.src_layers)) + 3, -1, np.int64
    )
    written = fill_buffer(
        out,
        form.header(vector, group),
        form.num_segments(plan.num_tokens),
        plan.src_block_ids,
        plan.dst_block_ids,
        plan.src_layers,
        plan.dst_layers,
        plan.num_tokens,
    )
    assert written == len(out) - 3 and (out[written:] == -1).all() and written > HEADER_LEN - 1
    return out[:written]


def table_boxes(plan: KVCopyPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src offsets, dst offsets, token counts) of the table path's boxes, in launch order."""
    tables = plan.tables
    n, lp = tables.num_segments, tables.num_layer_parts
    table = tables.table
    part_src, part_dst = table[3 * n : 3 * n + lp], table[3 * n + lp :]
    src = (part_src[:, None] + table[:n][None, :]).ravel()
    dst = (part_dst[:, None] + table[n : 2 * n][None, :]).ravel()
    return src, dst, np.tile(tables.segment_tokens, lp)


def live_boxes(boxes: Boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-empty boxes of a derivation, in launch order."""
    live = boxes.count > 0
    return boxes.src[live], boxes.dst[live], boxes.count[live]


def table_rows(plan: KVCopyPlan) -> tuple[np.ndarray, np.ndarray, int]:
    """Every contiguous row the table path copies: (src, dst offsets from the bases, row bytes)."""
    tables = plan.tables
    n = tables.num_segments
    src, dst, _ = table_boxes(plan)
    units = np.tile(tables.table[2 * n : 3 * n], tables.num_layer_parts)
    sources, targets = [], []
    for box in range(len(src)):
        unit = np.arange(int(units[box]), dtype=np.int64)[:, None]
        rows = np.arange(tables.unit_rows, dtype=np.int64)[None, :]
        sources.append((src[box] + unit * tables.src_unit_stride + rows * tables.src_row_stride).ravel())
        targets.append((dst[box] + unit * tables.dst_unit_stride + rows * tables.dst_row_stride).ravel())
    empty = np.zeros(0, np.int64)
    return (
        np.concatenate(sources) if sources else empty,
        np.concatenate(targets) if targets else empty,
        tables.row_nbytes,
    )


def cut_rows(src: np.ndarray, dst: np.ndarray, length: int, piece: int) -> np.ndarray:
    """Rows of ``length`` bytes cut into rows of ``piece`` bytes: int64[r, 2] of (src, dst), sorted."""
    assert length % piece == 0
    cuts = np.arange(length // piece, dtype=np.int64) * piece
    pairs = np.stack([(src[:, None] + cuts).ravel(), (dst[:, None] + cuts).ravel()], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def request_boxes(plan: KVCopyPlan, form: IdCopyForm) -> Boxes:
    """The id path's derivation of ``plan``'s request."""
    return derive_boxes(buffer_of(plan, form))
