"""Host-side planning of KV copies: validation, the staging layout, and the tables the CUDA kernel walks.

Pure NumPy. The reference (NumPy) path and the CUDA path share everything here, so a plan that validates on a
CPU machine means the same copy on a GPU.

What a :class:`KVCopyPlan` moves: tokens ``[0, num_tokens)`` of one sequence. Token ``t`` lives in source block
``src_block_ids[t // src_spec.block_size]`` at slot ``t % src_spec.block_size`` and goes to destination block
``dst_block_ids[t // dst_spec.block_size]`` at slot ``t % dst_spec.block_size``; for each pair
``(src_layers[i], dst_layers[i])``, each K/V part in ``parts``, and local heads ``src_heads`` -> ``dst_heads``
(equal counts), all ``head_dim`` elements. Block-size change, TP split/merge (head ranges), NHD <-> HND and
gather/scatter through a staging buffer are all this one copy.

Plans are built per request (a KV pipe plans every pull), so what does not depend on block ids or the token count
is validated and computed once per (specs, layers, parts, heads) and cached (:class:`~.tables.TableTemplate`): a
repeated plan costs the block ids' checks and a few NumPy calls for its tables.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from ..errors import ConfigError, DescriptorError, LayoutMismatchError
from ..spec import BlockIds, KVCacheSpec, KVLayout, Selection, as_index_array, selection_ids
from .tables import MAX_BOX_BYTES, MAX_VECTOR_BYTES, KernelTables, TableTemplate, kernel_tables  # noqa: F401 (re-exported)

#: Templates kept (least recently created dropped first); a pipe needs one or two per peer route.
MAX_TEMPLATES = 64

#: specs, layer / part selections and head ranges of a plan (see _template_key)
_TemplateKey: TypeAlias = tuple[Hashable, ...]
_TEMPLATES: dict[_TemplateKey, TableTemplate] = {}
_TEMPLATES_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class KVCopyPlan:
    """A validated KV copy between two layouts. Build with :func:`plan_kv_copy`; run with ``copy_kv``.

    ``src_block_ids``: int64[ceil(num_tokens / src_spec.block_size)], host; ``dst_block_ids`` likewise for the
    destination (no duplicates). ``src_layers``/``dst_layers``: int64[m], host. ``parts``: int64[p] (0 = K, 1 = V).
    ``src_heads``/``dst_heads``: local head ranges ``[h0, h1)`` of equal length. Plans from :func:`plan_kv_copy`
    with the same specs, layers, parts and heads share their (read-only) layer and part arrays.
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
    _template: TableTemplate | None = field(default=None, repr=False)

    @property
    def num_heads(self) -> int:
        """Heads moved per (layer, part, token)."""
        return self.src_heads[1] - self.src_heads[0]

    @property
    def nbytes(self) -> int:
        """Payload bytes moved (read once, written once)."""
        spec = self.src_spec
        return len(self.src_layers) * len(self.parts) * self.num_tokens * self.num_heads * spec.head_dim * spec.itemsize

    @functools.cached_property
    def tables(self) -> KernelTables:
        """The segment and layer tables of the CUDA kernel (computed once per plan)."""
        template = self._template
        if template is not None and template.describes(self):
            return template.tables(self.src_block_ids, self.dst_block_ids, self.num_tokens)
        return kernel_tables(self)


