"""The CUDA path of the KV copy: compile csrc/kv_copy.cu with CuPy (NVRTC) once, launch one grid per copy.

Imported only when a CUDA array or pointer reaches kvxfer.kernels; needs cupy. Arrays may be cupy arrays or torch
CUDA tensors (raw bytes: any dtype). Streams may be a cupy Stream, a torch.cuda.Stream, or a raw ``cudaStream_t``
int; by default the current stream of the arrays' library (torch's for torch tensors, cupy's otherwise).
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import cupy_module
from ..errors import ConfigError
from ..memory import MemoryKind, Region
from .copy_plan import KVCopyPlan
from .launch import DEFAULT_TUNING, THREADS_PER_CTA, KernelTuning, launch_shape, vector_bytes

_SOURCE = Path(__file__).with_name("csrc") / "kv_copy.cu"

# Plans whose tables the caller asked to keep on a device: plan -> {device: cupy int64 array}.
_DEVICE_TABLES: "weakref.WeakKeyDictionary[KVCopyPlan, dict[int, Any]]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=None)
def _module(device: int, tuning: KernelTuning) -> Any:
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        return cupy.RawModule(code=_SOURCE.read_text(), options=("--std=c++17", *tuning.defines()))


@functools.lru_cache(maxsize=None)
def kernel(vector_bytes: int, device: int, tuning: KernelTuning = DEFAULT_TUNING) -> Any:
    """The compiled entry ``kvxfer_copy_v{vector_bytes}`` on ``device`` (compiled once per device and tuning)."""
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        return _module(device, tuning).get_function(f"kvxfer_copy_v{vector_bytes}")


@functools.lru_cache(maxsize=None)
def resident_ctas(vector_bytes: int, device: int, tuning: KernelTuning = DEFAULT_TUNING) -> int:
    """CTAs of one entry that fit on the whole GPU at once (limited by registers and threads per SM)."""
    cupy = cupy_module()
    properties = cupy.cuda.runtime.getDeviceProperties(device)
    registers = int(kernel(vector_bytes, device, tuning).num_regs)
    warp_registers = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    by_registers = int(properties["regsPerMultiprocessor"]) // (warp_registers * (THREADS_PER_CTA // 32))
    by_threads = int(properties["maxThreadsPerMultiProcessor"]) // THREADS_PER_CTA
    per_sm = max(1, min(by_registers, by_threads, int(properties.get("maxBlocksPerMultiProcessor", 32))))
    return int(properties["multiProcessorCount"]) * per_sm


def cuda_region(array: Any, argument: str) -> Region:
    """The device memory of a cupy array or torch CUDA tensor (whole, C-contiguous)."""
    region = Region.from_array(array)
    if region.kind is not MemoryKind.CUDA:
        raise ConfigError(f"{argument}: expected CUDA memory, got {region.kind.value} memory")
    return region


def copy_kv(src: Any, dst: Any, plan: KVCopyPlan, *, stream: Any = None,
            tuning: KernelTuning = DEFAULT_TUNING) -> None:
    """Run ``plan`` from ``src`` to ``dst`` (cupy arrays or torch CUDA tensors on one device) on ``stream``."""
    source, target = cuda_region(src, "src"), cuda_region(dst, "dst")
    if source.device != target.device:
        raise ConfigError(f"src is on device {source.device} and dst on {target.device}; copy_kv_pointers "
                          "launches on a chosen device and reads or writes peer memory")
    if stream is None and type(dst).__module__.startswith("torch"):
        import torch  # already imported: dst is a torch tensor

        stream = torch.cuda.current_stream(target.device).cuda_stream
    copy_kv_pointers(source.addr, source.nbytes, target.addr, target.nbytes, plan, device=target.device,
                     stream=stream, tuning=tuning)


def copy_kv_pointers(src_ptr: int, src_nbytes: int, dst_ptr: int, dst_nbytes: int, plan: KVCopyPlan, *,
                     device: int, stream: Any = None, tuning: KernelTuning = DEFAULT_TUNING) -> None:
    """Run ``plan`` between raw device pointers, launching on ``device``.

    ``src_ptr``/``dst_ptr`` are region starts (``spec.offset`` counts from them) and may be IPC-mapped peer
    memory reachable from ``device``. ``tuning``: kernel knobs (benchmarks only). Does not synchronize; the copy is
    ordered on ``stream``.
    """
    plan.src_spec.check_fits(src_nbytes, argument="src")
    plan.dst_spec.check_fits(dst_nbytes, argument="dst")
    if plan.nbytes == 0:
        return
    cupy = cupy_module()
    tables = plan.tables
    cap = None
    if tuning.waves is not None:
        vector = vector_bytes(tables, int(src_ptr), int(dst_ptr))
        cap = max(1, int(resident_ctas(vector, device, tuning) * tuning.waves))
    shape = launch_shape(tables, int(src_ptr), int(dst_ptr), max_ctas=cap, unroll=tuning.unroll)
    function = kernel(shape.vector_bytes, device, tuning)
    with cupy.cuda.Device(device):
        launch_stream = _as_stream(cupy, stream, device)
        with launch_stream:
            table = _DEVICE_TABLES.get(plan, {}).get(device)
            if table is None:
                table = cupy.empty(tables.table.shape, dtype=cupy.int64)
                table.set(tables.table, stream=launch_stream)
            function((shape.num_ctas,), (THREADS_PER_CTA,),
                     (np.uint64(shape.src_addr), np.uint64(shape.dst_addr), table, *shape.scalars))


def upload_plan(plan: KVCopyPlan, device: int) -> KVCopyPlan:
    """Keep ``plan``'s tables on ``device`` so later copies skip the per-call upload; returns ``plan``.

    The copy lives as long as the plan. Synchronizes once (the table must be complete before any stream uses it).
    """
    cupy = cupy_module()
    per_device = _DEVICE_TABLES.setdefault(plan, {})
    if device not in per_device:
        with cupy.cuda.Device(device):
            table = cupy.asarray(plan.tables.table)
            cupy.cuda.get_current_stream().synchronize()
        per_device[device] = table
    return plan


def _as_stream(cupy: Any, stream: Any, device: int) -> Any:
    if stream is None:
        return cupy.cuda.get_current_stream()
    if type(stream).__module__.startswith("cupy") and hasattr(stream, "ptr"):  # Stream or ExternalStream
        return stream
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        pointer = int(stream)
    elif hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        pointer = int(stream.cuda_stream)
    else:
        raise ConfigError(f"stream must be a cupy Stream, a torch.cuda.Stream or a cudaStream_t int, "
                          f"got {type(stream).__name__}")
    try:
        return cupy.cuda.ExternalStream(pointer, device)
    except TypeError:  # cupy < 13 has no device argument
        return cupy.cuda.ExternalStream(pointer)
