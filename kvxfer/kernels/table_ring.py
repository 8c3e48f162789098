"""Per-call kernel tables to the GPU: one async copy from a reused pinned buffer into a reused device buffer.

Imported with kernels/_cuda.py only (needs cupy at call time). A plan planned per request (a KV pipe's pull) has a
new table every call; a pageable ``ndarray.set`` plus a pool allocation per call costs tens of microseconds of host
time, a copy from pinned memory a few. A slot (pinned host buffer, device buffer, event) is reused once the event
recorded after its launch has completed; while every slot is in flight (more than :data:`MAX_SLOTS` launches
queued), calls fall back to a pool allocation ordered on the launch stream, as before.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from ..devices import Stream
from .launch import LaunchShape

#: Slots per device: launches whose tables may be in flight at once before calls fall back to the pool.
MAX_SLOTS = 16
#: Smallest slot, in table entries (int64): 8 KiB holds a 4k-token, 16-token-block request's table.
_MIN_ENTRIES = 1024


class _Slot:
    """``capacity`` int64 entries of pinned host memory (``host``, a view) and of device memory, and the event
    recorded after the last launch that read them."""

    __slots__ = ("capacity", "device", "device_arg", "event", "host", "host_ptr", "pinned", "uses")

    def __init__(self, cupy: ModuleType, capacity: int) -> None:
        self.capacity = capacity
        self.pinned = cupy.cuda.alloc_pinned_memory(capacity * 8)
        self.host = np.frombuffer(self.pinned, dtype=np.int64, count=capacity)
        self.host_ptr = int(self.pinned.ptr)
        self.device = cupy.cuda.alloc(capacity * 8)  # kept alive by the slot; passed to kernels as a pointer
        self.device_arg = np.uint64(self.device.ptr)
        self.event = cupy.cuda.Event(block=False, disable_timing=True)
        self.uses = 0  # launches that read the slot; a completion holds the count of its own launch


class Completion:
    """When one launch is done, from an event of its own (cupy Event): ``done``, ``synchronize()``."""

    __slots__ = ("event",)

    def __init__(self, event: Any) -> None:
        self.event = event

    @property
    def done(self) -> bool:
        """True once the work queued before the event has finished (never blocks)."""
        return bool(self.event.done)

    def synchronize(self) -> None:
        """Block until it is done."""
        self.event.synchronize()


class SlotCompletion(Completion):
    """When one launch that read ``slot`` is done, from the slot's reused event: done once the event fired, or once
    the slot was taken again (which needs the event to have fired after this launch first)."""

    __slots__ = ("slot", "use")

    def __init__(self, slot: _Slot, use: int) -> None:
        super().__init__(slot.event)
        self.slot, self.use = slot, use

    @property
    def done(self) -> bool:
        return self.slot.uses != self.use or bool(self.event.done)

    def synchronize(self) -> None:
        if self.slot.uses == self.use:  # taken again meanwhile: the event may wait for later work, and need not
            self.event.synchronize()


class TableRing:
    """The table slots of one device. Thread-safe: a slot is taken, filled, launched and marked under one lock."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.slots: list[_Slot] = []
        self.fallbacks = 0  # calls that found every slot in flight (for tests and benchmarks)
        self._next = 0
        self._lock = threading.Lock()

    def launch(
        self,
        cupy: ModuleType,
        function: Any,
        shape: LaunchShape,
        pointers: tuple[Any, Any],
        table: np.ndarray,
        stream: Stream,
        stream_context: Callable[[], Any],
    ) -> None:
        """Upload ``table`` (int64[n], host) and launch ``function`` with it on ``stream`` (anything with ``.ptr``).

        ``pointers``: the (src, dst) kernel arguments; ``stream_context()``: ``stream`` as a cupy stream to enter,
        so that memory drawn from cupy's pool is ordered after that stream's earlier work.
        """
        grid, block = (shape.num_ctas,), (shape.threads,)

        def fill(host: np.ndarray) -> None:
            host[: table.size] = table

        def run(device_table: Any) -> None:
            function(grid, block, (*pointers, device_table, *shape.scalars), stream=stream)

        self.launch_with(cupy, table.size, fill, run, stream, stream_context)

    def launch_with(
        self,
        cupy: ModuleType,
        entries: int,
        fill: Callable[[np.ndarray], object],
        run: Callable[[Any], None],
        stream: Stream,
        stream_context: Callable[[], Any],
        completion: bool = False,
    ) -> Completion | None:
        """Upload ``entries`` int64 that ``fill(host)`` writes into ``host`` (int64[>= entries], pinned when a
        slot is free), then ``run(device_table)`` (a pointer as np.uint64, or a cupy array) on ``stream``.

        With ``completion``, returns what says when the launch is done (``done``, ``synchronize()``): the slot's
        own event (no event is created per call), or a new event when every slot is in flight.
        """
        with self._lock:
            slot = self._take(cupy, entries, stream_context)
            if slot is None:
                self.fallbacks += 1
                host = np.empty(entries, dtype=np.int64)
                fill(host)
                with stream_context() as pool_stream:
                    device_table = cupy.empty((entries,), dtype=cupy.int64)
                    device_table.set(host, stream=pool_stream)
                run(device_table)
                if not completion:
                    return None
                event = cupy.cuda.Event(block=False, disable_timing=True)
                event.record(stream)
                return Completion(event)
            fill(slot.host)
            slot.uses += 1
            try:
                cupy.cuda.runtime.memcpyAsync(
                    int(slot.device_arg), slot.host_ptr, entries * 8, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr
                )
                run(slot.device_arg)
            finally:  # whatever was queued reads the slot until this event
                slot.event.record(stream)
            return SlotCompletion(slot, slot.uses) if completion else None

    def _take(self, cupy: ModuleType, entries: int, stream_context: Callable[[], Any]) -> _Slot | None:
        """A slot whose last launch completed, holding ``entries`` at least; None if every slot is in flight."""
        count = len(self.slots)
        for step in range(count):
            index = (self._next + step) % count
            slot = self.slots[index]
            if slot.event.done:
                self._next = (index + 1) % count
                if slot.capacity < entries:
                    slot = self.slots[index] = self._new_slot(cupy, max(entries, 2 * slot.capacity), stream_context)
                return slot
        if count >= MAX_SLOTS:
            return None
        slot = self._new_slot(cupy, max(entries, _MIN_ENTRIES), stream_context)
        self.slots.append(slot)
        return slot

    @staticmethod
    def _new_slot(cupy: ModuleType, capacity: int, stream_context: Callable[[], Any]) -> _Slot:
        with stream_context():  # the pool hands out memory in this stream's order
            return _Slot(cupy, capacity)


@functools.cache
def table_ring(device: int) -> TableRing:
    """The ring of ``device`` (one per process and device)."""
    return TableRing(device)
