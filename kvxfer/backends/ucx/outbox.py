"""Work the UCX backend runs outside its worker lock: agent callbacks (notifications, peer-lost reports) may call
back into the backend, so they are queued under the lock and run once it is released."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

_log = logging.getLogger("kvxfer.ucx")


class Outbox:
    """A queue of callables; any thread posts, any thread (outside the worker lock) flushes."""

    def __init__(self) -> None:
        self._work: deque[Callable[[], None]] = deque()

    def __bool__(self) -> bool:
        return bool(self._work)

    def post(self, work: Callable[[], None]) -> None:
        """Run ``work`` outside the worker lock, soon."""
        self._work.append(work)

    def flush(self) -> None:
        """Run the queued work (any thread, outside the worker lock); a failing callable is logged, the rest run."""
        while self._work:
            try:
                work = self._work.popleft()
            except IndexError:
                return
            try:
                work()
            except Exception as error:  # noqa: BLE001 an agent callback failing must not stop progress; logged
                _log.exception("ucx: callback failed: %s", error)
