"""The UCX backend's progress thread: drives the worker when no caller does, and sleeps when nothing happens.

Each round takes the worker lock, progresses the worker and the device server, advances transfers in flight, polls
same-host peers without a pidfd, reaps closing endpoints, and arms the worker's wakeup fd once no event is pending.
Then, outside the lock, it runs the outbox (notifications for the agent, peer-lost reports) and sleeps in ``poll``
on: the worker's efd (network or shared-memory events), the waker's eventfd (a caller asks for a round, e.g. a copy
thread finished), and the pidfd of every same-host peer (readable the moment that process exits).
"""

from __future__ import annotations

import logging
import select
import threading
import time

from .link import Link
from .services import Services

_log = logging.getLogger("kvxfer.ucx")


class ProgressThread:
    """One daemon thread per backend; ``services.wake()`` asks it for a round; :meth:`stop` ends it."""

    def __init__(self, services: Services, name: str) -> None:
        self._services = services
        self._stopping = False
        self._last_liveness = self._quiet_since = 0.0
        self._device: int | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """End the thread (waits up to ``timeout`` seconds for its current round); then close the waker."""
        self._stopping = True
        self._services.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            _log.warning("ucx: progress thread did not stop within %.1f s", timeout)
            return
        self._services.waker.close()

    def run_round(self) -> float | None:
        """One round (see the module docstring); how long the thread may then sleep (s), None: go on at once."""
        services = self._services
        device_server = services.device_server
        worker, config = services.worker, services.config
        with worker.lock:
            if services.closed:
                return config.liveness_interval
            events = worker.progress() + device_server.poll()
            for request in list(services.ledger.active.values()):
                request.advance()
            now = time.monotonic()
            if now - self._last_liveness > config.liveness_interval:
                self._last_liveness = now
                services.links.check_processes()
            services.links.reap()
            if events or services.outbox or not worker.arm():
                self._quiet_since = now
                return None
            # rendezvous receives progress without events: spin a while, then nap
            if worker.receiving or device_server.busy:
                return None if now - self._quiet_since < 0.002 else 0.001
            return 0.005 if services.ledger.active or worker.busy else config.liveness_interval

    def _run(self) -> None:
        services = self._services
        wake_fd = services.waker.fd
        poller = select.poll()
        poller.register(services.worker.efd, select.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        watched: dict[int, Link] = {}
        while not self._stopping:
            try:
                sleep = self.run_round()
            except Exception as error:  # noqa: BLE001 the thread must not die: transfers would hang until their deadlines
                _log.exception("ucx: progress round failed: %s", error)
                sleep = 0.01
            services.outbox.flush()
            if self._stopping or sleep is None:
                continue
            watched = self._sync_watches(poller, watched)
            self._follow_device()
            for fd, _events in poller.poll(max(1, int(sleep * 1000))):
                if fd == wake_fd:
                    services.waker.drain()
                elif fd in watched:
                    poller.unregister(fd)
                    services.links.process_exited(watched.pop(fd))

    def _follow_device(self) -> None:
        """UCX's CUDA transports act on the calling thread's current device: make it the registered one's."""
        device = self._services.regions.cuda_device
        if device is None or device == self._device:
            return
        self._device = device
        try:
            from ...devices import cupy_module

            cupy_module().cuda.runtime.setDevice(device)
        except Exception as error:  # noqa: BLE001 no cupy or a CUDA error: UCX falls back to the primary context; logged
            _log.warning("ucx: progress thread could not select CUDA device %d: %s", device, error)

    def _sync_watches(self, poller: select.poll, watched: dict[int, Link]) -> dict[int, Link]:
        current = self._services.links.watched_processes()
        for fd in set(watched) - set(current):
            try:
                poller.unregister(fd)
            except KeyError:
                pass
        for fd in set(current) - set(watched):
            poller.register(fd, select.POLLIN)
        return current
