"""KV copy boxes: where the token segments are cut, and how one box is walked (dimensions folded where they are
contiguous on both sides).

Pure NumPy/Python, used by tables.py. A box copies ``count`` x (fixed dimensions) x ``row`` bytes between two
strided layouts; folding turns it into ``count`` units x ``unit_rows`` rows x one contiguous row, with the row as
long as the layouts allow (a whole box when it is contiguous on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class BoxShape:
    """How every box of a copy is walked: ``units`` units per box when every box has the same count (else None) of
    ``unit_rows`` rows x ``row`` bytes, strides (src, dst) in bytes."""

    units: int | None
    unit_rows: int
    row: int
    unit_strides: tuple[int, int]
    row_strides: tuple[int, int]

    @property
    def contiguous(self) -> bool:
        """Every box is one run of ``count * row`` bytes on both sides."""
        return self.unit_rows == 1 and self.unit_strides == (self.row, self.row)


@dataclass(frozen=True)
class BoxForm(BoxShape):
    """A :class:`BoxShape` with each box's count of units (``counts[i]``, int64)."""

    counts: np.ndarray


def box_form(
    counts: np.ndarray, inner: list[tuple[int, int, int]], row: int, count_strides: tuple[int, int]
) -> BoxForm:
    """Fold a box's dimensions: segment ``i`` copies ``counts[i]`` x ``inner`` x ``row`` contiguous bytes.

    ``inner``: the fixed dimensions below the counted one, outermost first, as (size, src stride, dst stride);
    ``count_strides``: (src, dst) strides of the counted dimension. A dimension whose strides equal the row's
    length on both sides continues the row (it is folded into it); two dimensions that continue each other on both
    sides become one. When every count is equal the counted dimension is folded like the others. At most one
    dimension may remain besides the counted one (a KV box has one: heads).
    """
    uniform = counts.size > 0 and bool((counts == counts[0]).all())
    shape = box_shape(int(counts[0]) if uniform else None, inner, row, count_strides)
    box_counts = np.full(counts.shape, shape.units, dtype=np.int64) if uniform else counts.astype(np.int64)
    return BoxForm(shape.units, shape.unit_rows, shape.row, shape.unit_strides, shape.row_strides, box_counts)


def box_shape(
    uniform_count: int | None, inner: list[tuple[int, int, int]], row: int, count_strides: tuple[int, int]
) -> BoxShape:
    """The folding of :func:`box_form` for counts that all equal ``uniform_count`` (None: counts that differ).

    Depends on the counts only through that: planning caches it per block-size pair and count.
    """
    if uniform_count is not None:  # a fixed-shape box: the counted dimension folds like any other
        *dims, (row, _, _) = _fold([(uniform_count, *count_strides), *inner], row)
        dims = dims or [(1, row, row)]
    else:
        *rest, (row, _, _) = _fold(list(inner), row)
        dims = [(0, *count_strides), *rest]
    if len(dims) == 1:
        dims.append((1, row, row))
    if len(dims) != 2:
        raise ConfigError(f"a KV box folds to at most a counted dimension and one other, got {dims}")
    (units, *unit_strides), (rows, *row_strides) = dims
    if rows == 1:
        row_strides = [row, row]
    return BoxShape(
        units if uniform_count is not None else None,
        rows,
        row,
        (unit_strides[0], unit_strides[1]),
        (row_strides[0], row_strides[1]),
    )


def _fold(dims: list[tuple[int, int, int]], row: int) -> list[tuple[int, int, int]]:
    """Drop size-1 dimensions, fold into the row those continuing it on both sides, merge adjacent ones.

    Returns the remaining dimensions (outermost first) followed by ``(row, row, row)``.
    """
    dims = [d for d in dims if d[0] > 1]
    while True:
        folded = next((d for d in dims if d[1] == row and d[2] == row), None)
        if folded is not None:
            dims.remove(folded)
            row *= folded[0]
            continue
        pair = next(
            (
                (i, j)
                for i in range(len(dims))
                for j in range(len(dims))
                if i != j and dims[i][1] == dims[j][0] * dims[j][1] and dims[i][2] == dims[j][0] * dims[j][2]
            ),
            None,
        )
        if pair is None:
            return [*dims, (row, row, row)]
        outer, inner_dim = dims[pair[0]], dims[pair[1]]
        dims[min(pair)] = (outer[0] * inner_dim[0], inner_dim[1], inner_dim[2])
        del dims[max(pair)]


def segment_runs(num_tokens: int, src_block_size: int, dst_block_size: int, most: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, counts), int64[n] each: the runs of tokens ``[0, num_tokens)`` inside one block of each side, cut
    into runs of at most ``most`` tokens."""
    small, large = sorted((src_block_size, dst_block_size))
    if large % small == 0:  # every block boundary of one side is one of the other's (the usual case)
        starts = np.arange(0, num_tokens, small, dtype=np.int64)
    else:
        starts = np.union1d(
            np.arange(0, num_tokens, small, dtype=np.int64), np.arange(0, num_tokens, large, dtype=np.int64)
        )
    counts = np.diff(np.append(starts, num_tokens))
    return _cut(starts, counts, most)


def check_kernel_limits(num_boxes: int, box_nbytes: int) -> None:
    """ConfigError unless boxes and the bytes inside one box can be indexed with 32-bit ints (as the kernel does)."""
    if num_boxes >= 2**31:
        raise ConfigError(f"a KV copy may have at most 2**31 - 1 (layer, part, segment) boxes, got {num_boxes}")
    if box_nbytes >= 2**31:
        raise ConfigError(f"one (layer, part, block segment) box may hold at most 2 GiB, got {box_nbytes} bytes")


def _cut(starts: np.ndarray, counts: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Split token runs longer than ``most`` into runs of ``most`` (the last one shorter)."""
    pieces = -(-counts // most)
    if counts.size == 0 or int(pieces.max()) == 1:
        return starts, counts
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    index = np.arange(int(pieces.sum())) - first  # piece number inside its run
    run_start, run_count = np.repeat(starts, pieces), np.repeat(counts, pieces)
    return run_start + index * most, np.minimum(most, run_count - index * most)
