"""Copies of paged KV between layouts: gather to staging, scatter from staging, cache to cache, re-tiled.

One primitive, :func:`copy_kv`, runs a :class:`KVCopyPlan` (built by :func:`plan_kv_copy`): for tokens
``[0, num_tokens)`` of a sequence, a set of layers, K/V parts and a head range, copy every ``head_dim`` row from
one KV cache layout (a :class:`~kvxfer.spec.KVCacheSpec`) to another. Different block sizes, TP head split/merge
and NHD <-> HND are all that copy. A contiguous staging buffer is itself a spec (:func:`staging_spec`), so
:func:`gather_blocks` and :func:`scatter_blocks` are copies to and from it.

Arrays are whole registered buffers, C-contiguous, of the spec's element size or bytes (uint8): the copy moves raw
elements of the spec's size, so uint16 holds bfloat16 and float32 is refused for it.
Numpy arrays and torch CPU tensors run the NumPy reference; cupy arrays and torch CUDA tensors run one CUDA kernel
launch on ``stream``. :func:`copy_kv_pointers` runs the kernel on raw device pointers (IPC-mapped peer memory).
Importing this package imports neither cupy nor torch.
"""

from __future__ import annotations

from ..devices import Array, Stream
from ..errors import ConfigError, DescriptorError
from ..spec import BlockIds, KVCacheSpec, Selection
from . import reference
from .copy_plan import KVCopyPlan, plan_kv_copy, staging_spec


def copy_kv(src: Array, dst: Array, plan: KVCopyPlan, *, stream: Stream = None) -> None:
    """Run ``plan``: read ``src`` (laid out by ``plan.src_spec``), write ``dst`` (by ``plan.dst_spec``).

    ``src``/``dst``: whole C-contiguous buffers, both host (numpy / torch CPU) or both CUDA (cupy / torch CUDA, one
    device). ``stream``: CUDA only; cupy Stream, torch.cuda.Stream or cudaStream_t int (default: the current one).
    The CUDA path returns once the copy is queued. Raises DescriptorError when src and dst memory alias.
    """
    if not isinstance(plan, KVCopyPlan):
        raise ConfigError(f"plan must be a KVCopyPlan (from plan_kv_copy), got {type(plan).__name__}")
    on_cuda = _is_cuda(src), _is_cuda(dst)
    if on_cuda[0] != on_cuda[1]:
        raise ConfigError(
            f"src and dst must both be host or both CUDA arrays, got src "
            f"{'CUDA' if on_cuda[0] else 'host'} and dst {'CUDA' if on_cuda[1] else 'host'}"
        )
    if on_cuda[0]:
        from . import _cuda

        source, target = _cuda.cuda_region(src, "src"), _cuda.cuda_region(dst, "dst")
        _check_itemsizes(plan, source.itemsize, target.itemsize)
        check_no_alias(plan, source.addr, target.addr)
        _cuda.copy_kv(src, dst, plan, stream=stream)
        return
    if stream is not None:
        raise ConfigError("stream applies to CUDA arrays only; src and dst are host arrays")
    src_bytes, dst_bytes = reference.host_bytes(src, "src"), reference.host_bytes(dst, "dst")
    _check_itemsizes(plan, _host_itemsize(src), _host_itemsize(dst))
    check_no_alias(plan, src_bytes.ctypes.data, dst_bytes.ctypes.data)
    reference.copy_kv(src, dst, plan)


def copy_kv_pointers(
    src_ptr: int,
    src_nbytes: int,
    dst_ptr: int,
    dst_nbytes: int,
    plan: KVCopyPlan,
    *,
    device: int,
    stream: Stream = None,
) -> None:
    """Run ``plan`` on raw device pointers with one kernel launch on ``device`` (the NVLink/IPC path).

    ``src_ptr``/``dst_ptr``: starts of the src/dst regions (``spec.offset`` counts from them), ``*_nbytes`` their
    sizes; either may be a peer GPU's memory mapped into this process. ``stream``: as for :func:`copy_kv`.
    """
    from . import _cuda

    check_no_alias(plan, int(src_ptr), int(dst_ptr))
    _cuda.copy_kv_pointers(src_ptr, src_nbytes, dst_ptr, dst_nbytes, plan, device=device, stream=stream)


def upload_plan(plan: KVCopyPlan, device: int = 0) -> KVCopyPlan:
    """Keep ``plan``'s kernel tables on CUDA ``device`` for plans run many times (saves one upload per call)."""
    from . import _cuda

    return _cuda.upload_plan(plan, device)


def copy_blocks(
    src: Array,
    src_spec: KVCacheSpec,
    src_block_ids: BlockIds,
    dst: Array,
    dst_spec: KVCacheSpec,
    dst_block_ids: BlockIds,
    *,
    num_tokens: int | None = None,
    src_layers: Selection = None,
    dst_layers: Selection = None,
    src_heads: tuple[int, int] | None = None,
    dst_heads: tuple[int, int] | None = None,
    parts: Selection = None,
    stream: Stream = None,
) -> KVCopyPlan:
    """Copy tokens of blocks ``src_block_ids`` (int[n], host) of cache ``src`` into blocks ``dst_block_ids`` of ``dst``.

    The caches may differ in layout, block size and TP head slice (see :func:`plan_kv_copy` for the arguments).
    Returns the plan, which :func:`copy_kv` can run again.
    """
    plan = plan_kv_copy(
        src_spec,
        dst_spec,
        src_block_ids,
        dst_block_ids,
        num_tokens=num_tokens,
        src_layers=src_layers,
        dst_layers=dst_layers,
        src_heads=src_heads,
        dst_heads=dst_heads,
        parts=parts,
    )
    copy_kv(src, dst, plan, stream=stream)
    return plan


