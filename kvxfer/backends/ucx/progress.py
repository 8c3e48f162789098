"""The UCX backend's progress thread: drives the worker when no caller does, and sleeps when nothing happens.

Each round takes the worker lock, progresses the worker, advances transfers in flight, and arms the worker's
wakeup fd once no event is pending. Then, outside the lock, it runs the outbox (notifications for the agent,
peer-lost reports) and sleeps in ``poll`` on: the worker's efd (network or shared-memory events), our own
eventfd (a caller asks for a round, e.g. a copy thread finished), and the pidfd of every same-host peer (readable
the moment that process exits).
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backend import UcxBackend
    from .link import Link

_log = logging.getLogger("kvxfer.ucx")


class ProgressThread:
    """One daemon thread per backend; :meth:`wake` asks it for a round; :meth:`stop` ends it."""

    def __init__(self, backend: UcxBackend, name: str) -> None:
        self._backend = backend
        self._stopping = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def wake(self) -> None:
        """Make the thread run a round soon (any thread may call this)."""
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass  # closed during shutdown, or the counter is saturated: a round is coming either way

    def stop(self, timeout: float) -> None:
        """End the thread (waits up to ``timeout`` seconds for its current round)."""
        self._stopping = True
        self.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            _log.warning("ucx: progress thread did not stop within %.1f s", timeout)
            return
        os.close(self._wake_fd)

    def _run(self) -> None:
        backend = self._backend
        poller = select.poll()
        poller.register(backend.worker.efd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        watched: dict[int, Link] = {}
        self._device: int | None = None
        while not self._stopping:
            try:
                sleep = backend.progress_round()
            except Exception as error:  # noqa: BLE001 the thread must not die: transfers would hang until their deadlines
                _log.exception("ucx: progress round failed: %s", error)
                sleep = 0.01
            backend.flush_outbox()
            if self._stopping or sleep is None:
                continue
            watched = self._sync_watches(poller, watched)
            self._follow_device()
            for fd, _events in poller.poll(max(1, int(sleep * 1000))):
                if fd == self._wake_fd:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                elif fd in watched:
                    poller.unregister(fd)
                    backend.process_exited(watched.pop(fd))

    def _follow_device(self) -> None:
        """UCX's CUDA transports act on the calling thread's current device: make it the registered one's."""
        device = self._backend.cuda_device
        if device is None or device == self._device:
            return
        self._device = device
        try:
            from ...devices import cupy_module

            cupy_module().cuda.runtime.setDevice(device)
        except Exception as error:  # noqa: BLE001 no cupy or a CUDA error: UCX falls back to the primary context; logged
            _log.warning("ucx: progress thread could not select CUDA device %d: %s", device, error)

    def _sync_watches(self, poller: select.poll, watched: dict[int, Link]) -> dict[int, Link]:
        current = self._backend.links.watched_processes()
        for fd in set(watched) - set(current):
            try:
                poller.unregister(fd)
            except KeyError:
                pass
        for fd in set(current) - set(watched):
            poller.register(fd, select.POLLIN)
        return current
