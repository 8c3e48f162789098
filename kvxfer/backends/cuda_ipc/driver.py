"""The CUDA driver calls the IPC backend needs, through cuda-python (``cuda.bindings.driver``), plus cupy for
legacy IPC handles. Every call is checked; failures raise BackendError naming the call."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from ...devices import cupy_module
from ...errors import BackendError, BackendUnavailableError


@functools.lru_cache(maxsize=1)
def cu() -> Any:
    """The ``cuda.bindings.driver`` module (cuda-python), or BackendUnavailableError."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python 12.x spelling
        except ImportError as error:
            raise BackendUnavailableError(f"cuda-python is not installed ({error})") from None
    return driver


def check(result: Any, call: str) -> Any:
    """Unwrap a cuda-python ``(CUresult, values...)`` tuple; BackendError unless CUDA_SUCCESS."""
    driver = cu()
    status, *values = result if isinstance(result, tuple) else (result,)
    if status != driver.CUresult.CUDA_SUCCESS:
        _, text = driver.cuGetErrorString(status)
        raise BackendError(
            f"{call} failed: {status.name} ({text.decode() if isinstance(text, bytes) else text})", backend="cuda_ipc"
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def use_device(device: int) -> None:
    """Make ``device``'s primary context current on this thread (cupy and the runtime share it)."""
    cupy_module().cuda.runtime.setDevice(device)
    check(
        cu().cuCtxSetCurrent(check(cu().cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")),
        "cuCtxSetCurrent",
    )


def address_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the allocation or mapping containing device pointer ``ptr``."""
    base, size = check(cu().cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
    return int(base), int(size)


def legacy_ipc_capable(ptr: int) -> bool:
    """True for cudaMalloc memory, which cuIpcGetMemHandle can share; False for VMM (cuMemCreate) memory."""
    driver = cu()
    attribute = driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE
    return bool(check(driver.cuPointerGetAttribute(attribute, ptr), "cuPointerGetAttribute"))


def legacy_handle(base: int) -> bytes:
    """The 64-byte IPC handle of the cudaMalloc allocation starting at ``base``."""
    return bytes(cupy_module().cuda.runtime.ipcGetMemHandle(base))


def open_legacy(handle: bytes) -> int:
    """Map a peer's legacy IPC handle into this process (current device); returns the base pointer."""
    lazy_enable_peer_access = 1
    return int(cupy_module().cuda.runtime.ipcOpenMemHandle(handle, lazy_enable_peer_access))


def close_legacy(ptr: int) -> None:
    """Unmap a pointer returned by :func:`open_legacy`."""
    cupy_module().cuda.runtime.ipcCloseMemHandle(ptr)


_BATCH_UNSUPPORTED: list[str] = []  # why cuMemcpyBatchAsync is not used in this process (empty: not known yet)


def memcpy_batch(destinations: list[int], sources: list[int], sizes: list[int], stream: int) -> bool:
    """Queue every copy on ``stream`` with ONE ``cuMemcpyBatchAsync`` (CUDA >= 12.8 driver and bindings).

    Returns False, having queued nothing, when this driver or cuda-python lacks it (remembered for the process:
    the caller then issues one ``cudaMemcpyAsync`` per copy). Copies are pointer-to-pointer, sources read in stream
    order. Other failures raise BackendError.
    """
    if _BATCH_UNSUPPORTED:
        return False
    driver = cu()
    call = getattr(driver, "cuMemcpyBatchAsync", None)
    if call is None:
        _BATCH_UNSUPPORTED.append("cuda-python has no cuMemcpyBatchAsync")
        return False
    attributes = driver.CUmemcpyAttributes()
    attributes.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
    result = call(
        [driver.CUdeviceptr(d) for d in destinations],
        [driver.CUdeviceptr(s) for s in sources],
        list(sizes),
        len(sizes),
        [attributes],
        [0],
        1,
        driver.CUstream(stream),
    )
    status = result[0] if isinstance(result, tuple) else result
    missing = (driver.CUresult.CUDA_ERROR_NOT_SUPPORTED, driver.CUresult.CUDA_ERROR_NOT_FOUND)
    if status in missing:  # an older driver: nothing was queued
        _BATCH_UNSUPPORTED.append(f"the driver answered {status.name}")
        return False
    check(result, "cuMemcpyBatchAsync")
    return True


def _posix_fd_type() -> Any:
    return cu().CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR


def export_vmm_fd(ptr: int) -> int:
    """A POSIX file descriptor sharing the VMM allocation mapped at ``ptr`` (the caller closes it)."""
    driver = cu()
    handle = check(driver.cuMemRetainAllocationHandle(ptr), "cuMemRetainAllocationHandle")
    try:
        properties = check(
            driver.cuMemGetAllocationPropertiesFromHandle(handle), "cuMemGetAllocationPropertiesFromHandle"
        )
        if not int(properties.requestedHandleTypes) & int(_posix_fd_type()):
            raise BackendError(
                "this VMM allocation was created without CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR "
                "and cannot be shared with another process",
                backend="cuda_ipc",
            )
        return int(
            check(driver.cuMemExportToShareableHandle(handle, _posix_fd_type(), 0), "cuMemExportToShareableHandle")
        )
    finally:
        check(driver.cuMemRelease(handle), "cuMemRelease")


@dataclass
class VmmMapping:
    """A peer's VMM chunks mapped contiguously into this process at ``va``."""

    va: int
    nbytes: int

    def close(self) -> None:
        """Unmap and free the address range (the physical memory is the peer's)."""
        check(cu().cuMemUnmap(self.va, self.nbytes), "cuMemUnmap")
        check(cu().cuMemAddressFree(self.va, self.nbytes), "cuMemAddressFree")


def map_vmm(fds: list[int], sizes: list[int], devices: list[int]) -> VmmMapping:
    """Import ``fds`` (closed here) and map them back to back; grant read/write access to ``devices``."""
    if len(fds) != len(sizes) or any(size <= 0 for size in sizes):  # what a peer sent: checked before use
        for fd in fds:
            os.close(fd)
        raise BackendError(
            f"cuda_ipc: a peer sent {len(fds)} file descriptors for chunk sizes {sizes[:8]}", backend="cuda_ipc"
        )
    driver = cu()
    total = sum(sizes)
    va = int(check(driver.cuMemAddressReserve(total, 0, 0, 0), "cuMemAddressReserve"))
    offset = 0
    try:
        for fd, size in zip(fds, sizes, strict=True):
            handle = check(
                driver.cuMemImportFromShareableHandle(fd, _posix_fd_type()), "cuMemImportFromShareableHandle"
            )
            try:
                check(driver.cuMemMap(va + offset, size, 0, handle, 0), "cuMemMap")
            finally:
                check(driver.cuMemRelease(handle), "cuMemRelease")  # the mapping keeps the memory alive
            offset += size
        descriptors = []
        for device in dict.fromkeys(devices):
            access = driver.CUmemAccessDesc()
            access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = device
            access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            descriptors.append(access)
        check(driver.cuMemSetAccess(va, total, descriptors, len(descriptors)), "cuMemSetAccess")
    except Exception:
        if offset:
            driver.cuMemUnmap(va, offset)
        driver.cuMemAddressFree(va, total)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return VmmMapping(va, total)


class VmmAllocation:
    """Device memory from cuMemCreate, shareable by POSIX fd: what PyTorch's ``expandable_segments`` gives.

    ``ptr`` and ``nbytes`` (rounded up to the allocation granularity) describe it; use
    ``Region.from_ptr(a.ptr, a.nbytes, "cuda", a.device, owner=a)`` to register it. Call :meth:`free` (or let
    it be collected).
    """

    def __init__(self, nbytes: int, device: int) -> None:
        driver = cu()
        use_device(device)
        properties = driver.CUmemAllocationProp()
        properties.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        properties.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        properties.location.id = device
        properties.requestedHandleTypes = _posix_fd_type()
        granularity = int(
            check(
                driver.cuMemGetAllocationGranularity(
                    properties, driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
                "cuMemGetAllocationGranularity",
            )
        )
        self.nbytes = -(-nbytes // granularity) * granularity
        self.device = device
        self._handle = check(driver.cuMemCreate(self.nbytes, properties, 0), "cuMemCreate")
        self.ptr = int(check(driver.cuMemAddressReserve(self.nbytes, 0, 0, 0), "cuMemAddressReserve"))
        check(driver.cuMemMap(self.ptr, self.nbytes, 0, self._handle, 0), "cuMemMap")
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        check(driver.cuMemSetAccess(self.ptr, self.nbytes, [access], 1), "cuMemSetAccess")

    def free(self) -> None:
        """Unmap and release the memory."""
        if self._handle is None:
            return
        driver = cu()
        check(driver.cuMemUnmap(self.ptr, self.nbytes), "cuMemUnmap")
        check(driver.cuMemAddressFree(self.ptr, self.nbytes), "cuMemAddressFree")
        check(driver.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 __del__ cannot report (at interpreter shutdown the driver may be gone)
            pass
