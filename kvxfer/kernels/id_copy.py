"""KV copies whose fragment addresses the GPU derives from block ids and the two specs: no per-request tables.

The table path (:mod:`.tables`) computes every box's byte offsets on the host and uploads them (3 int64 per token
segment plus 2 per layer-part). Here a request uploads one small int64 buffer (:func:`fill_buffer`): a header of
the two specs' strides and the folded box shapes (the same for every request of a route), then the block ids and
layer ids themselves. csrc/id_copy.cu derives each box from them; :func:`derive_boxes` is its NumPy reference,
written line by line like the kernel and reading nothing but the buffer (in :mod:`.id_reference`).

Boxes are the table path's boxes, in its order: box ``b`` is (layer-part ``b // num_segments``, segment
``b % num_segments``). Tokens are cut at every block boundary of the smaller block size (``small``) and each such
run into ``pieces`` pieces of at most ``most`` tokens; a segment past the last token is empty (skipped). A box of
``full_count`` tokens is walked by the ``full`` shape (every dimension folded where both sides are contiguous), any
other (a request's last, partly filled block) by the ``odd`` shape (one unit per token).

Supported: specs of one head_dim, dtype and K/V part count whose block sizes divide one another, every K/V part,
any layer ids; anything else takes the table path (:func:`id_copy_form` returns None).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..spec import KVCacheSpec
from .boxes import BoxShape, box_shape
from .tables import MAX_BOX_BYTES, MAX_VECTOR_BYTES

#: The buffer's header, int64 each, in this order (csrc/id_copy.cu's enum names the same fields). The first five
#: change per request; ``*_units`` 0 means "the box's token count"; strides are in bytes.
HEADER = (
    "num_tokens",
    "num_src_ids",
    "num_dst_ids",
    "num_layers",
    "num_segments",
    "num_parts",
    "pieces",
    "most",
    "small",
    "src_block_size",
    "dst_block_size",
    "src_layer_stride",
    "src_block_stride",
    "src_part_stride",
    "src_token_stride",
    "dst_layer_stride",
    "dst_block_stride",
    "dst_part_stride",
    "dst_token_stride",
    "full_count",
    "full_units",
    "full_unit_rows",
    "full_row_vectors",
    "full_src_unit",
    "full_src_row",
    "full_dst_unit",
    "full_dst_row",
    "full_contiguous",
    "odd_units",
    "odd_unit_rows",
    "odd_row_vectors",
    "odd_src_unit",
    "odd_src_row",
    "odd_dst_unit",
    "odd_dst_row",
    "odd_contiguous",
    "group_shift",
)
FIELD = {name: index for index, name in enumerate(HEADER)}
assert HEADER[:5] == ("num_tokens", "num_src_ids", "num_dst_ids", "num_layers", "num_segments")  # fill_buffer
HEADER_LEN = len(HEADER)
#: Largest value of the 32-bit counts the kernel computes with (tokens, ids, boxes, vectors of a box).
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class IdCopyForm:
    """What every request between two specs and head ranges shares: box shapes, bases, alignment.

    ``src_base``/``dst_base``: bytes from each region's start to its spec's first element of the head range;
    ``small``: the smaller block size (segments never cross its block boundaries), cut into ``pieces`` segments
    of at most ``most`` tokens; ``full_count``: the tokens of a box the ``full`` shape walks, ``odd``: the others;
    ``alignment``: a power of two <= 16 dividing every row, stride and base (the widest vector, region starts
    aside); ``narrow``: every offset inside a box is below 2**31 (the kernel then indexes with 32-bit ints).
    """

    src_spec: KVCacheSpec
    dst_spec: KVCacheSpec
    src_heads: tuple[int, int]
    dst_heads: tuple[int, int]
    src_base: int
    dst_base: int
    small: int
    most: int
    pieces: int
    full_count: int
    full: BoxShape
    odd: BoxShape
    alignment: int
    narrow: bool

    @property
    def box_nbytes(self) -> int:
        """Bytes of the largest box (one of ``full_count`` tokens)."""
        heads = self.src_heads[1] - self.src_heads[0]
        return self.full_count * heads * self.src_spec.head_dim * self.src_spec.itemsize

    def num_segments(self, num_tokens: int) -> int:
        """Segments of a request of ``num_tokens`` tokens (a multiple of :attr:`pieces`)."""
        return -(-num_tokens // self.small) * self.pieces

    def group_threads(self, vector: int, threads: int, unroll: int) -> int:
        """Threads copying one box: a power of two in [32, threads], about ``unroll`` vectors each (as the table
        path's launch.launch_shape sizes them)."""
        box_vectors = self.box_nbytes // vector
        group = 1 << max(0, -(-box_vectors // unroll) - 1).bit_length()
        return min(threads, max(32, group))

    def header(self, vector: int, group_threads: int) -> np.ndarray:
        """int64[HEADER_LEN]: the header for ``vector``-byte loads and groups of ``group_threads`` threads, the
        per-request fields zero (:func:`fill_buffer` sets them)."""
        src, dst = self.src_spec, self.dst_spec
        s_layer, s_block, s_kv, _, s_token, _ = src.byte_strides
        d_layer, d_block, d_kv, _, d_token, _ = dst.byte_strides
        values = {
            "num_parts": src.num_kv_parts,
            "pieces": self.pieces,
            "most": self.most,
            "small": self.small,
            "src_block_size": src.block_size,
            "dst_block_size": dst.block_size,
            "src_layer_stride": s_layer,
            "src_block_stride": s_block,
            "src_part_stride": s_kv,
            "src_token_stride": s_token,
            "dst_layer_stride": d_layer,
            "dst_block_stride": d_block,
            "dst_part_stride": d_kv,
            "dst_token_stride": d_token,
            "full_count": self.full_count,
            "group_shift": group_threads.bit_length() - 1,
        }
        for name, shape in (("full", self.full), ("odd", self.odd)):
            values[f"{name}_units"] = shape.units or 0
            values[f"{name}_unit_rows"] = shape.unit_rows
            values[f"{name}_row_vectors"] = shape.row // vector
            values[f"{name}_src_unit"], values[f"{name}_dst_unit"] = shape.unit_strides
            values[f"{name}_src_row"], values[f"{name}_dst_row"] = shape.row_strides
            values[f"{name}_contiguous"] = int(shape.contiguous)
        header = np.zeros(HEADER_LEN, dtype=np.int64)
        for name, value in values.items():
            header[FIELD[name]] = value
        header.setflags(write=False)
        return header


@functools.lru_cache(maxsize=256)
def id_copy_form(
    src_spec: KVCacheSpec, dst_spec: KVCacheSpec, src_heads: tuple[int, int], dst_heads: tuple[int, int]
) -> IdCopyForm | None:
    """The form of copies from ``src_spec``'s local heads ``src_heads`` to ``dst_spec``'s ``dst_heads``; None
    where this path does not apply (the table path then plans the copy and raises its errors)."""
    if (src_spec.head_dim, src_spec.dtype, src_spec.num_kv_parts) != (
        dst_spec.head_dim,
        dst_spec.dtype,
        dst_spec.num_kv_parts,
    ):
        return None
    heads = src_heads[1] - src_heads[0]
    if heads != dst_heads[1] - dst_heads[0] or heads < 1:
        return None
    if not (0 <= src_heads[0] and src_heads[1] <= src_spec.num_kv_heads):
        return None
    if not (0 <= dst_heads[0] and dst_heads[1] <= dst_spec.num_kv_heads):
        return None
    small, large = sorted((src_spec.block_size, dst_spec.block_size))
    if large % small:
        return None
    row = src_spec.head_dim * src_spec.itemsize
    most = max(1, MAX_BOX_BYTES // (heads * row))
    full_count = min(most, small)
    s_head, s_token = src_spec.byte_strides[3:5]
    d_head, d_token = dst_spec.byte_strides[3:5]
    inner = [(heads, s_head, d_head)]
    full = box_shape(full_count, inner, row, (s_token, d_token))
    odd = box_shape(None, inner, row, (s_token, d_token))
    if full_count * heads * row > MAX_COUNT:
        return None
    src_base = (src_spec.offset + src_heads[0] * src_spec.element_strides[3]) * src_spec.itemsize
    dst_base = (dst_spec.offset + dst_heads[0] * dst_spec.element_strides[3]) * dst_spec.itemsize
    used = [src_base, dst_base, MAX_VECTOR_BYTES, *_strides_used(src_spec), *_strides_used(dst_spec)]
    for shape in (full, odd):
        used += [shape.row, *shape.unit_strides, *shape.row_strides]
    reach = [
        (units - 1) * unit + (shape.unit_rows - 1) * rows + shape.row
        for shape, units in ((full, full.units or full_count), (odd, full_count))
        for unit, rows in zip(shape.unit_strides, shape.row_strides, strict=True)
    ]
    return IdCopyForm(
        src_spec,
        dst_spec,
        src_heads,
        dst_heads,
        src_base,
        dst_base,
        small,
        most,
        -(-small // most),
        full_count,
        full,
        odd,
        functools.reduce(math.gcd, used),
        max(reach) < 2**31,
    )


def buffer_entries(num_src_ids: int, num_dst_ids: int, num_layers: int) -> int:
    """int64 entries of the buffer of a request with these many block and layer ids."""
    return HEADER_LEN + num_src_ids + num_dst_ids + 2 * num_layers


def fill_buffer(
    out: np.ndarray,
    header: np.ndarray,
    num_segments: int,
    src_ids: np.ndarray,
    dst_ids: np.ndarray,
    src_layers: np.ndarray,
    dst_layers: np.ndarray,
    num_tokens: int,
) -> int:
    """Write a request's buffer into ``out`` (int64[>= buffer_entries(...)], host): ``header`` (from
    :meth:`IdCopyForm.header`) with the request's fields, then src ids, dst ids, src layers, dst layers (int64
    arrays, host, validated by the caller). Returns the entries written."""
    n, m, k = len(src_ids), len(dst_ids), len(src_layers)
    end = HEADER_LEN + n + m + 2 * k
    np.concatenate((header, src_ids, dst_ids, src_layers, dst_layers), out=out[:end])  # one pass, no temporary
    # the per-request fields: HEADER's first five, in order
    out[0] = num_tokens
    out[1] = n
    out[2] = m
    out[3] = k
    out[4] = num_segments
    return end


def _strides_used(spec: KVCacheSpec) -> list[int]:
    """The byte strides of the dimensions the spec has more than one of (block, layer, ...; not head_dim)."""
    return [stride for stride, size in zip(spec.byte_strides[:5], spec.shape[:5], strict=True) if size > 1]
