"""The CUDA path of the KV copy: compile csrc/kv_copy.cu with CuPy (NVRTC) once, launch one grid per copy.

Imported only when a CUDA array or pointer reaches kvxfer.kernels; needs cupy. Arrays may be cupy arrays or torch
CUDA tensors (raw bytes: any dtype). Streams may be a cupy Stream, a torch.cuda.Stream, or a raw ``cudaStream_t``
int; by default the current stream of the arrays' library (torch's for torch tensors, cupy's otherwise).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..devices import Array, Stream
from ..devices import cupy_module as cupy_module  # looked up here: tests emulate the GPU by replacing it
from ..errors import ConfigError
from ..memory import MemoryKind, Region
from .copy_plan import KVCopyPlan
from .launch import DEFAULT_TUNING, KernelTuning, LaunchShape, default_tuning, launch_shape, vector_bytes
from .table_ring import table_ring as _table_ring
from .tables import KernelTables

_SOURCE = Path(__file__).with_name("csrc") / "kv_copy.cu"


#: Tables kept on a device by upload_plan, per plan (dropped with the plan).
_UPLOADED: weakref.WeakKeyDictionary[KVCopyPlan, dict[int, Any]] = weakref.WeakKeyDictionary()
#: (compiled entry, launch shape) per (tables' launch key, device, vector width, tuning): plans of one template
#: share it. Cleared when full.
_LAUNCHES: dict[tuple[tuple[int | bool, ...], int, int, KernelTuning], tuple[Any, LaunchShape]] = {}
_MAX_LAUNCHES = 1024


@functools.cache
def _module(device: int, defines: tuple[str, ...]) -> Any:
    """One compile per device and set of -D options (tunings that differ only at launch share it)."""
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        return cupy.RawModule(code=_SOURCE.read_text(), options=("--std=c++17", *defines))


@functools.cache
def kernel(entry: str, device: int, tuning: KernelTuning = DEFAULT_TUNING) -> Any:
    """The compiled ``entry`` (e.g. ``kvxfer_rows_v16``) on ``device`` (compiled once per device and tuning)."""
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        return _module(device, tuning.defines()).get_function(entry)


@functools.cache
def resident_ctas(entry: str, device: int, tuning: KernelTuning = DEFAULT_TUNING) -> int:
    """CTAs of one entry that fit on the whole GPU at once (limited by registers and threads per SM)."""
    return resident_ctas_of(int(kernel(entry, device, tuning).num_regs), device, tuning.threads)


def resident_ctas_of(registers: int, device: int, threads: int) -> int:
    """CTAs of ``threads`` threads using ``registers`` registers each that fit on the whole GPU at once."""
    properties = cupy_module().cuda.runtime.getDeviceProperties(device)
    warp_registers = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    by_registers = int(properties["regsPerMultiprocessor"]) // (warp_registers * (threads // 32))
    by_threads = int(properties["maxThreadsPerMultiProcessor"]) // threads
    per_sm = max(1, min(by_registers, by_threads, int(properties.get("maxBlocksPerMultiProcessor", 32))))
    return int(properties["multiProcessorCount"]) * per_sm


def cuda_region(array: Array, argument: str) -> Region:
    """The device memory of a cupy array or torch CUDA tensor (whole, C-contiguous)."""
    region = Region.from_array(array)
    if region.kind is not MemoryKind.CUDA:
        raise ConfigError(f"{argument}: expected CUDA memory, got {region.kind.value} memory")
    return region


def copy_kv(
    src: Array, dst: Array, plan: KVCopyPlan, *, stream: Stream = None, tuning: KernelTuning | None = None
) -> None:
    """Run ``plan`` from ``src`` to ``dst`` (cupy arrays or torch CUDA tensors on one device) on ``stream``."""
    source, target = cuda_region(src, "src"), cuda_region(dst, "dst")
    if source.device != target.device:
        raise ConfigError(
            f"src is on device {source.device} and dst on {target.device}; copy_kv_pointers "
            "launches on a chosen device and reads or writes peer memory"
        )
    if stream is None and type(dst).__module__.startswith("torch"):
        import torch  # already imported: dst is a torch tensor

        stream = torch.cuda.current_stream(target.device).cuda_stream
    copy_kv_pointers(
        source.addr, source.nbytes, target.addr, target.nbytes, plan, device=target.device, stream=stream, tuning=tuning
    )


def copy_kv_pointers(
    src_ptr: int,
    src_nbytes: int,
    dst_ptr: int,
    dst_nbytes: int,
    plan: KVCopyPlan,
    *,
    device: int,
    stream: Stream = None,
    tuning: KernelTuning | None = None,
) -> None:
    """Run ``plan`` between raw device pointers, launching on ``device``.

    ``src_ptr``/``dst_ptr`` are region starts (``spec.offset`` counts from them) and may be IPC-mapped peer
    memory reachable from ``device``. ``tuning``: kernel knobs (benchmarks only). Does not synchronize; the copy is
    ordered on ``stream``. The table goes up with one async copy from a reused pinned buffer (see
    :class:`~.table_ring.TableRing`), unless :func:`upload_plan` put it on ``device`` already.
    """
    tables = plan.tables
    tuning = default_tuning(tables.contiguous) if tuning is None else tuning
    if src_nbytes < plan.src_spec.nbytes or dst_nbytes < plan.dst_spec.nbytes:
        plan.src_spec.check_fits(src_nbytes, argument="src")
        plan.dst_spec.check_fits(dst_nbytes, argument="dst")
    if tables.num_boxes == 0:  # nothing to move (no tokens, layers or parts)
        return
    cupy = cupy_module()
    src_ptr, dst_ptr = int(src_ptr), int(dst_ptr)
    with cupy.cuda.Device(device):
        launch_stream = _launch_stream(cupy, stream, device)
        function, shape = _launch(tables, src_ptr, dst_ptr, device, tuning)
        pointers = np.uint64(src_ptr + tables.src_base), np.uint64(dst_ptr + tables.dst_base)
        uploaded = _UPLOADED.get(plan) if len(_UPLOADED) else None
        table = uploaded.get(device) if uploaded else None
        if table is not None:
            function((shape.num_ctas,), (shape.threads,), (*pointers, table, *shape.scalars), stream=launch_stream)
        else:
            _table_ring(device).launch(
                cupy,
                function,
                shape,
                pointers,
                tables.table,
                launch_stream,
                lambda: _cupy_stream(cupy, launch_stream, device),
            )


def upload_plan(plan: KVCopyPlan, device: int) -> KVCopyPlan:
    """Keep ``plan``'s tables on ``device`` so later copies skip the per-call upload; returns ``plan``.

    The copy lives as long as the plan. Synchronizes once (the table must be complete before any stream uses it).
    """
    cupy = cupy_module()
    tables = _UPLOADED.setdefault(plan, {})
    if device not in tables:
        with cupy.cuda.Device(device):
            table = cupy.asarray(plan.tables.table)
            cupy.cuda.get_current_stream().synchronize()
        tables[device] = table
    return plan


def launch_of(
    plan: KVCopyPlan, src_ptr: int, dst_ptr: int, device: int, tuning: KernelTuning | None = None
) -> LaunchShape:
    """The launch :func:`copy_kv_pointers` makes for these pointers (entry, grid, arguments)."""
    tuning = default_tuning(plan.tables.contiguous) if tuning is None else tuning
    with cupy_module().cuda.Device(device):
        shape = _launch(plan.tables, int(src_ptr), int(dst_ptr), device, tuning)[1]
    # The cached shape is shared by plans of one layout; its addresses are those of the call that made it.
    return dataclasses.replace(
        shape, src_addr=int(src_ptr) + plan.tables.src_base, dst_addr=int(dst_ptr) + plan.tables.dst_base
    )


def _launch(
    tables: KernelTables, src_ptr: int, dst_ptr: int, device: int, tuning: KernelTuning
) -> tuple[Any, LaunchShape]:
    """(compiled entry, launch shape) of ``tables`` at this alignment, computed once per (device, vector, tuning)."""
    key = (tables.launch_key(), device, vector_bytes(tables, src_ptr, dst_ptr), tuning)
    cached = _LAUNCHES.get(key)
    if cached is None:
        shape = launch_shape(tables, src_ptr, dst_ptr, tuning)
        if tuning.waves is not None:
            cap = max(1, int(resident_ctas(shape.entry, device, tuning) * tuning.waves))
            shape = launch_shape(tables, src_ptr, dst_ptr, tuning, max_ctas=cap)
        cached = kernel(shape.entry, device, tuning), shape
        if len(_LAUNCHES) >= _MAX_LAUNCHES:
            _LAUNCHES.clear()
        _LAUNCHES[key] = cached
    return cached


def clear_caches() -> None:
    """Forget compiled modules, launch shapes, wrapped streams and table slots (tests swap cupy stand-ins)."""
    for cached in (_module, kernel, resident_ctas, _external_stream, _table_ring):
        cached.cache_clear()
    _LAUNCHES.clear()


class _RawStream:
    """A ``cudaStream_t`` as cupy's kernel launch takes it (anything with ``.ptr``)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:  # the CUDA stream protocol (cupy >= 14 Stream.from_external)
        return 0, self.ptr