def plan_kv_copy(
    src_spec: KVCacheSpec,
    dst_spec: KVCacheSpec,
    src_block_ids: BlockIds,
    dst_block_ids: BlockIds,
    *,
    num_tokens: int | None = None,
    src_layers: Selection = None,
    dst_layers: Selection = None,
    src_heads: tuple[int, int] | None = None,
    dst_heads: tuple[int, int] | None = None,
    parts: Selection = None,
) -> KVCopyPlan:
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
    key = _template_key(src_spec, dst_spec, src_layers, dst_layers, parts, src_heads, dst_heads)
    template = _TEMPLATES.get(key) if key is not None else None
    if template is None:
        _check_compatible(src_spec, dst_spec)
    # A cached template means every argument but the block ids and num_tokens passed the checks below before: the
    # first failing check is the same either way.
    src_ids = _index_array(src_block_ids, "src_block_ids", src_spec.num_blocks)
    dst_ids = _index_array(dst_block_ids, "dst_block_ids", dst_spec.num_blocks)
    tokens = _num_tokens(num_tokens, src_spec, dst_spec, src_ids, dst_ids)
    _check_unique(dst_ids, "dst_block_ids")
    if template is None:
        template = _template(src_spec, dst_spec, src_layers, dst_layers, parts, src_heads, dst_heads, key)
    return KVCopyPlan(
        src_spec,
        dst_spec,
        src_ids,
        dst_ids,
        tokens,
        template.src_layers,
        template.dst_layers,
        template.parts,
        template.src_heads,
        template.dst_heads,
        template,
    )


def _template(
    src_spec: KVCacheSpec,
    dst_spec: KVCacheSpec,
    src_layers: Selection,
    dst_layers: Selection,
    parts: Selection,
    src_heads: tuple[int, int] | None,
    dst_heads: tuple[int, int] | None,
    key: _TemplateKey | None,
) -> TableTemplate:
    """Validate the arguments other than block ids and build their template (cached under ``key`` unless None)."""
    layers_src = as_index_array(selection_ids(src_layers, src_spec.num_layers), "src_layers", src_spec.num_layers)
    layers_dst = as_index_array(
        layers_src if dst_layers is None else selection_ids(dst_layers, dst_spec.num_layers),
        "dst_layers",
        dst_spec.num_layers,
    )
    if layers_src.shape != layers_dst.shape:
        raise DescriptorError(
            f"dst_layers must pair with src_layers: expected {layers_src.size} layers, got {layers_dst.size}"
        )
    _check_unique(layers_dst, "dst_layers")
    part_ids = as_index_array(selection_ids(parts, src_spec.num_kv_parts), "parts", src_spec.num_kv_parts)
    _check_unique(part_ids, "parts")
    heads_src = _head_range(src_heads, src_spec, "src_heads")
    heads_dst = _head_range(dst_heads, dst_spec, "dst_heads")
    if heads_src[1] - heads_src[0] != heads_dst[1] - heads_dst[0]:
        raise LayoutMismatchError(
            f"src_heads {heads_src} and dst_heads {heads_dst} must hold as many heads; pass head ranges computed "
            "from head_range() for a TP split or merge"
        )
    template = TableTemplate(src_spec, dst_spec, layers_src, layers_dst, part_ids, heads_src, heads_dst)
    if key is not None:
        with _TEMPLATES_LOCK:
            while len(_TEMPLATES) >= MAX_TEMPLATES:
                del _TEMPLATES[next(iter(_TEMPLATES))]
            _TEMPLATES[key] = template
    return template


class _Uncacheable(Exception):
    """An argument of a type the template key does not cover (its plans get a template of their own)."""


def _template_key(
    src_spec: KVCacheSpec,
    dst_spec: KVCacheSpec,
    src_layers: Selection,
    dst_layers: Selection,
    parts: Selection,
    src_heads: tuple[int, int] | None,
    dst_heads: tuple[int, int] | None,
) -> _TemplateKey | None:
    """A hashable key of the arguments besides block ids and num_tokens; equal keys plan the same copy. None for
    arguments of types the key does not cover (invalid ones among them: they then fail in the full checks)."""
    try:
        key = (
            src_spec,
            dst_spec,
            _selection_key(src_layers),
            _selection_key(dst_layers),
            _selection_key(parts),
            _heads_key(src_heads),
            _heads_key(dst_heads),
        )
        hash(key)
    except (_Uncacheable, TypeError, ValueError):
        return None
    return key


