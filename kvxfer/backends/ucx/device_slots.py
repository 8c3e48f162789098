"""GPU staging slots for staged transfers of CUDA memory over UCX, and the kernels that fill and empty them.

Small device fragments cost UCX one put/get each (cuda_ipc / cuda_copy: tens of µs per operation, ~1 GB/s at
4 KiB). Staged instead, a chunk of fragments is gathered by one kernel launch into a registered slot, crosses with
one get or put, and is scattered by one launch at the other end (kvxfer.kernels.batch_copy).

Each backend keeps two pools, allocated on first use: one for the chunks it asks for, one for the chunks it serves;
kept apart, neither side can hold every slot while waiting on the other. A slot whose chunk was abandoned (cancel,
peer loss) is never reused: the peer may still read or write it. Such slots are written off and the pool grows by
one block at most ``MAX_BLOCKS - 1`` times; past that, a pool with no free slot makes staged transfers wait.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from ...devices import cupy_module
from ...kernels import batch_copy
from .exports import spans_outside

if TYPE_CHECKING:
    from .binding import Context, MemoryHandle

MAX_BLOCKS = 4


class SlotRole(Enum):
    """Whose chunks a slot pool holds."""

    ASK = "ask"  # chunks this backend requests
    SERVE = "serve"  # chunks peers request from it


def check_device_spans(
    addr: np.ndarray, nbytes: np.ndarray, region: np.ndarray, regions: dict[int, tuple[int, int, int]]
) -> int:
    """The device of spans that all lie, non-empty, in CUDA regions of ``regions`` (index -> (addr, nbytes,
    device)) on one device; ValueError saying why not."""
    if not len(addr):
        raise ValueError("a staged chunk without descriptors")
    devices = set()
    for index in np.unique(region).tolist():
        if index not in regions:
            raise ValueError(f"region {index} is not a registered CUDA region")
        base, size, device = regions[index]
        mask = region == index
        start, length = addr[mask], nbytes[mask]
        if spans_outside(start.astype(np.uint64), length.astype(np.uint64), base, size):
            raise ValueError(f"a span lies outside region {index} ([{base:#x}, +{size}))")
        devices.add(device)
    if len(devices) != 1:
        raise ValueError(f"a staged chunk spans regions on devices {sorted(devices)}")
    return devices.pop()


def _packed(slot: int, nbytes: np.ndarray) -> np.ndarray:
    """Where each span lands when the spans are packed back to back from ``slot``."""
    packed: np.ndarray = np.uint64(slot) + np.cumsum(nbytes, dtype=np.uint64) - nbytes.astype(np.uint64)
    return packed


class _Block:
    """One registered device allocation cut into slots."""

    def __init__(self, context: Context, device: int, slot_nbytes: int, count: int) -> None:
        cupy = cupy_module()
        with cupy.cuda.Device(device):
            self.memory = cupy.empty(slot_nbytes * count, dtype=cupy.uint8)
        self.base = int(self.memory.data.ptr)
        self.memh: MemoryHandle = context.map(self.base, slot_nbytes * count, True)
        self.slots = [self.base + i * slot_nbytes for i in range(count)]


class DeviceSlots:
    """Fixed-size registered GPU buffers on one device. Used under the worker lock only."""

    def __init__(self, context: Context, device: int, slot_nbytes: int, count: int) -> None:
        self.context, self.device, self.slot_nbytes, self.count = context, device, slot_nbytes, count
        self._blocks: list[_Block] = []
        self._free: list[int] = []
        self._owner: dict[int, _Block] = {}
        self.written_off = 0
        cupy = cupy_module()
        with cupy.cuda.Device(device):
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self._grow()

    def _grow(self) -> None:
        block = _Block(self.context, self.device, self.slot_nbytes, self.count)
        self._blocks.append(block)
        self._free.extend(block.slots)
        self._owner.update(dict.fromkeys(block.slots, block))

    def take(self) -> int | None:
        """A free slot's device address, or None if none is free now."""
        if not self._free and self.written_off >= self.count and len(self._blocks) < MAX_BLOCKS:
            self.written_off -= self.count
            self._grow()
        return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        """Return a slot nobody (here or at a peer) touches any more."""
        self._free.append(slot)

    def write_off(self, _slot: int) -> None:
        """Forget a slot a peer may still touch (its chunk was abandoned)."""
        self.written_off += 1

    def recover(self, slot: int) -> None:
        """A written-off slot's late answer came: the peer is done with it."""
        self.written_off = max(0, self.written_off - 1)
        self.give(slot)

    def memh(self, slot: int) -> Any:
        """The ucp_mem_h covering ``slot``."""
        return self._owner[slot].memh.handle

    def packed_rkey(self, slot: int) -> bytes:
        """The packed remote key a peer needs to reach ``slot``."""
        return self._owner[slot].memh.packed_rkey

    def gather(self, slot: int, addr: np.ndarray, nbytes: np.ndarray) -> None:
        """Copy the device spans, in order, into ``slot``; returns once the copy is done."""
        self._copy(addr, _packed(slot, nbytes), nbytes)

    def scatter(self, slot: int, addr: np.ndarray, nbytes: np.ndarray) -> None:
        """Copy ``slot``'s packed bytes out to the device spans, in order; returns once the copy is done."""
        self._copy(_packed(slot, nbytes), addr, nbytes)

    def _copy(self, sources: np.ndarray, destinations: np.ndarray, nbytes: np.ndarray) -> None:
        table = batch_copy.split_pieces(sources, destinations, nbytes)
        cupy = cupy_module()
        with cupy.cuda.Device(self.device), self.stream:
            batch_copy.launch(batch_copy.to_device(table, self.device), self.device, self.stream)
            self.stream.synchronize()

    def close(self) -> None:
        """Unregister and free every block (after the worker stopped using them)."""
        for block in self._blocks:
            block.memh.close()
        self._blocks, self._free, self._owner = [], [], {}


class SlotPools:
    """A backend's GPU slot pools by (role, device), each allocated and registered on first use. Used under the
    worker lock only."""

    def __init__(self, context: Context, slot_nbytes: int, count: int) -> None:
        self._context = context
        self.slot_nbytes, self.count = slot_nbytes, count
        self._pools: dict[tuple[SlotRole, int], DeviceSlots] = {}

    def get(self, role: SlotRole, device: int) -> DeviceSlots:
        """The pool for ``role`` on ``device``."""
        pool = self._pools.get((role, device))
        if pool is None:
            pool = self._pools[(role, device)] = DeviceSlots(self._context, device, self.slot_nbytes, self.count)
        return pool

    def close(self) -> None:
        """Unregister and free every pool (after the worker stopped using them)."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
