"""What a target exports now, readable by same-host peers: the bounds check of one-sided host paths.

Over software transports nothing below us bounds a one-sided write: a cross-memory call (``process_vm_writev``)
reaches any address of a process of the same uid, and UCX's puts over shared memory (cma) or tcp (software RMA)
write where the initiator says; only RDMA rkeys are checked by hardware. A peer's metadata, stale or forged, is
therefore no authority on where we may write. The target keeps a small table of its registered regions
(:class:`ExportTable`, in its own memory, at an address published in its UCX info), and an initiator that would
write or read one-sidedly first reads that table through a cross-memory call (the probe already proved it may)
and checks every remote span against it (:class:`ExportView`). Only then does a one-sided path run.

This binds kvxfer initiators, whatever their metadata says. It cannot bind a hostile program of the same uid,
which may ``ptrace`` the target anyway: that is the trust boundary of one-sided paths on one host (docs/security
.md). A target that does not accept it sets ``KVXFER_UCX_ONE_SIDED=off``: peers then move host memory only through
staged messages, which the target checks span by span before touching memory (responder.py).

Table layout (uint64 words): ``[generation, count, (index, addr, nbytes) * count]``, a seqlock: the generation is
odd while an update is under way; a reader re-reads it after the entries and retries on a change.
"""

from __future__ import annotations

import numpy as np

from ...errors import DescriptorError
from .cma import Batch, CrossMemory

MAX_EXPORTS = 4096
_HEAD = 2
_OVERFLOW = np.uint64(2**64 - 1)  # count when more regions are registered than the table holds
_READ_TRIES = 4


def spans_outside(start: np.ndarray, length: np.ndarray, base: int, size: int) -> bool:
    """True unless every ``[start[i], start[i] + length[i])`` (uint64 arrays, non-empty) is a non-empty span inside
    ``[base, base + size)``; no uint64 wrap-around can make a span look inside."""
    if int(length.min()) == 0 or int(length.max()) > size or int(start.min()) < base:
        return True
    offset = start - np.uint64(base)  # no wrap: start >= base
    return bool((offset > np.uint64(size) - length).any())  # no wrap: length <= size


class ExportTable:
    """The target's table (updated under the worker lock)."""

    def __init__(self) -> None:
        self.words = np.zeros(_HEAD + 3 * MAX_EXPORTS, dtype=np.uint64)
        self._entries: dict[int, tuple[int, int]] = {}

    @property
    def address(self) -> int:
        """Where the table lives in this process (published in the UCX info)."""
        return int(self.words.ctypes.data)

    def add(self, index: int, addr: int, nbytes: int) -> None:
        """Export region ``index`` = ``[addr, addr + nbytes)``."""
        self._entries[index] = (addr, nbytes)
        self._publish()

    def remove(self, index: int) -> None:
        """Stop exporting region ``index``."""
        if self._entries.pop(index, None) is not None:
            self._publish()

    def _publish(self) -> None:
        words = self.words
        words[0] += np.uint64(1)  # odd: readers retry
        if len(self._entries) > MAX_EXPORTS:
            words[1] = _OVERFLOW
        else:
            rows = np.array([(i, a, n) for i, (a, n) in sorted(self._entries.items())], dtype=np.uint64)
            words[_HEAD : _HEAD + rows.size] = rows.reshape(-1)
            words[1] = np.uint64(len(self._entries))
        words[0] += np.uint64(1)


class ExportView:
    """An initiator's checker of one peer's table, read through cross-memory calls."""

    def __init__(self, cma: CrossMemory, pid: int, address: int, peer: str) -> None:
        self._cma, self._pid, self._address, self._peer = cma, pid, address, peer
        self._buffer = np.zeros(_HEAD + 3 * 16, dtype=np.uint64)  # grown to the peer's table as needed
        self._generation = -1
        self._regions: dict[int, tuple[int, int]] = {}
        self.reads = 0  # table reads (tests, benchmarks)

    def _read(self, words: int) -> None:
        if words > self._buffer.size:
            self._buffer = np.zeros(words, dtype=np.uint64)
        nbytes = 8 * words
        local = self._buffer[:words]
        batch = Batch.span(local.ctypes.data, self._address, nbytes)
        self._cma.run(self._pid, False, batch)
        self.reads += 1

    def generation(self) -> int:
        """The peer's table generation now (even), reading the full table if it changed since the last check."""
        for _ in range(_READ_TRIES):
            self._read(_HEAD)
            generation, count = int(self._buffer[0]), int(self._buffer[1])
            if generation & 1:
                continue
            if generation == self._generation:
                return generation
            if count == int(_OVERFLOW) or count > MAX_EXPORTS:
                raise DescriptorError(
                    f"peer {self._peer!r} exports more regions than its table holds: one-sided transfers are refused"
                )
            self._read(_HEAD + 3 * count)
            if int(self._buffer[0]) != generation or int(self._buffer[1]) != count:
                continue
            rows = self._buffer[_HEAD : _HEAD + 3 * count].reshape(-1, 3)
            self._regions = {int(i): (int(a), int(n)) for i, a, n in rows.tolist()}
            self._generation = generation
            return generation
        raise DescriptorError(f"peer {self._peer!r}'s export table kept changing: try again")

    def check(self, addr: np.ndarray, nbytes: np.ndarray, region: np.ndarray) -> int:
        """Raise DescriptorError unless every span ``[addr[i], addr[i] + nbytes[i])`` (uint64, uint64, int32) lies
        in the region the peer exports now as ``region[i]``; returns the generation checked against. CmaError
        (e.g. ESRCH) if the table cannot be read."""
        generation = self.generation()
        for index in np.unique(region).tolist():
            bounds = self._regions.get(int(index))
            if bounds is None:
                raise DescriptorError(f"peer {self._peer!r} does not export region {index} (any more)")
            base, size = bounds
            mask = region == index
            start, length = addr[mask], nbytes[mask]
            if spans_outside(start, length, base, size):
                raise DescriptorError(
                    f"a span lies outside what peer {self._peer!r} exports as region {index} "
                    f"([{base:#x}, +{size})): its metadata is stale or forged"
                )
        return generation
