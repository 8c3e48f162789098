"""Host-side planning of KV copies: validation, the staging layout, and the tables the CUDA kernel walks.

Pure NumPy. The reference (NumPy) path and the CUDA path share everything here, so a plan that validates on a
CPU machine means the same copy on a GPU.

What a :class:`KVCopyPlan` moves: tokens ``[0, num_tokens)`` of one sequence. Token ``t`` lives in source block
``src_block_ids[t // src_spec.block_size]`` at slot ``t % src_spec.block_size`` and goes to destination block
``dst_block_ids[t // dst_spec.block_size]`` at slot ``t % dst_spec.block_size``; for each pair
``(src_layers[i], dst_layers[i])``, each K/V part in ``parts``, and local heads ``src_heads`` -> ``dst_heads``
(equal counts), all ``head_dim`` elements. Block-size change, TP split/merge (head ranges), NHD <-> HND and
gather/scatter through a staging buffer are all this one copy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DescriptorError, LayoutMismatchError
from ..spec import KVCacheSpec, KVLayout, as_index_array
from .boxes import box_form

#: Widest load/store the kernel issues, in bytes.
MAX_VECTOR_BYTES = 16
#: Segments are cut so one box holds at most this many bytes: big blocks then still spread over every SM.
MAX_BOX_BYTES = 64 << 10


@dataclass(frozen=True, eq=False)
class KVCopyPlan:
    """A validated KV copy between two layouts. Build with :func:`plan_kv_copy`; run with ``copy_kv``.

    ``src_block_ids``: int64[ceil(num_tokens / src_spec.block_size)], host; ``dst_block_ids`` likewise for the
    destination (no duplicates). ``src_layers``/``dst_layers``: int64[m], host. ``parts``: int64[p] (0 = K, 1 = V).
    ``src_heads``/``dst_heads``: local head ranges ``[h0, h1)`` of equal length.
    """

    src_spec: KVCacheSpec
    dst_spec: KVCacheSpec
    src_block_ids: np.ndarray
    dst_block_ids: np.ndarray
    num_tokens: int
    src_layers: np.ndarray
    dst_layers: np.ndarray
    parts: np.ndarray
    src_heads: tuple[int, int]
    dst_heads: tuple[int, int]

    @property
    def num_heads(self) -> int:
        """Heads moved per (layer, part, token)."""
        return self.src_heads[1] - self.src_heads[0]

    @property
    def nbytes(self) -> int:
        """Payload bytes moved (read once, written once)."""
        spec = self.src_spec
        return (len(self.src_layers) * len(self.parts) * self.num_tokens * self.num_heads * spec.head_dim
                * spec.itemsize)

    @functools.cached_property
    def tables(self) -> "KernelTables":
        """The segment and layer tables of the CUDA kernel (computed once per plan)."""
        return kernel_tables(self)


@dataclass(frozen=True, eq=False)
class KernelTables:
    """What the kernel walks, in bytes relative to each side's region start.

    The kernel copies one *box* per (layer-part, segment). A box is ``count`` *units* (``count`` from the table)
    of ``unit_rows`` rows of ``row_nbytes`` contiguous bytes; row ``(u, r)`` starts at ``base + layer_part +
    segment + u * unit_stride + r * row_stride`` on each side. Planning folds every dimension that continues the
    row on both sides into it, so a unit is usually a token (``unit_rows`` heads, or 1 when heads are adjacent),
    and when every segment holds the same tokens the whole fixed-shape box is folded (e.g. HND blocks: a unit is a
    head, its row all the block's tokens). ``contiguous``: a box is one run of ``count * row_nbytes`` bytes on both
    sides (``unit_rows == 1``, both unit strides equal ``row_nbytes``): the kernel's run entry needs no index math.

    ``table``: int64[3 * num_segments + 2 * num_layer_parts], host, laid out as ``[segment src offset | segment dst
    offset | segment count | layer-part src offset | layer-part dst offset]``; ``segment_tokens``: int64[num_segments],
    host, the tokens of each segment (for checks: the kernel reads counts). ``alignment`` (a power of two <= 16)
    divides ``row_nbytes``, both bases, every stride and every table offset. ``narrow``: every offset inside a box
    is below 2**31 on both sides (the kernel then indexes with 32-bit ints).
    """

    table: np.ndarray
    segment_tokens: np.ndarray
    num_segments: int
    num_layer_parts: int
    unit_rows: int
    row_nbytes: int
    src_base: int
    dst_base: int
    src_unit_stride: int
    src_row_stride: int
    dst_unit_stride: int
    dst_row_stride: int
    alignment: int
    max_count: int
    contiguous: bool
    narrow: bool

    @property
    def num_boxes(self) -> int:
        """Boxes of the launch: one per (layer-part, segment)."""
        return self.num_segments * self.num_layer_parts

    @property
    def max_box_nbytes(self) -> int:
        """Bytes of the largest box."""
        return self.max_count * self.unit_rows * self.row_nbytes


def plan_kv_copy(src_spec: KVCacheSpec, dst_spec: KVCacheSpec, src_block_ids: Any, dst_block_ids: Any, *,
                 num_tokens: int | None = None, src_layers: Any = None, dst_layers: Any = None,
                 src_heads: tuple[int, int] | None = None, dst_heads: tuple[int, int] | None = None,
                 parts: Any = None) -> KVCopyPlan:
    """Validate and plan a copy of tokens ``[0, num_tokens)`` from ``src_spec``'s blocks to ``dst_spec``'s.

    ``src_block_ids``/``dst_block_ids``: int[n] host arrays, exactly ``ceil(num_tokens / block_size)`` ids per
    side (``num_tokens`` defaults to the smaller side's capacity). ``src_layers``: ids, range or slice (default all);
    ``dst_layers`` defaults to the same ids. ``src_heads``/``dst_heads``: local head ranges (default all; counts
    must match). ``parts``: K/V parts (default all). Raises LayoutMismatchError for specs that cannot be mapped onto
    each other, DescriptorError for bad ids, ConfigError for bad options.
    """
    for argument, spec in (("src_spec", src_spec), ("dst_spec", dst_spec)):
        if not isinstance(spec, KVCacheSpec):
            raise ConfigError(f"{argument} must be a KVCacheSpec, got {type(spec).__name__}")
    _check_compatible(src_spec, dst_spec)
    src_ids = as_index_array(src_block_ids, "src_block_ids", src_spec.num_blocks)
    dst_ids = as_index_array(dst_block_ids, "dst_block_ids", dst_spec.num_blocks)
    tokens = _num_tokens(num_tokens, src_spec, dst_spec, src_ids, dst_ids)
    _check_unique(dst_ids, "dst_block_ids")
    layers_src = as_index_array(_selection(src_layers, src_spec.num_layers), "src_layers", src_spec.num_layers)
    layers_dst = as_index_array(layers_src if dst_layers is None else _selection(dst_layers, dst_spec.num_layers),
                                "dst_layers", dst_spec.num_layers)
    if layers_src.shape != layers_dst.shape:
        raise DescriptorError(f"dst_layers must pair with src_layers: expected {layers_src.size} layers, "
                              f"got {layers_dst.size}")
    _check_unique(layers_dst, "dst_layers")
    part_ids = as_index_array(_selection(parts, src_spec.num_kv_parts), "parts", src_spec.num_kv_parts)
    _check_unique(part_ids, "parts")
    heads_src = _head_range(src_heads, src_spec, "src_heads")
    heads_dst = _head_range(dst_heads, dst_spec, "dst_heads")
    if heads_src[1] - heads_src[0] != heads_dst[1] - heads_dst[0]:
        raise LayoutMismatchError(
            f"src_heads {heads_src} and dst_heads {heads_dst} must hold as many heads; pass head ranges computed "
            "from head_range() for a TP split or merge")
    return KVCopyPlan(src_spec, dst_spec, src_ids, dst_ids, tokens, layers_src, layers_dst, part_ids, heads_src,
                      heads_dst)


def staging_spec(cache_spec: KVCacheSpec, num_tokens: int, *, num_layers: int | None = None,
                 heads: tuple[int, int] | None = None, layout: KVLayout | str = KVLayout.HND,
                 offset: int = 0) -> KVCacheSpec:
    """The spec of a contiguous staging buffer for ``num_tokens`` tokens of ``cache_spec``'s cache.

    One block of ``num_tokens`` tokens, C-contiguous ``[num_layers, 1, num_kv_parts, heads, num_tokens, head_dim]``
    for "HND" (the default) or ``[..., num_tokens, heads, head_dim]`` for "NHD", same dtype, starting ``offset``
    elements into its buffer. ``num_layers`` defaults to the cache's (so layer ids mean the same on both sides);
    ``heads`` is the local head range of the cache it holds (default all). Both ends of a transfer that build it
    from the same arguments agree on every byte (docs/kv_layout.md).
    """
    if not isinstance(cache_spec, KVCacheSpec):
        raise ConfigError(f"cache_spec must be a KVCacheSpec, got {type(cache_spec).__name__}")
    h0, h1 = _head_range(heads, cache_spec, "heads")
    return KVCacheSpec(num_layers=cache_spec.num_layers if num_layers is None else num_layers, num_blocks=1,
                       block_size=num_tokens, num_kv_heads=h1 - h0, head_dim=cache_spec.head_dim,
                       dtype=cache_spec.dtype, layout=layout, num_kv_parts=cache_spec.num_kv_parts, offset=offset,
                       model=cache_spec.model)


def kernel_tables(plan: KVCopyPlan) -> KernelTables:
    """Segments (runs of tokens inside one source and one destination block) and layer-part offsets, in bytes."""
    src, dst = plan.src_spec, plan.dst_spec
    s_layer, s_block, s_kv, s_head, s_token, _ = src.byte_strides
    d_layer, d_block, d_kv, d_head, d_token, _ = dst.byte_strides
    starts = np.union1d(np.arange(0, plan.num_tokens, src.block_size, dtype=np.int64),
                        np.arange(0, plan.num_tokens, dst.block_size, dtype=np.int64))
    counts = np.diff(np.append(starts, plan.num_tokens))
    heads, row = plan.num_heads, src.head_dim * src.itemsize
    starts, counts = _cut(starts, counts, max(1, MAX_BOX_BYTES // (heads * row)))
    segment_src = plan.src_block_ids[starts // src.block_size] * s_block + (starts % src.block_size) * s_token
    segment_dst = plan.dst_block_ids[starts // dst.block_size] * d_block + (starts % dst.block_size) * d_token
    part_src = (plan.src_layers[:, None] * s_layer + plan.parts[None, :] * s_kv).ravel()
    part_dst = (plan.dst_layers[:, None] * d_layer + plan.parts[None, :] * d_kv).ravel()
    form = box_form(counts, [(heads, s_head, d_head)], row, (s_token, d_token))
    table = np.concatenate([segment_src, segment_dst, form.counts, part_src, part_dst]).astype(np.int64)
    src_base = (src.offset + plan.src_heads[0] * src.element_strides[3]) * src.itemsize
    dst_base = (dst.offset + plan.dst_heads[0] * dst.element_strides[3]) * dst.itemsize
    used = [form.row, *form.unit_strides, *form.row_strides, src_base, dst_base, MAX_VECTOR_BYTES]
    for spec, strides in ((src, src.byte_strides), (dst, dst.byte_strides)):
        used += [stride for stride, size in zip(strides[:5], spec.shape[:5]) if size > 1]
    max_count = int(form.counts.max()) if form.counts.size else 0
    _check_kernel_limits(len(starts) * len(part_src), max_count * form.unit_rows * form.row)
    reach = [(max_count - 1) * unit + (form.unit_rows - 1) * rows + form.row
             for unit, rows in zip(form.unit_strides, form.row_strides)]
    return KernelTables(table=table, segment_tokens=counts, num_segments=len(starts), num_layer_parts=len(part_src),
                        unit_rows=form.unit_rows, row_nbytes=form.row, src_base=src_base, dst_base=dst_base,
                        src_unit_stride=form.unit_strides[0], src_row_stride=form.row_strides[0],
                        dst_unit_stride=form.unit_strides[1], dst_row_stride=form.row_strides[1],
                        alignment=functools.reduce(math.gcd, used), max_count=max_count,
                        contiguous=form.contiguous, narrow=max(reach, default=0) < 2**31)


def _cut(starts: np.ndarray, counts: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Split token runs longer than ``most`` into runs of ``most`` (the last one shorter)."""
    pieces = -(-counts // most)
    if counts.size == 0 or int(pieces.max()) == 1:
        return starts, counts
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    index = np.arange(int(pieces.sum())) - first  # piece number inside its run
    run_start, run_count = np.repeat(starts, pieces), np.repeat(counts, pieces)
    return run_start + index * most, np.minimum(most, run_count - index * most)


def _check_kernel_limits(num_boxes: int, box_nbytes: int) -> None:
    # The kernel indexes boxes and the bytes inside one box with 32-bit ints.
    if num_boxes >= 2**31:
        raise ConfigError(f"a KV copy may have at most 2**31 - 1 (layer, part, segment) boxes, got {num_boxes}")
    if box_nbytes >= 2**31:
        raise ConfigError(f"one (layer, part, block segment) box may hold at most 2 GiB, got {box_nbytes} bytes")


def _check_compatible(src: KVCacheSpec, dst: KVCacheSpec) -> None:
    for field in ("head_dim", "dtype", "num_kv_parts"):
        if getattr(src, field) != getattr(dst, field):
            raise LayoutMismatchError(
                f"src_spec and dst_spec must have the same {field}: src {getattr(src, field)!r}, "
                f"dst {getattr(dst, field)!r}")


def _num_tokens(num_tokens: int | None, src: KVCacheSpec, dst: KVCacheSpec, src_ids: np.ndarray,
                dst_ids: np.ndarray) -> int:
    if num_tokens is None:
        num_tokens = min(src_ids.size * src.block_size, dst_ids.size * dst.block_size)
    if not isinstance(num_tokens, (int, np.integer)) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise ConfigError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    for argument, ids, block_size in (("src_block_ids", src_ids, src.block_size),
                                      ("dst_block_ids", dst_ids, dst.block_size)):
        expected = -(-int(num_tokens) // block_size)
        if ids.size != expected:
            raise DescriptorError(
                f"{argument}: {num_tokens} tokens in blocks of {block_size} need {expected} block ids, "
                f"got {ids.size}")
    return int(num_tokens)


def _check_unique(ids: np.ndarray, argument: str) -> None:
    if ids.size < 2:
        return
    ordered = np.sort(ids)
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if repeated.size:
        raise DescriptorError(f"{argument} must not repeat (each destination is written once), "
                              f"got {int(ordered[repeated[0]])} more than once")


def _selection(selection: Any, count: int) -> Any:
    if selection is None:
        return np.arange(count, dtype=np.int64)
    if isinstance(selection, slice):
        return np.arange(count, dtype=np.int64)[selection]
    if isinstance(selection, range):
        return np.asarray(selection, dtype=np.int64)
    return selection


def _head_range(heads: tuple[int, int] | None, spec: KVCacheSpec, argument: str) -> tuple[int, int]:
    if heads is None:
        return 0, spec.num_kv_heads
    try:
        h0, h1 = (int(h) for h in heads)
    except (TypeError, ValueError):
        raise ConfigError(f"{argument} must be a pair (h0, h1) of ints, got {heads!r}") from None
    if not 0 <= h0 < h1 <= spec.num_kv_heads:
        raise ConfigError(f"{argument} must be a range [h0, h1) within [0, {spec.num_kv_heads}], got {heads!r}")
    return h0, h1
