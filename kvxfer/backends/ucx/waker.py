"""The UCX progress thread's doorbell: an eventfd any thread rings to ask for a progress round."""

from __future__ import annotations

import os


class Waker:
    """An eventfd: :meth:`wake` from any thread; the progress thread polls :attr:`fd` and :meth:`drain`\\ s it."""

    def __init__(self) -> None:
        self.fd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def wake(self) -> None:
        """Ask for a round soon."""
        fd = self.fd
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            pass  # closed during shutdown, or the counter is saturated: a round is coming either way

    def drain(self) -> None:
        """Reset the counter (the progress thread, after a wake-up)."""
        if self.fd is None:
            return
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close the eventfd (once no thread polls it; idempotent)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