def gather_blocks(
    cache: Array,
    cache_spec: KVCacheSpec,
    block_ids: BlockIds,
    staging: Array,
    staging_layout: KVCacheSpec | None = None,
    *,
    num_tokens: int | None = None,
    layers: Selection = None,
    heads: tuple[int, int] | None = None,
    staging_layers: Selection = None,
    staging_heads: tuple[int, int] | None = None,
    stream: Stream = None,
) -> KVCacheSpec:
    """Copy tokens of the paged ``cache``'s blocks ``block_ids`` (int[n], host) into the contiguous ``staging``.

    ``staging_layout`` defaults to ``staging_spec(cache_spec, num_tokens, heads=heads)``; ``num_tokens`` to
    ``len(block_ids) * block_size``. ``layers``: cache layer ids; ``staging_layers``: their ids in staging (default
    the same ids, as the default staging holds every layer). ``heads``:
    the cache's local heads to take; ``staging_heads``: where they go in staging (default all of it). Returns the
    staging spec used.
    """
    tokens = len(block_ids) * cache_spec.block_size if num_tokens is None else num_tokens
    layout = staging_layout if staging_layout is not None else staging_spec(cache_spec, tokens, heads=heads)
    copy_blocks(
        cache,
        cache_spec,
        block_ids,
        staging,
        layout,
        [0] if tokens else [],
        num_tokens=tokens,
        src_layers=layers,
        dst_layers=staging_layers,
        src_heads=heads,
        dst_heads=staging_heads,
        stream=stream,
    )
    return layout


def scatter_blocks(
    staging: Array,
    staging_layout: KVCacheSpec | None,
    cache: Array,
    cache_spec: KVCacheSpec,
    block_ids: BlockIds,
    *,
    num_tokens: int | None = None,
    layers: Selection = None,
    heads: tuple[int, int] | None = None,
    staging_layers: Selection = None,
    staging_heads: tuple[int, int] | None = None,
    stream: Stream = None,
) -> KVCacheSpec:
    """Copy tokens from the contiguous ``staging`` into blocks ``block_ids`` (int[n], host) of the paged ``cache``.

    The inverse of :func:`gather_blocks` with the same arguments; ``heads`` are the cache's local heads to fill
    (a TP merge scatters each sender's staging into its own head range). Returns the staging spec used.
    """
    tokens = num_tokens
    if tokens is None:
        tokens = len(block_ids) * cache_spec.block_size
        if staging_layout is not None:
            tokens = min(tokens, staging_layout.block_size)
    layout = staging_layout if staging_layout is not None else staging_spec(cache_spec, tokens, heads=heads)
    copy_blocks(
        staging,
        layout,
        [0] if tokens else [],
        cache,
        cache_spec,
        block_ids,
        num_tokens=tokens,
        src_layers=layers if staging_layers is None else staging_layers,
        dst_layers=layers,
        src_heads=staging_heads,
        dst_heads=heads,
        stream=stream,
    )
    return layout


def _check_itemsizes(plan: KVCopyPlan, src_itemsize: int | None, dst_itemsize: int | None) -> None:
    """ConfigError if src or dst holds elements of another size than its spec's dtype (bytes always pass)."""
    plan.src_spec.check_itemsize(src_itemsize, "src", "the src array")
    plan.dst_spec.check_itemsize(dst_itemsize, "dst", "the dst array")


def check_no_alias(plan: KVCopyPlan, src_addr: int, dst_addr: int) -> None:
    """DescriptorError if the plan could read bytes it writes (src and dst memory overlap).

    Allowed overlap: the same spec at the same address with disjoint block, layer or head sets (a copy between
    blocks of one cache). Anything else whose address ranges meet is refused: the kernel's reads and writes are
    not ordered.
    """
    src, dst = plan.src_spec, plan.dst_spec
    src_range = (src_addr + src.offset * src.itemsize, src_addr + src.nbytes)
    dst_range = (dst_addr + dst.offset * dst.itemsize, dst_addr + dst.nbytes)
    if src_range[1] <= dst_range[0] or dst_range[1] <= src_range[0] or plan.nbytes == 0:
        return
    if src == dst and src_addr == dst_addr:
        blocks = set(plan.src_block_ids.tolist()) & set(plan.dst_block_ids.tolist())
        layers = set(plan.src_layers.tolist()) & set(plan.dst_layers.tolist())
        heads = plan.src_heads[0] < plan.dst_heads[1] and plan.dst_heads[0] < plan.src_heads[1]
        if not (blocks and layers and heads):
            return
        raise DescriptorError(
            f"copy within one cache reads and writes the same blocks {sorted(blocks)[:8]} of "
            f"layers {sorted(layers)[:8]}; source and destination must not overlap"
        )
    raise DescriptorError(
        f"src bytes [{src_range[0]:#x}, {src_range[1]:#x}) and dst bytes [{dst_range[0]:#x}, {dst_range[1]:#x}) "
        "overlap with different specs; copy through a separate buffer"
    )


def _host_itemsize(array: Array) -> int:
    """Bytes per element of a numpy array or torch CPU tensor (host_bytes accepted it)."""
    if type(array).__module__.startswith("torch"):
        return int(array.element_size())
    return int(array.dtype.itemsize)


def _is_cuda(array: Array) -> bool:
    if type(array).__module__.startswith("torch"):
        return bool(array.device.type == "cuda")
    return hasattr(array, "__cuda_array_interface__")


__all__ = [
    "KVCopyPlan",
    "check_no_alias",
    "copy_blocks",
    "copy_kv",
    "copy_kv_pointers",
    "gather_blocks",
    "plan_kv_copy",
    "scatter_blocks",
    "staging_spec",
    "upload_plan",
]
