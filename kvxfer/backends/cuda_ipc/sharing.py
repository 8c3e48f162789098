"""Export of local device regions and import of peers' regions for the CUDA IPC backend.

Export: cudaMalloc memory shares the IPC handle of its allocation base plus the region's offset; VMM memory
(cuMemCreate, e.g. PyTorch expandable segments) shares one POSIX fd per physical chunk under the region, served
by the mailbox. Import: opened lazily, once per (peer region, local device), closed on disconnect.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ...errors import BackendError, RegistrationError
from . import driver

logger = logging.getLogger("kvxfer")

LEGACY, VMM = "legacy", "vmm"


@dataclass
class Export:
    """What one registered region shares: its public key and, for VMM, the fds behind it."""

    key: bytes
    fds: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Close the exported fds (importers keep their own references)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def export_region(addr: int, nbytes: int, device: int) -> Export:
    """Share the device region [addr, addr + nbytes) of ``device``."""
    driver.use_device(device)
    if driver.legacy_ipc_capable(addr):
        base, _ = driver.address_range(addr)
        return Export(msgpack.packb([LEGACY, driver.legacy_handle(base), addr - base]))
    chunks: list[tuple[int, int]] = []
    pointer = addr
    while pointer < addr + nbytes:
        base, size = driver.address_range(pointer)
        if chunks and base != chunks[-1][0] + chunks[-1][1]:
            raise RegistrationError(f"VMM region at {addr:#x} is not backed by contiguous mappings")
        chunks.append((base, size))
        pointer = base + size
    fds = []
    try:
        for base, _ in chunks:
            fds.append(driver.export_vmm_fd(base))
    except Exception:
        for fd in fds:
            os.close(fd)
        raise
    sizes = [size for _, size in chunks]
    return Export(msgpack.packb([VMM, addr - chunks[0][0], len(sizes)]), fds, sizes)


class Imports:
    """Peer regions mapped into this process: (peer uid, region index, local device) -> local address of the
    peer region's first byte."""

    def __init__(self) -> None:
        self._bases: dict[tuple[str, int, int], int] = {}
        self._closers: dict[str, list[Callable[[], None]]] = {}
        self._legacy: dict[tuple[str, bytes, int], int] = {}

    def local_base(
        self,
        peer_uid: str,
        region_index: int,
        device: int,
        key: bytes,
        fetch_fds: Callable[[int], tuple[list[int], Any]],
    ) -> int:
        """Map the peer region (once) and return where its first byte is in this process."""
        slot = (peer_uid, region_index, device)
        if slot in self._bases:
            return self._bases[slot]
        try:
            mode, *fields = msgpack.unpackb(key, raw=False)
        except (TypeError, ValueError, msgpack.UnpackException) as error:
            raise BackendError(f"cuda_ipc: undecodable key for peer region {region_index}: {error}") from None
        driver.use_device(device)
        if mode == LEGACY:
            handle, offset = bytes(fields[0]), int(fields[1])
            opened = self._legacy.get((peer_uid, handle, device))
            if opened is None:  # one allocation may back several regions: open its handle once
                opened = driver.open_legacy(handle)
                self._legacy[(peer_uid, handle, device)] = opened
                self._closers.setdefault(peer_uid, []).append(functools.partial(_close_legacy, device, opened))
            base = opened + offset
        elif mode == VMM:
            offset = int(fields[0])
            fds, sizes = fetch_fds(region_index)
            mapping = driver.map_vmm(fds, [int(s) for s in sizes], [device])
            self._closers.setdefault(peer_uid, []).append(mapping.close)
            base = mapping.va + offset
        else:
            raise BackendError(f"cuda_ipc: unknown sharing mode {mode!r} for peer region {region_index}")
        self._bases[slot] = base
        return base

    def close_peer(self, peer_uid: str) -> None:
        """Unmap everything imported from ``peer_uid``."""
        for close in self._closers.pop(peer_uid, []):
            try:
                close()
            except BackendError as error:  # a peer that died may leave handles the driver already dropped
                logger.debug("cuda_ipc: unmapping a region of peer %s failed: %s", peer_uid, error)
        self._bases = {k: v for k, v in self._bases.items() if k[0] != peer_uid}
        self._legacy = {k: v for k, v in self._legacy.items() if k[0] != peer_uid}


def _close_legacy(device: int, pointer: int) -> None:
    driver.use_device(device)
    driver.close_legacy(pointer)
