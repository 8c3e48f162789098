"""Interprocess CUDA events: how a notification can leave before its data lands and still be seen only after.

The sender records an interprocess event behind the copy and sends the notification with the event's handle at
once (while the copy runs). The receiver's mailbox thread opens the handle (cached), waits for the event, then
delivers. Off the critical path: the sender noticing completion and a socket round through the kernel; left on
it: one event query and one thread wake-up on the receiving side.

Events come from a ring per device (``RING`` events, reused round-robin). Re-recording an event that a receiver
still waits on only makes that receiver wait for the later copy, which follows the earlier one on the same stream.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ...devices import cupy_module
from ...errors import BackendError
from .driver import check, cu, use_device

logger = logging.getLogger("kvxfer")

RING = 64
_YIELD_FOR = 0.002  # seconds of yielding between queries before napping
_NAP = 0.0001
_LIVENESS_EVERY = 0.001


class EventRing:
    """Interprocess events of one device, handed out round-robin with their handles."""

    def __init__(self, device: int) -> None:
        cupy = cupy_module()
        self.events: list[Any] = []
        self.handles: list[bytes] = []
        with cupy.cuda.Device(device):
            for _ in range(RING):
                event = cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)
                self.events.append(event)
                self.handles.append(bytes(cupy.cuda.runtime.ipcGetEventHandle(event.ptr)))
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> tuple[Any, bytes]:
        """The next (cupy Event, handle bytes)."""
        with self._lock:
            index = self._next
            self._next = (index + 1) % RING
        return self.events[index], self.handles[index]


class OpenedEvents:
    """Peers' events opened in this process, by handle; queried on the mailbox threads."""

    def __init__(self, device: Callable[[], int]) -> None:
        self._device = device
        self._events: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._ready_threads: set[int] = set()

    def wait(self, handle: bytes, alive: Callable[[], bool], timeout: float) -> bool | None:
        """Wait until the event behind ``handle`` completes: True; False if ``alive()`` turned False (the sender
        died: its copy will never complete); None if the event reports an error or ``timeout`` passed (the caller
        then waits for the sender's completion message). Raises if the handle cannot be opened."""
        driver = cu()
        event = self._open(handle)
        started = time.monotonic()
        give_up = started + timeout
        next_check = started + _LIVENESS_EVERY
        not_ready = driver.CUresult.CUDA_ERROR_NOT_READY
        while True:
            (status,) = driver.cuEventQuery(event)
            if status == driver.CUresult.CUDA_SUCCESS:
                return True
            if status != not_ready:
                return None
            now = time.monotonic()
            if now >= next_check:
                if not alive():
                    return False
                if now > give_up:
                    return None
                next_check = now + _LIVENESS_EVERY
            if now - started < _YIELD_FOR:
                os.sched_yield()
            else:
                time.sleep(_NAP)

    def _open(self, handle: bytes) -> int:
        thread = threading.get_ident()
        if thread not in self._ready_threads:
            use_device(self._device())  # a CUDA context current on this mailbox thread
            self._ready_threads.add(thread)
        with self._lock:
            event = self._events.get(handle)
            if event is None:
                event = self._events[handle] = int(cupy_module().cuda.runtime.ipcOpenEventHandle(handle))
            return event

    def close(self) -> None:
        """Destroy the opened events."""
        with self._lock:
            events, self._events = list(self._events.values()), {}
        for event in events:
            try:
                check(cu().cuEventDestroy(event), "cuEventDestroy")
            except BackendError as error:  # closing: nothing more to do about one that cannot be destroyed
                logger.debug("cuda_ipc: an opened event could not be destroyed: %s", error)
