"""kvxfer.kernels.boxes: a folded box moves exactly the bytes of the unfolded one, each once."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.errors import ConfigError
from kvxfer.kernels.boxes import box_form

pytestmark = pytest.mark.timeout(120)


def _pairs(count: int, dims: list[tuple[int, int, int]], row: int) -> list[tuple[int, int]]:
    """(src byte, dst byte) of every byte of a box: ``dims`` outermost first, then ``row`` contiguous bytes."""
    out = []
    for index in itertools.product(*(range(size) for size, _, _ in dims)):
        src = sum(i * s for i, (_, s, _) in zip(index, dims, strict=True))
        dst = sum(i * d for i, (_, _, d) in zip(index, dims, strict=True))
        out += [(src + b, dst + b) for b in range(row)]
    return out


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    heads=st.integers(1, 3),
    row=st.sampled_from([1, 2, 4]),
    layout=st.sampled_from(["NHD", "HND", "mixed", "padded"]),
    block=st.integers(1, 4),
    pad=st.integers(0, 2),
)
def test_folded_box_moves_the_same_bytes(
    counts: list[int], heads: int, row: int, layout: str, block: int, pad: int
) -> None:
    block = max(block, max(counts))
    nhd, hnd = (heads * row, row), (row, block * row)  # (token stride, head stride)
    sides = {
        "NHD": (nhd, nhd),
        "HND": (hnd, hnd),
        "mixed": (nhd, hnd),
        "padded": ((heads * row + pad, row), (row, block * row + pad)),
    }[layout]
    (s_token, s_head), (d_token, d_head) = sides
    form = box_form(np.array(counts), [(heads, s_head, d_head)], row, (s_token, d_token))
    for count, units in zip(counts, form.counts, strict=True):
        expected = _pairs(count, [(count, s_token, d_token), (heads, s_head, d_head)], row)
        folded = _pairs(int(units), [(int(units), *form.unit_strides), (form.unit_rows, *form.row_strides)], form.row)
        assert sorted(folded) == sorted(expected)
        assert len(set(b for _, b in folded)) == len(folded)  # each destination byte once
    if form.contiguous:
        assert form.unit_rows == 1 and form.unit_strides == (form.row, form.row)


def test_uniform_hnd_blocks_fold_to_one_run_and_mixed_layouts_keep_rows() -> None:
    run = box_form(np.array([16, 16]), [(8, 16 * 256, 16 * 256)], 256, (256, 256))
    assert run.contiguous and run.row == 8 * 16 * 256 and run.counts.tolist() == [1, 1]
    partial = box_form(np.array([16, 5]), [(8, 16 * 256, 16 * 256)], 256, (256, 256))
    assert not partial.contiguous and (partial.unit_rows, partial.row) == (8, 256)
    assert partial.counts.tolist() == [16, 5]
    mixed = box_form(np.array([16]), [(8, 256, 16 * 256)], 256, (8 * 256, 256))
    assert (mixed.counts.tolist(), mixed.unit_rows, mixed.row) == ([16], 8, 256)


def test_more_than_two_dimensions_are_refused() -> None:
    with pytest.raises(ConfigError, match="at most"):
        box_form(np.array([3, 2]), [(2, 1000, 7), (3, 50, 300)], 4, (5000, 4))
