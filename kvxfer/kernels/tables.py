"""The tables the CUDA kernel walks (:class:`KernelTables`): computed from scratch, or filled from a template.

Pure NumPy. :func:`kernel_tables` is the definition, straight from a plan's fields. :class:`TableTemplate` gives
the same tables, byte for byte, for plans that share specs, layers, parts and heads and differ only in block ids
and token count (a KV pipe's requests): everything but the block ids' byte offsets is computed once, and a
request costs a handful of vectorized NumPy calls (tests/kernels/test_tables.py compares the two).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from ..spec import KVCacheSpec
from .boxes import BoxShape, box_form, box_shape, check_kernel_limits, segment_runs

if TYPE_CHECKING:
    from .copy_plan import KVCopyPlan

#: Widest load/store the kernel issues, in bytes.
MAX_VECTOR_BYTES = 16
#: Segments are cut so one box holds at most this many bytes: big blocks then still spread over every SM.
MAX_BOX_BYTES = 64 << 10
#: Table entries (int64) a template keeps for the token counts it has seen (then it starts over): 1 MiB, some
#: 140 distinct lengths of 4k-token, 16-token-block requests.
MAX_KEPT_ENTRIES = 1 << 17


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

    def launch_key(self) -> tuple[int | bool, ...]:
        """Every field but the two arrays: equal keys mean equal launch shapes (launchers cache by it)."""
        return (
            self.num_segments,
            self.num_layer_parts,
            self.unit_rows,
            self.row_nbytes,
            self.src_base,
            self.dst_base,
            self.src_unit_stride,
            self.src_row_stride,
            self.dst_unit_stride,
            self.dst_row_stride,
            self.alignment,
            self.max_count,
            self.contiguous,
            self.narrow,
        )


def kernel_tables(plan: KVCopyPlan) -> KernelTables:
    """Segments (runs of tokens inside one source and one destination block) and layer-part offsets, in bytes.

    Computed from scratch from the plan's fields: the definition :class:`TableTemplate` reproduces.
    """
    src, dst = plan.src_spec, plan.dst_spec
    s_layer, s_block, s_kv, s_head, s_token, _ = src.byte_strides
    d_layer, d_block, d_kv, d_head, d_token, _ = dst.byte_strides
    heads, row = plan.num_heads, src.head_dim * src.itemsize
    starts, counts = segment_runs(
        plan.num_tokens, src.block_size, dst.block_size, max(1, MAX_BOX_BYTES // (heads * row))
    )
    segment_src = plan.src_block_ids[starts // src.block_size] * s_block + (starts % src.block_size) * s_token
    segment_dst = plan.dst_block_ids[starts // dst.block_size] * d_block + (starts % dst.block_size) * d_token
    part_src = (plan.src_layers[:, None] * s_layer + plan.parts[None, :] * s_kv).ravel()
    part_dst = (plan.dst_layers[:, None] * d_layer + plan.parts[None, :] * d_kv).ravel()
    form = box_form(counts, [(heads, s_head, d_head)], row, (s_token, d_token))
    table = np.concatenate([segment_src, segment_dst, form.counts, part_src, part_dst]).astype(np.int64)
    src_base, dst_base = _base(src, plan.src_heads[0]), _base(dst, plan.dst_heads[0])
    used = [form.row, *form.unit_strides, *form.row_strides, src_base, dst_base, MAX_VECTOR_BYTES]
    used += _spec_strides(src) + _spec_strides(dst)
    max_count = int(form.counts.max()) if form.counts.size else 0
    check_kernel_limits(len(starts) * len(part_src), max_count * form.unit_rows * form.row)
    reach = [
        (max_count - 1) * unit + (form.unit_rows - 1) * rows + form.row
        for unit, rows in zip(form.unit_strides, form.row_strides, strict=True)
    ]
    return KernelTables(
        table=table,
        segment_tokens=counts,
        num_segments=len(starts),
        num_layer_parts=len(part_src),
        unit_rows=form.unit_rows,
        row_nbytes=form.row,
        src_base=src_base,
        dst_base=dst_base,
        src_unit_stride=form.unit_strides[0],
        src_row_stride=form.row_strides[0],
        dst_unit_stride=form.unit_strides[1],
        dst_row_stride=form.row_strides[1],
        alignment=functools.reduce(math.gcd, used),
        max_count=max_count,
        contiguous=form.contiguous,
        narrow=max(reach, default=0) < 2**31,
    )


class _Fields(TypedDict):
    """The scalar fields of :class:`KernelTables`, by name."""

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


class _Runs:
    """The segment runs of ``capacity`` tokens, and per run what the tables need (all int64[n], host).

    Runs of fewer tokens are a prefix of these with the last run shortened: runs start at block boundaries of
    either side and are cut every ``most`` tokens from their start, so shortening the sequence only ends the run
    holding its last token early (and drops the runs after it).
    """

    def __init__(self, capacity: int, block_sizes: tuple[int, int], token_strides: tuple[int, int], most: int) -> None:
        self.capacity = capacity
        self.starts, self.counts = segment_runs(capacity, *block_sizes, most)
        self.src_index, self.dst_index = self.starts // block_sizes[0], self.starts // block_sizes[1]
        self.src_offset = self.starts % block_sizes[0] * token_strides[0]
        self.dst_offset = self.starts % block_sizes[1] * token_strides[1]
        # For a prefix [0, n) of runs: its largest count; whether every count equals the first, every run has a
        # block of its own (index i) and starts at a block's start, on each side (true while n <= the bound).
        self.prefix_max = np.maximum.accumulate(self.counts)
        self.first_differing = _first_false(self.counts == self.counts[0])
        identity = np.arange(len(self.starts))
        self.src_identity, self.dst_identity = (
            _first_false(index == identity) for index in (self.src_index, self.dst_index)
        )
        self.src_aligned, self.dst_aligned = (
            _first_false(offset == 0) for offset in (self.src_offset, self.dst_offset)
        )


class _Length:
    """The tables of one token count but for the segments' block offsets: ``table`` has the counts and layer-part
    offsets filled in, ``counts`` is the segment_tokens array (shared, read-only), ``fields`` the scalar fields.
    ``*_index``/``*_offset``: block index and byte offset inside the block of each segment (None: the identity /
    all zero, the common case of one segment per block)."""

    def __init__(self, runs: _Runs, num_segments: int, counts: np.ndarray, table: np.ndarray, fields: _Fields) -> None:
        n = num_segments
        self.num_segments, self.counts, self.table, self.fields = n, counts, table, fields
        counts.setflags(write=False)
        table.setflags(write=False)
        self.src_index = None if n <= runs.src_identity else runs.src_index[:n]
        self.dst_index = None if n <= runs.dst_identity else runs.dst_index[:n]
        self.src_offset = None if n <= runs.src_aligned else runs.src_offset[:n]
        self.dst_offset = None if n <= runs.dst_aligned else runs.dst_offset[:n]


class TableTemplate:
    """Everything of :func:`kernel_tables` that does not depend on block ids, for one set of specs, layers, parts and
    heads; :meth:`tables` fills in block ids and a token count. Thread-safe: its caches only grow or are replaced.

    ``src_layers``/``dst_layers``/``parts``: validated int64[m] / int64[p] host arrays (kept; read-only);
    ``src_heads``/``dst_heads``: local head ranges of equal length.
    """

    def __init__(
        self,
        src_spec: KVCacheSpec,
        dst_spec: KVCacheSpec,
        src_layers: np.ndarray,
        dst_layers: np.ndarray,
        parts: np.ndarray,
        src_heads: tuple[int, int],
        dst_heads: tuple[int, int],
    ) -> None:
        self.src_spec, self.dst_spec, self.src_heads, self.dst_heads = src_spec, dst_spec, src_heads, dst_heads
        # Copies: plans share them, and a caller's array may change after planning.
        self.src_layers, self.dst_layers, self.parts = (_frozen(a) for a in (src_layers, dst_layers, parts))
        src_layers, dst_layers, parts = self.src_layers, self.dst_layers, self.parts
        s_layer, s_block, s_kv, s_head, s_token, _ = src_spec.byte_strides
        d_layer, d_block, d_kv, d_head, d_token, _ = dst_spec.byte_strides
        heads, self._row = src_heads[1] - src_heads[0], src_spec.head_dim * src_spec.itemsize
        self._inner = [(heads, s_head, d_head)]
        self._block_sizes, self._block_strides = (src_spec.block_size, dst_spec.block_size), (s_block, d_block)
        self._token_strides = (s_token, d_token)
        self._most = max(1, MAX_BOX_BYTES // (heads * self._row))
        part_src = (src_layers[:, None] * s_layer + parts[None, :] * s_kv).ravel()
        part_dst = (dst_layers[:, None] * d_layer + parts[None, :] * d_kv).ravel()
        self._num_layer_parts = len(part_src)
        self._parts = np.concatenate([part_src, part_dst]).astype(np.int64)
        self._bases = _base(src_spec, src_heads[0]), _base(dst_spec, dst_heads[0])
        self._strides_used = _spec_strides(src_spec) + _spec_strides(dst_spec)
        self._shapes: dict[int | None, tuple[BoxShape, int]] = {}
        self._lengths: dict[int, _Length] = {}
        self._kept = 0
        self._runs: _Runs | None = None

    def describes(self, plan: KVCopyPlan) -> bool:
        """True if ``plan`` has this template's specs, layers, parts and heads, and int64 block id arrays."""
        return (
            plan.src_layers is self.src_layers
            and plan.dst_layers is self.dst_layers
            and plan.parts is self.parts
            and plan.src_heads == self.src_heads
            and plan.dst_heads == self.dst_heads
            and (plan.src_spec is self.src_spec or plan.src_spec == self.src_spec)
            and (plan.dst_spec is self.dst_spec or plan.dst_spec == self.dst_spec)
            and all(
                isinstance(ids, np.ndarray) and ids.dtype == np.int64 and ids.ndim == 1
                for ids in (plan.src_block_ids, plan.dst_block_ids)
            )
        )

    def tables(self, src_ids: np.ndarray, dst_ids: np.ndarray, num_tokens: int) -> KernelTables:
        """``kernel_tables`` of a plan of this template with these block ids (int64, validated) and tokens."""
        length = self._lengths.get(num_tokens)
        if length is None:
            length = self._length(num_tokens)
        table, n = length.table.copy(), length.num_segments
        _fill(table[:n], src_ids, length.src_index, self._block_strides[0], length.src_offset)
        _fill(table[n : 2 * n], dst_ids, length.dst_index, self._block_strides[1], length.dst_offset)
        return KernelTables(table=table, segment_tokens=length.counts, **length.fields)

    def _length(self, num_tokens: int) -> _Length:
        """What the tables of ``num_tokens`` tokens hold besides the block ids' offsets (cached per token count)."""
        runs = self._runs
        if runs is None or runs.capacity < num_tokens:
            runs = self._grow(num_tokens)
        n = int(np.searchsorted(runs.starts, num_tokens))  # runs starting before the end
        last = min(int(runs.counts[n - 1]), num_tokens - int(runs.starts[n - 1])) if n else 0
        if n > 1:
            first = int(runs.counts[0])
            uniform = runs.first_differing >= n - 1 and last == first
            most_tokens = max(int(runs.prefix_max[n - 2]), last)
        else:
            first, uniform, most_tokens = last, n == 1, last
        shape, alignment = self._shape(first if uniform else None)
        units = shape.units if uniform else None  # every box the same count of units
        max_count = most_tokens if units is None else units
        check_kernel_limits(n * self._num_layer_parts, max_count * shape.unit_rows * shape.row)
        counts = runs.counts[:n].copy()
        if n:
            counts[n - 1] = last
        table = np.empty(3 * n + len(self._parts), dtype=np.int64)
        table[2 * n : 3 * n] = counts if units is None else units
        table[3 * n :] = self._parts
        reach = [
            (max_count - 1) * unit + (shape.unit_rows - 1) * rows + shape.row
            for unit, rows in zip(shape.unit_strides, shape.row_strides, strict=True)
        ]
        fields = _Fields(
            num_segments=n,
            num_layer_parts=self._num_layer_parts,
            unit_rows=shape.unit_rows,
            row_nbytes=shape.row,
            src_base=self._bases[0],
            dst_base=self._bases[1],
            src_unit_stride=shape.unit_strides[0],
            src_row_stride=shape.row_strides[0],
            dst_unit_stride=shape.unit_strides[1],
            dst_row_stride=shape.row_strides[1],
            alignment=alignment,
            max_count=max_count,
            contiguous=shape.contiguous,
            narrow=max(reach) < 2**31,
        )
        length = _Length(runs, n, counts, table, fields)
        if self._kept + table.size > MAX_KEPT_ENTRIES:
            self._lengths, self._kept = {}, 0
        self._lengths[num_tokens] = length
        self._kept += table.size
        return length

    def _grow(self, num_tokens: int) -> _Runs:
        # Two threads growing at once build equal runs; either one serves (no lock: templates stay plain data).
        runs = self._runs
        capacity = max(num_tokens, 2 * runs.capacity if runs is not None else 0, 1)
        runs = self._runs = _Runs(capacity, self._block_sizes, self._token_strides, self._most)
        return runs

    def _shape(self, uniform_count: int | None) -> tuple[BoxShape, int]:
        """The box folding for counts all equal to ``uniform_count`` (None: differing), and the alignment."""
        cached = self._shapes.get(uniform_count)
        if cached is None:
            shape = box_shape(uniform_count, self._inner, self._row, self._token_strides)
            used = [
                shape.row,
                *shape.unit_strides,
                *shape.row_strides,
                *self._bases,
                MAX_VECTOR_BYTES,
                *self._strides_used,
            ]
            cached = shape, functools.reduce(math.gcd, used)
            if len(self._shapes) < 64:  # one per distinct short request length at most
                self._shapes[uniform_count] = cached
        return cached


def _first_false(mask: np.ndarray) -> int:
    """The index of the first False in ``mask`` (bool[n]), or n."""
    return len(mask) if mask.all() else int(np.argmin(mask))


def _fill(out: np.ndarray, ids: np.ndarray, index: np.ndarray | None, stride: int, offset: np.ndarray | None) -> None:
    """``out[:] = ids[index] * stride + offset``: the segments' byte offsets on one side."""
    np.multiply(ids if index is None else ids[index], stride, out=out)
    if offset is not None:
        out += offset


def _frozen(ids: np.ndarray) -> np.ndarray:
    copy = np.array(ids, dtype=np.int64)
    copy.setflags(write=False)
    return copy


def _base(spec: KVCacheSpec, first_head: int) -> int:
    return (spec.offset + first_head * spec.element_strides[3]) * spec.itemsize


def _spec_strides(spec: KVCacheSpec) -> list[int]:
    """The byte strides of the dimensions the spec has more than one of (block, layer, ...; not head_dim)."""
    return [stride for stride, size in zip(spec.byte_strides[:5], spec.shape[:5], strict=True) if size > 1]
