"""The UCX backend's own registered regions: their UCP registrations, host views, CUDA bounds, and the export table
same-host peers check one-sided transfers against (exports.py). Changed under the worker lock."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import DescriptorError
from ...memory import MemoryKind
from .binding import Context, MemoryHandle
from .device_slots import check_device_spans
from .exports import ExportTable

if TYPE_CHECKING:
    from ...memory import Region


def fragment_handles(regions: np.ndarray, lookup: Callable[[int], Any], owner: str) -> list[Any]:
    """``lookup(index)`` for each fragment's region (int32[n] region indices), one lookup when all are alike;
    DescriptorError naming ``owner`` for an index ``lookup`` does not know (KeyError)."""
    try:
        if bool((regions == regions[0]).all()):
            return [lookup(int(regions[0]))] * len(regions)
        return [lookup(i) for i in regions.tolist()]
    except KeyError as error:
        raise DescriptorError(f"{owner} region {error} has no UCX registration") from None


class LocalRegions:
    """Regions registered with this backend, by region index. ``export``: list host and CUDA regions in the export
    table (``KVXFER_UCX_ONE_SIDED`` is not off)."""

    def __init__(self, ucp: Context, export: bool) -> None:
        self._ucp, self._export = ucp, export
        self._memhs: dict[int, MemoryHandle] = {}
        self._views: dict[int, tuple[int, np.ndarray]] = {}
        self._device: dict[int, tuple[int, int, int]] = {}  # index -> (addr, nbytes, device)
        self.exports = ExportTable()
        self.cuda_device: int | None = None  # the device of the first CUDA region (the progress thread's)

    def add(self, region: Region) -> bytes:
        """Register ``region`` with UCP; its packed remote key (RegistrationError if UCP refuses)."""
        memh = self._ucp.map(region.addr, region.nbytes, region.kind is MemoryKind.CUDA)
        self._memhs[region.index] = memh
        if self._export:
            self.exports.add(region.index, region.addr, region.nbytes)
        if region.kind is MemoryKind.HOST:
            self._views[region.index] = (region.addr, region.as_numpy())
        else:
            self._device[region.index] = (region.addr, region.nbytes, region.device)
            if self.cuda_device is None:
                self.cuda_device = region.device
        return memh.packed_rkey

    def remove(self, region: Region) -> None:
        """Stop exporting ``region`` and unregister it."""
        self.exports.remove(region.index)
        self._views.pop(region.index, None)
        self._device.pop(region.index, None)
        memh = self._memhs.pop(region.index, None)
        if memh is not None:
            memh.close()

    def packed_keys(self) -> list[tuple[int, bytes]]:
        """(region index, packed remote key) of every registered region."""
        return [(index, memh.packed_rkey) for index, memh in list(self._memhs.items())]

    def host_view(self, index: int) -> tuple[int, np.ndarray]:
        """(base address, uint8 view) of our registered host region ``index``; KeyError if there is none."""
        return self._views[index]

    def check_device_spans(self, addr: np.ndarray, nbytes: np.ndarray, region: np.ndarray) -> int:
        """The device of spans that all lie in our registered CUDA regions of one device; ValueError if not."""
        return check_device_spans(addr, nbytes, region, self._device)

    def memh_list(self, regions: np.ndarray) -> list[Any]:
        """The ucp_mem_h of each local fragment's region (int32[n] region indices)."""
        return fragment_handles(regions, lambda i: self._memhs[i].handle, "local")

    def close(self) -> None:
        """Unregister every region (the backend is closing)."""
        for memh in self._memhs.values():
            memh.close()
        self._memhs.clear()
