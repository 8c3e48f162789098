"""How one KV copy box is walked: its dimensions folded where they are contiguous on both sides.

Pure NumPy/Python, used by copy_plan.kernel_tables. A box copies ``count`` x (fixed dimensions) x ``row`` bytes
between two strided layouts; folding turns it into ``count`` units x ``unit_rows`` rows x one contiguous row,
with the row as long as the layouts allow (a whole box when it is contiguous on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class BoxForm:
    """A box as ``counts[i]`` units x ``unit_rows`` rows x ``row`` bytes, strides (src, dst) in bytes."""

    counts: np.ndarray
    unit_rows: int
    row: int
    unit_strides: tuple[int, int]
    row_strides: tuple[int, int]

    @property
    def contiguous(self) -> bool:
        """Every box is one run of ``count * row`` bytes on both sides."""
        return self.unit_rows == 1 and self.unit_strides == (self.row, self.row)


def box_form(counts: np.ndarray, inner: list[tuple[int, int, int]], row: int,
             count_strides: tuple[int, int]) -> BoxForm:
    """Fold a box's dimensions: segment ``i`` copies ``counts[i]`` x ``inner`` x ``row`` contiguous bytes.

    ``inner``: the fixed dimensions below the counted one, outermost first, as (size, src stride, dst stride);
    ``count_strides``: (src, dst) strides of the counted dimension. A dimension whose strides equal the row's
    length on both sides continues the row (it is folded into it); two dimensions that continue each other on both
    sides become one. When every count is equal the counted dimension is folded like the others. At most one
    dimension may remain besides the counted one (a KV box has one: heads).
    """
    uniform = counts.size > 0 and bool((counts == counts[0]).all())
    if uniform:  # a fixed-shape box: the counted dimension folds like any other
        *dims, (row, _, _) = _fold([(int(counts[0]), *count_strides), *inner], row)
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
    box_counts = np.full(counts.shape, units, dtype=np.int64) if uniform else counts.astype(np.int64)
    return BoxForm(box_counts, rows, row, (unit_strides[0], unit_strides[1]), (row_strides[0], row_strides[1]))


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
        pair = next(((i, j) for i in range(len(dims)) for j in range(len(dims)) if i != j
                     and dims[i][1] == dims[j][0] * dims[j][1] and dims[i][2] == dims[j][0] * dims[j][2]), None)
        if pair is None:
            return [*dims, (row, row, row)]
        outer, inner_dim = dims[pair[0]], dims[pair[1]]
        dims[min(pair)] = (outer[0] * inner_dim[0], inner_dim[1], inner_dim[2])
        del dims[max(pair)]