def _launch_stream(cupy: ModuleType, stream: Stream, device: int) -> Any:
    """``stream`` as an object with ``.ptr`` (a cupy stream as is; ints and torch streams wrapped)."""
    if stream is None:
        return cupy.cuda.get_current_stream()
    if type(stream).__module__.startswith("cupy") and hasattr(stream, "ptr"):  # cupy Stream / ExternalStream
        return stream
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return _RawStream(int(stream))
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return _RawStream(int(stream.cuda_stream))
    raise ConfigError(
        f"stream must be a cupy Stream, a torch.cuda.Stream or a cudaStream_t int, got {type(stream).__name__}"
    )


def _cupy_stream(cupy: ModuleType, stream: Stream, device: int) -> Any:
    """A cupy stream object for ``stream`` (from :func:`_launch_stream`), to enter as cupy's current stream."""
    if not isinstance(stream, _RawStream):
        return stream
    return _external_stream(cupy, stream.ptr, device)


@functools.lru_cache(maxsize=64)
def _external_stream(cupy: ModuleType, pointer: int, device: int) -> Any:
    if pointer == 0:
        return cupy.cuda.Stream.null
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:  # cupy >= 14 (ExternalStream is deprecated there)
        try:
            return from_external(_RawStream(pointer))
        except (TypeError, ValueError, AttributeError):  # a signature other than the stream protocol's
            pass
    try:
        return cupy.cuda.ExternalStream(pointer, device)
    except TypeError:  # cupy < 13 has no device argument
        return cupy.cuda.ExternalStream(pointer)
