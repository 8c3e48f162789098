"""The NumPy reference of csrc/id_copy.cu: the boxes a block-id request derives (:func:`derive_boxes`, line by line
as the kernel does, from nothing but the request's buffer) and the rows they copy (:func:`box_rows`). Tests compare
them with the table path's boxes and rows (tests/kernels/test_id_copy.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .id_copy import FIELD, HEADER_LEN


@dataclass(frozen=True)
class Boxes:
    """The boxes of one request (int64[num_boxes] each, host): byte offsets from each side's base pointer,
    token counts (0: an empty segment past the last token) and whether the ``full`` shape walks each."""

    src: np.ndarray
    dst: np.ndarray
    count: np.ndarray
    full: np.ndarray


def derive_boxes(buffer: np.ndarray) -> Boxes:
    """The NumPy reference of csrc/id_copy.cu's box derivation: every box of the request in ``buffer`` (from
    :func:`fill_buffer`), computed only from the buffer, step by step as the kernel does it."""
    h = buffer
    num_tokens, num_src_ids, num_dst_ids, num_layers, num_segments, num_parts, pieces, most, small = (
        int(h[FIELD[name]])
        for name in (
            "num_tokens",
            "num_src_ids",
            "num_dst_ids",
            "num_layers",
            "num_segments",
            "num_parts",
            "pieces",
            "most",
            "small",
        )
    )
    src_ids = h[HEADER_LEN : HEADER_LEN + num_src_ids]
    dst_ids = h[HEADER_LEN + num_src_ids : HEADER_LEN + num_src_ids + num_dst_ids]
    src_layers = h[HEADER_LEN + num_src_ids + num_dst_ids :][:num_layers]
    dst_layers = h[HEADER_LEN + num_src_ids + num_dst_ids + num_layers :][:num_layers]
    box = np.arange(num_segments * num_layers * num_parts, dtype=np.int64)
    layer_part = box // num_segments
    segment = box - layer_part * num_segments
    layer = layer_part // num_parts
    part = layer_part - layer * num_parts
    run = segment // pieces
    piece = segment - run * pieces
    start = run * small + piece * most
    live = start < num_tokens
    count = np.where(live, np.minimum(np.minimum(most, small - piece * most), num_tokens - start), 0)
    offsets = []
    for side, ids, layers in (("src", src_ids, src_layers), ("dst", dst_ids, dst_layers)):
        block_size = int(h[FIELD[f"{side}_block_size"]])
        block = np.where(live, start // block_size, 0)
        slot = start - block * block_size
        offsets.append(
            layers[layer] * h[FIELD[f"{side}_layer_stride"]]
            + part * h[FIELD[f"{side}_part_stride"]]
            + ids[block] * h[FIELD[f"{side}_block_stride"]]
            + slot * h[FIELD[f"{side}_token_stride"]]
        )
    full = count == h[FIELD["full_count"]]
    return Boxes(np.where(live, offsets[0], 0), np.where(live, offsets[1], 0), count, full)


def box_rows(buffer: np.ndarray, boxes: Boxes, vector: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every contiguous row the boxes copy: (src offsets, dst offsets: int64[r], row bytes), as the kernel walks
    them (unit, row) with ``vector``-byte columns; rows of the two shapes are cut to the shorter row length."""
    h = buffer
    lengths = [int(h[FIELD[f"{name}_row_vectors"]]) * vector for name in ("full", "odd")]
    row = math.gcd(*lengths)
    sources: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for index, name in enumerate(("full", "odd")):
        chosen = (boxes.full if name == "full" else ~boxes.full) & (boxes.count > 0)
        units = int(h[FIELD[f"{name}_units"]])
        unit_rows = int(h[FIELD[f"{name}_unit_rows"]])
        for box in np.flatnonzero(chosen):
            count = units or int(boxes.count[box])
            unit = np.arange(count, dtype=np.int64)[:, None, None]
            rows = np.arange(unit_rows, dtype=np.int64)[None, :, None]
            cuts = np.arange(lengths[index] // row, dtype=np.int64)[None, None, :] * row
            for side, origin, out in (("src", boxes.src, sources), ("dst", boxes.dst, targets)):
                out.append(
                    (
                        origin[box]
                        + unit * h[FIELD[f"{name}_{side}_unit"]]
                        + rows * h[FIELD[f"{name}_{side}_row"]]
                        + cuts
                    ).ravel()
                )
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(sources) if sources else empty, np.concatenate(targets) if targets else empty, row)
