"""How one engine rank's paged KV cache sits in memory.

A :class:`KVCacheSpec` maps (layer, block, K/V part, head, token, dim) to an element offset in one registered
region. With no explicit strides it describes one C-contiguous tensor:
``[num_layers, num_blocks, num_kv_parts, num_kv_heads, block_size, head_dim]`` for "HND" and
``[num_layers, num_blocks, num_kv_parts, block_size, num_kv_heads, head_dim]`` for "NHD".
Other engines' layouts are given by explicit element strides over :data:`AXES`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeAlias

import numpy as np

from .errors import ConfigError

#: Block ids: int[n] on the host, a sequence of ints or an integer array.
BlockIds: TypeAlias = Sequence[int] | np.ndarray
#: A selection of layers or K/V parts: one id, ids (int[n], host), a range or a slice; None: all of them.
Selection: TypeAlias = int | Sequence[int] | np.ndarray | range | slice | None

#: The logical axes of every spec, in the order strides are given.
AXES = ("layer", "block", "kv", "head", "token", "dim")

#: Element size in bytes of the dtypes a spec may name. Kernels move raw bytes, so fp8 needs nothing special.
DTYPE_SIZES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
}


class KVLayout(str, Enum):
    """Order of tokens and heads inside one block: heads-major ("HND") or tokens-major ("NHD")."""

    NHD = "NHD"
    HND = "HND"

    @classmethod
    def parse(cls, value: KVLayout | str) -> KVLayout:
        """``value`` as a KVLayout; ConfigError for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"KVCacheSpec.layout must be 'NHD' or 'HND', got {value!r}") from None


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"KVCacheSpec.{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class KVCacheSpec:
    """One engine rank's paged KV cache.

    ``num_kv_heads`` is this rank's own head count; ``tp_rank``/``tp_size`` say which slice of the model's
    ``total_kv_heads`` it holds (heads are replicated when ``tp_size > total_kv_heads``). ``num_kv_parts`` is 2
    for separate K and V, 1 for a single latent vector per token (MLA). ``strides`` (elements, over
    :data:`AXES`) and ``offset`` (elements from the region start) describe layouts other than the defaults.
    ``model`` is an identity string compared at connect time ("" means unchecked).
    """

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    layout: KVLayout = KVLayout.HND
    tp_rank: int = 0
    tp_size: int = 1
    total_kv_heads: int | None = None
    num_kv_parts: int = 2
    strides: tuple[int, ...] | None = None
    offset: int = 0
    model: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim", "tp_size"):
            _positive(name, getattr(self, name))
        _positive("tp_rank", self.tp_rank, 0)
        _positive("offset", self.offset, 0)
        if self.tp_rank >= self.tp_size:
            raise ConfigError(f"KVCacheSpec.tp_rank must be < tp_size={self.tp_size}, got {self.tp_rank}")
        if self.dtype not in DTYPE_SIZES:
            raise ConfigError(f"KVCacheSpec.dtype must be one of {sorted(DTYPE_SIZES)}, got {self.dtype!r}")
        object.__setattr__(self, "layout", KVLayout.parse(self.layout))
        if self.num_kv_parts not in (1, 2):
            raise ConfigError(f"KVCacheSpec.num_kv_parts must be 1 (MLA) or 2 (K and V), got {self.num_kv_parts!r}")
        self._check_heads()
        if self.strides is not None:
            object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
            self._check_strides(self.strides)

    def _check_heads(self) -> None:
        total = self.total_kv_heads
        if total is None:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads * self.tp_size)
            return
        _positive("total_kv_heads", total)
        if total >= self.tp_size:
            if total % self.tp_size or self.num_kv_heads != total // self.tp_size:
                raise ConfigError(
                    f"KVCacheSpec.num_kv_heads must be total_kv_heads/tp_size = {total}/{self.tp_size}, "
                    f"got {self.num_kv_heads}"
                )
        elif self.tp_size % total or self.num_kv_heads != 1:
            raise ConfigError(
                f"KVCacheSpec: with tp_size={self.tp_size} > total_kv_heads={total}, tp_size must be a multiple "
                f"of total_kv_heads and num_kv_heads must be 1 (replicated), got num_kv_heads={self.num_kv_heads}"
            )

    def _check_strides(self, strides: tuple[int, ...]) -> None:
        if len(strides) != len(AXES):
            raise ConfigError(f"KVCacheSpec.strides must give {len(AXES)} strides over {AXES}, got {strides}")
        if strides[-1] != 1:
            raise ConfigError(f"KVCacheSpec.strides: head_dim must be contiguous (stride 1), got {strides[-1]}")
        if any(s <= 0 for s in strides):
            raise ConfigError(f"KVCacheSpec.strides must be positive, got {strides}")
        # Sufficient condition for no two indices sharing an element: sorted by stride, each stride exceeds the
        # largest offset reachable by the axes inside it.
        reach = 0
        for stride, size in sorted((s, n) for s, n in zip(strides, self.shape, strict=True) if n > 1):
            if stride <= reach:
                raise ConfigError(f"KVCacheSpec.strides {strides} overlap for shape {self.shape} (axes {AXES})")
            reach += (size - 1) * stride

    # ---- shape and strides -------------------------------------------------------------------------------------

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_SIZES[self.dtype]

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """Logical sizes over :data:`AXES`."""
        return (self.num_layers, self.num_blocks, self.num_kv_parts, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """The C-contiguous tensor shape of the default layout (the shape to allocate)."""
        lay, blocks, parts, heads, tokens, dim = self.shape
        if self.layout is KVLayout.HND:
            return (lay, blocks, parts, heads, tokens, dim)
        return (lay, blocks, parts, tokens, heads, dim)

    @property
    def element_strides(self) -> tuple[int, ...]:
        """Strides in elements over :data:`AXES` (explicit, or those of :attr:`tensor_shape`)."""
        if self.strides is not None:
            return self.strides
        _, _, parts, heads, tokens, dim = self.shape
        if self.layout is KVLayout.HND:
            s_token, s_head = dim, tokens * dim
        else:
            s_head, s_token = dim, heads * dim
        s_kv = heads * tokens * dim
        s_block = parts * s_kv
        return (self.num_blocks * s_block, s_block, s_kv, s_head, s_token, 1)

    @property
    def byte_strides(self) -> tuple[int, ...]:
        """Strides in bytes over :data:`AXES`."""
        return tuple(s * self.itemsize for s in self.element_strides)

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes from the region start to one past the last element this spec addresses (computed once: specs are
        immutable, and every kernel launch checks its regions against it)."""
        reach = sum((n - 1) * s for n, s in zip(self.shape, self.element_strides, strict=True))
        return (self.offset + reach + 1) * self.itemsize

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one layer, all parts and heads (the payload, whatever the layout)."""
        return self.num_kv_parts * self.num_kv_heads * self.block_size * self.head_dim * self.itemsize

    def head_range(self) -> tuple[int, int]:
        """The model's KV heads ``[h0, h1)`` this rank holds."""
        total = self.total_kv_heads
        assert total is not None
        if total >= self.tp_size:
            return self.tp_rank * self.num_kv_heads, (self.tp_rank + 1) * self.num_kv_heads
        replicas = self.tp_size // total
        head = self.tp_rank // replicas
        return head, head + 1

    def replace(self, **changes: Any) -> KVCacheSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_fits(self, nbytes: int, argument: str = "region") -> None:
        """Raise ConfigError unless the spec fits in ``nbytes`` bytes."""
        if self.nbytes > nbytes:
            raise ConfigError(f"{argument}: KVCacheSpec needs {self.nbytes} bytes, the region has {nbytes}")

    def check_itemsize(self, itemsize: int | None, argument: str, where: str) -> None:
        """Raise ConfigError unless memory of ``itemsize``-byte elements (``where``) can hold this spec's dtype.

        ``None`` (a raw pointer, a peer's region: the size is unknown) and 1 (bytes: untyped storage) always pass.
        """
        if itemsize is None or itemsize == 1 or itemsize == self.itemsize:
            return
        raise ConfigError(
            f"{argument}: KVCacheSpec dtype {self.dtype!r} has {self.itemsize}-byte elements, "
            f"{where} holds {itemsize}-byte elements (use an array of that dtype, or of uint8)"
        )

    # ---- block -> byte offsets ---------------------------------------------------------------------------------

    def fragments(self, heads: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
        """The contiguous pieces of one (layer, block, part) box over local heads ``[h0, h1)``.

        Returns (offsets: int64[k] bytes from the box origin, nbytes of each piece).
        """
        h0, h1 = self._local_heads(heads)
        _, _, _, s_head, s_token, _ = self.element_strides
        run = self.head_dim
        outer: list[tuple[int, int]] = []
        for stride, size in sorted([(s_head, h1 - h0), (s_token, self.block_size)]):
            if size == 1:
                continue
            if stride == run and not outer:
                run *= size
            else:
                outer.append((stride, size))
        offsets = np.zeros(1, dtype=np.int64)
        for stride, size in outer:
            offsets = (offsets[None, :] + np.arange(size, dtype=np.int64)[:, None] * stride).ravel()
        return np.sort(offsets) * self.itemsize, run * self.itemsize

    def block_offsets(
        self,
        block_ids: BlockIds,
        *,
        layers: Selection = None,
        heads: tuple[int, int] | None = None,
        parts: Selection = None,
        start: int = 0,
    ) -> tuple[np.ndarray, int]:
        """Byte offsets (from the region start) of every contiguous piece of the given blocks.

        ``block_ids``: int[n] host array of block indices. ``layers``: int[m], a range or slice (default all).
        ``heads``: local head range (default all). ``parts``: which of K (0) / V (1) (default all).
        Order: layer, block (as given), part, piece. Returns (offsets: int64[m*n*parts*pieces], piece nbytes).
        With ``start`` (an address, e.g. the region's) the result is ``start + offsets`` as uint64[...] instead: one
        array built in one pass (a fresh 320 KiB array costs ~80 page faults where malloc hands memory back).
        """
        blocks = as_index_array(block_ids, "block_ids", self.num_blocks)
        layer_ids = as_index_array(selection_ids(layers, self.num_layers), "layers", self.num_layers)
        part_ids = as_index_array(selection_ids(parts, self.num_kv_parts), "parts", self.num_kv_parts)
        h0, _ = self._local_heads(heads)
        pieces, piece_nbytes = self.fragments(heads)
        s_layer, s_block, s_kv, s_head, _, _ = self.byte_strides
        dtype = np.uint64 if start else np.int64
        origin = start + self.offset * self.itemsize + h0 * s_head
        outer = ((layer_ids * s_layer).astype(dtype) + dtype(origin))[:, None] + (blocks * s_block).astype(dtype)
        inner = (part_ids[:, None] * s_kv + pieces[None, :]).ravel().astype(dtype)
        return outer_sum(outer.ravel(), inner), piece_nbytes

    def row_offsets(
        self,
        block_id: int,
        num_tokens: int,
        *,
        layers: Selection = None,
        heads: tuple[int, int] | None = None,
        parts: Selection = None,
    ) -> tuple[np.ndarray, int]:
        """Byte offsets of the head_dim rows of tokens ``[0, num_tokens)`` of one block (a partly filled last
        block). Order: layer, part, head, token. Returns (offsets: int64[k], row nbytes)."""
        block = as_index_array([block_id], "block_id", self.num_blocks)
        layer_ids = as_index_array(selection_ids(layers, self.num_layers), "layers", self.num_layers)
        part_ids = as_index_array(selection_ids(parts, self.num_kv_parts), "parts", self.num_kv_parts)
        h0, h1 = self._local_heads(heads)
        if not 0 <= num_tokens <= self.block_size:
            raise ConfigError(f"num_tokens must lie in [0, {self.block_size}], got {num_tokens}")
        s_layer, s_block, s_kv, s_head, s_token, _ = self.byte_strides
        offsets = (
            self.offset * self.itemsize
            + int(block[0]) * s_block
            + layer_ids[:, None, None, None] * s_layer
            + part_ids[None, :, None, None] * s_kv
            + np.arange(h0, h1)[None, None, :, None] * s_head
            + np.arange(num_tokens)[None, None, None, :] * s_token
        )
        return offsets.ravel(), self.head_dim * self.itemsize

    def _local_heads(self, heads: tuple[int, int] | None) -> tuple[int, int]:
        if heads is None:
            return 0, self.num_kv_heads
        h0, h1 = (int(h) for h in heads)
        if not 0 <= h0 < h1 <= self.num_kv_heads:
            raise ConfigError(f"heads must be a range within [0, {self.num_kv_heads}), got {heads!r}")
        return h0, h1


def outer_sum(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``(outer[:, None] + inner[None, :]).ravel()`` (arrays of one dtype), numpy's inner loop over the longer axis.

    Broadcasting with a short last axis (K/V parts x pieces: often 2) runs numpy's inner loop a few elements at a
    time, ~25x slower than a loop over the short axis writing strided columns.
    """
    if inner.size > 8 and inner.size >= outer.size:
        summed: np.ndarray = (outer[:, None] + inner[None, :]).ravel()
        return summed
    result = np.empty((outer.size, inner.size), dtype=outer.dtype)
    for column in range(inner.size):
        np.add(outer, inner[column], out=result[:, column])
    return result.ravel()


def selection_ids(selection: Selection, count: int) -> int | Sequence[int] | np.ndarray:
    """``None`` (all of ``count``), a slice or a range as an int64 array; anything else unchanged (checked later
    by :func:`as_index_array`)."""
    if selection is None:
        return np.arange(count, dtype=np.int64)
    if isinstance(selection, slice):
        return np.arange(count, dtype=np.int64)[selection]
    if isinstance(selection, range):
        return np.asarray(selection, dtype=np.int64)
    return selection


def has_repeats(ids: np.ndarray, upper: int) -> bool:
    """True if the int64[n] array ``ids`` (entries in ``[0, upper)``) holds a value twice: a counting pass when
    ``upper`` is at most a few times ``n``, else a sort (counting allocates ``upper`` entries: ~40 us for the
    100k blocks of a large cache, where sorting one request's 256 ids takes ~3)."""
    if ids.size < 2:
        return False
    if upper <= 8 * ids.size:
        return int(np.bincount(ids, minlength=upper).max()) > 1
    ordered = np.sort(ids)
    return bool((ordered[1:] == ordered[:-1]).any())


def index_array_and_repeats(
    values: int | Sequence[int] | np.ndarray, argument: str, upper: int
) -> tuple[np.ndarray, bool]:
    """``as_index_array(values, argument, upper)`` and whether it holds a value twice; for a 1-D integer array both
    come from one sort (its ends are the bounds). Raises exactly what :func:`as_index_array` raises."""
    if isinstance(values, (list, tuple)):
        values = np.asarray(values)  # as as_index_array does first
    if type(values) is np.ndarray and values.ndim == 1 and values.size and values.dtype.kind in "iu":
        ordered = np.sort(values)
        if 0 <= ordered[0] and ordered[-1] < upper:
            return values.astype(np.int64, copy=False), bool((ordered[1:] == ordered[:-1]).any())
    checked = as_index_array(values, argument, upper)
    return checked, has_repeats(checked, upper)


def as_index_array(values: int | Sequence[int] | np.ndarray, argument: str, upper: int) -> np.ndarray:
    """``values`` as an int64[n] host array with every entry in ``[0, upper)``; DescriptorError otherwise."""
    from .errors import DescriptorError

    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        values = [values]
    array = np.asarray(values)
    if array.ndim != 1:
        raise DescriptorError(f"{argument} must be a 1-D integer array, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise DescriptorError(f"{argument} must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= upper:
        bad = low if low < 0 else high
        raise DescriptorError(f"{argument} must lie in [0, {upper}), got {bad}")
    return array
