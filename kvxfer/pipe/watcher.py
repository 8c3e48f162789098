"""The pipe's watcher: a thread that polls requests nobody waits for, so they finish (and notify their peers)."""

from __future__ import annotations

import logging
import threading
import time
import weakref

from .handle import PipeHandle

logger = logging.getLogger("kvxfer")


class Watcher:
    """Polls the handles it watches (weakly: a dropped handle is forgotten) until :meth:`close`; started on
    the first :meth:`watch`."""

    def __init__(self) -> None:
        self._watched: weakref.WeakSet[PipeHandle] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def watch(self, handle: PipeHandle) -> None:
        """Poll ``handle`` in the background so it finishes even if nobody waits."""
        self._watched.add(handle)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvxfer-pipe-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            busy = False
            for handle in list(self._watched):
                try:
                    busy |= not handle.released and not handle.poll().final
                except Exception as error:  # noqa: BLE001 the owner sees it when it polls; the thread goes on
                    logger.debug("pipe watcher: dropped a handle whose poll raised %r", error)
                    self._watched.discard(handle)
            time.sleep(50e-6 if busy else 1e-3)

    def close(self) -> None:
        """Stop the thread (within one polling round)."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