def _selection_key(selection: Selection) -> Hashable:
    if selection is None or isinstance(selection, range):
        return selection
    if isinstance(selection, slice):
        return "slice", selection.start, selection.stop, selection.step
    if isinstance(selection, (int, np.integer)) and not isinstance(selection, bool):
        return "id", int(selection)
    if not isinstance(selection, (np.ndarray, list, tuple)):
        raise _Uncacheable
    array = np.asarray(selection)
    if array.dtype.kind not in "iu":  # object arrays' bytes are pointers; other kinds fail the checks
        raise _Uncacheable
    return array.dtype.str, array.shape, array.tobytes()


def _heads_key(heads: tuple[int, int] | None) -> tuple[int, int] | None:
    if heads is None:
        return None
    if type(heads) is tuple and len(heads) == 2 and type(heads[0]) is int and type(heads[1]) is int:
        return heads
    if (
        not isinstance(heads, (tuple, list))
        or len(heads) != 2
        or not all(isinstance(h, (int, np.integer)) for h in heads)
    ):
        raise _Uncacheable
    return int(heads[0]), int(heads[1])


def staging_spec(
    cache_spec: KVCacheSpec,
    num_tokens: int,
    *,
    num_layers: int | None = None,
    heads: tuple[int, int] | None = None,
    layout: KVLayout | str = KVLayout.HND,
    offset: int = 0,
) -> KVCacheSpec:
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
    return KVCacheSpec(
        num_layers=cache_spec.num_layers if num_layers is None else num_layers,
        num_blocks=1,
        block_size=num_tokens,
        num_kv_heads=h1 - h0,
        head_dim=cache_spec.head_dim,
        dtype=cache_spec.dtype,
        layout=KVLayout.parse(layout),
        num_kv_parts=cache_spec.num_kv_parts,
        offset=offset,
        model=cache_spec.model,
    )


def _check_compatible(src: KVCacheSpec, dst: KVCacheSpec) -> None:
    for name in ("head_dim", "dtype", "num_kv_parts"):
        if getattr(src, name) != getattr(dst, name):
            raise LayoutMismatchError(
                f"src_spec and dst_spec must have the same {name}: src {getattr(src, name)!r}, "
                f"dst {getattr(dst, name)!r}"
            )


def _num_tokens(
    num_tokens: int | None, src: KVCacheSpec, dst: KVCacheSpec, src_ids: np.ndarray, dst_ids: np.ndarray
) -> int:
    if num_tokens is None:
        num_tokens = min(src_ids.size * src.block_size, dst_ids.size * dst.block_size)
    if not isinstance(num_tokens, (int, np.integer)) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise ConfigError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    for argument, ids, block_size in (
        ("src_block_ids", src_ids, src.block_size),
        ("dst_block_ids", dst_ids, dst.block_size),
    ):
        expected = -(-int(num_tokens) // block_size)
        if ids.size != expected:
            raise DescriptorError(
                f"{argument}: {num_tokens} tokens in blocks of {block_size} need {expected} block ids, got {ids.size}"
            )
    return int(num_tokens)


def _index_array(values: BlockIds, argument: str, upper: int) -> np.ndarray:
    """``as_index_array``, with a shortcut for what pipes pass (int64[n] arrays in range): two reductions."""
    if (
        type(values) is np.ndarray
        and values.dtype is _INT64
        and values.ndim == 1
        and values.size
        and values.min() >= 0
        and values.max() < upper
    ):
        return values
    return as_index_array(values, argument, upper)  # converts, or raises its errors


_INT64 = np.dtype(np.int64)


def _check_unique(ids: np.ndarray, argument: str) -> None:
    if ids.size < 2:
        return
    ordered = np.sort(ids)
    same = ordered[1:] == ordered[:-1]
    if same.any():
        repeated = np.flatnonzero(same)
        raise DescriptorError(
            f"{argument} must not repeat (each destination is written once), "
            f"got {int(ordered[repeated[0]])} more than once"
        )


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
