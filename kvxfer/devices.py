"""Small CUDA queries shared by regions, backends and kernels; every import of a GPU library is lazy."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, TypeAlias

from .errors import BackendUnavailableError

#: An array kvxfer reads or writes in place: numpy, torch (CPU or CUDA) or cupy, whole and C-contiguous. cupy ships
#: no type information, so for the type checker this admits any object; every function taking one checks it.
Array: TypeAlias = Any
#: A CUDA stream: a cupy Stream, a torch.cuda.Stream or a raw ``cudaStream_t`` (int); None: the current stream.
#: (cupy's and torch's stream classes are not importable here, so for the type checker this admits any object.)
Stream: TypeAlias = Any


@functools.lru_cache(maxsize=1)
def cupy_module() -> ModuleType:
    """The cupy module if it imports and sees a GPU; BackendUnavailableError otherwise."""
    try:
        import cupy
    except ImportError as error:
        raise BackendUnavailableError(f"cupy is not installed ({error}); install kvxfer[cuda12] or [cuda13]") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 cupy's errors vary by driver state (CUDARuntimeError, ImportError...)
        raise BackendUnavailableError(f"cupy is installed but no CUDA device is usable: {error}") from None
    if count < 1:
        raise BackendUnavailableError("cupy is installed but sees no CUDA device")
    module: ModuleType = cupy
    return module


def cuda_available() -> bool:
    """True when cupy imports and at least one CUDA device is visible."""
    try:
        cupy_module()
    except BackendUnavailableError:
        return False
    return True


def device_count() -> int:
    """Number of visible CUDA devices (0 without cupy or a GPU)."""
    return cupy_module().cuda.runtime.getDeviceCount() if cuda_available() else 0


def device_of_pointer(ptr: int) -> int:
    """The CUDA device ordinal that owns device pointer ``ptr``."""
    cupy = cupy_module()
    attributes = cupy.cuda.runtime.pointerGetAttributes(ptr)
    return int(attributes.device)
