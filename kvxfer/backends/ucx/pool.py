"""Reused host buffers for staged chunks and rendezvous receives: fresh multi-MiB allocations would pay a page
fault per 4 KiB on first touch (and defeat UCX's registration cache); these buffers stay mapped."""

from __future__ import annotations

import numpy as np


class BufferPool:
    """uint8 host buffers of at least ``chunk_nbytes``; at most ``keep`` idle ones are kept. Used under the worker
    lock only."""

    def __init__(self, chunk_nbytes: int, keep: int) -> None:
        self._chunk_nbytes, self._keep = chunk_nbytes, keep
        self._free: list[np.ndarray] = []

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of exactly ``nbytes`` bytes (a view of a pooled one when one is large enough)."""
        for i, buffer in enumerate(self._free):
            if buffer.size >= nbytes:
                return self._free.pop(i)[:nbytes]
        if nbytes > 4 * self._chunk_nbytes:
            return np.empty(nbytes, dtype=np.uint8)  # unusually large: not worth keeping
        return np.empty(max(nbytes, self._chunk_nbytes), dtype=np.uint8)[:nbytes]

    def give(self, buffer: np.ndarray) -> None:
        """Return a buffer from :meth:`take` once nothing uses it any more."""
        base = buffer.base if isinstance(buffer.base, np.ndarray) else buffer
        if len(self._free) < self._keep and base.size <= 4 * self._chunk_nbytes:
            self._free.append(base)
