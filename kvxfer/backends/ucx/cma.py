"""Cross-memory attach: same-host host-memory transfers as batched ``process_vm_readv``/``process_vm_writev``.

UCX's cma transport issues one system call per put (~3 µs for 4 KiB: 1.3 GB/s). One call takes up to 1024 iovecs
on each side, and the two sides are independent lists that only need equal byte totals, so we sort the fragments
by remote address and merge spans that are adjacent on either side: the kernel pins remote pages per remote
iovec, which is the expensive part. The peer is not involved (one-sided, like RDMA), and a dead peer fails the
call at once with ESRCH.

Who copies (measured, docs/backends.md): on a 2-core host, handing a batch to another thread costs 50-150 µs
(wake-up, GIL) and two threads copying at once gain nothing below ~16 MiB (memory bandwidth), so the posting
thread copies a transfer of up to ``inline`` bytes (``KVXFER_UCX_CMA_INLINE``, 8 MiB) itself. A larger one is cut
into batches of at most ``BATCH_BYTES`` that the posting thread (up to ``inline`` bytes), the copy threads and any
thread waiting for the transfer take from one queue (:class:`CmaJob`); the thread that finishes the last batch
completes the transfer.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .binding import UcxLibrary, VmCall

if TYPE_CHECKING:
    from ...plan import TransferPlan

MAX_IOV = 1024  # IOV_MAX: the kernel's limit per side and call
INLINE_BYTES = 8 << 20  # default: transfers up to this are copied by the posting thread, as few calls as possible
BATCH_BYTES = 4 << 20  # above it, bound on one call: the unit of sharing between threads, of cancel(), deadlines


@dataclass
class Batch:
    """One system call's worth: ``local``/``remote`` are uint64[k, 2] iovec arrays (base, length), host."""

    local: np.ndarray
    remote: np.ndarray
    nbytes: int
    call: VmCall | None = field(default=None, repr=False, compare=False)  # the C arguments, made on first use

    @classmethod
    def span(cls, local_addr: int, remote_addr: int, nbytes: int) -> Batch:
        """One call moving one contiguous span."""
        size = np.array([nbytes], np.uint64)
        return cls(
            _merged(np.array([local_addr], np.uint64), size), _merged(np.array([remote_addr], np.uint64), size), nbytes
        )


def copy_threads(cpus: int | None = None) -> int:
    """Default number of copy threads: the posting or waiting thread copies too, so one core fewer (1 to 2)."""
    cpus = (
        cpus
        if cpus is not None
        else len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1
    )
    return max(1, min(2, cpus - 1))


class CmaError(OSError):
    """A cross-memory call failed; ``errno`` says why (ESRCH: the peer process is gone)."""


def plan_batches(
    local_addr: np.ndarray,
    remote_addr: np.ndarray,
    nbytes: np.ndarray,
    batch_bytes: int = BATCH_BYTES,
    inline: int = INLINE_BYTES,
) -> list[Batch]:
    """Cut fragment pairs (uint64[n] each, host) into calls; see the module docstring for the ordering.

    A total up to ``inline`` bytes is one call (as far as the iovec limit allows); above, calls of at most
    ``batch_bytes`` and at least two, fragments split where they exceed a call."""
    total = int(nbytes.sum())
    limit = total if total <= inline else max(1, min(batch_bytes, -(-total // 2)))
    if len(nbytes) == 1 and total <= limit:
        return [Batch(_merged(local_addr, nbytes), _merged(remote_addr, nbytes), total)]
    order = np.argsort(remote_addr, kind="stable")
    local, remote, sizes = _split(local_addr[order], remote_addr[order], nbytes[order], limit)
    ends = np.cumsum(sizes, dtype=np.uint64)
    batches = []
    start, n = 0, len(sizes)
    while start < n:
        before = int(ends[start - 1]) if start else 0
        by_bytes = int(np.searchsorted(ends, before + limit, side="right"))
        stop = max(start + 1, min(start + MAX_IOV, by_bytes))
        batches.append(
            Batch(
                _merged(local[start:stop], sizes[start:stop]),
                _merged(remote[start:stop], sizes[start:stop]),
                int(ends[stop - 1]) - before,
            )
        )
        start = stop
    return batches


def _split(
    local: np.ndarray, remote: np.ndarray, sizes: np.ndarray, piece: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fragments longer than ``piece`` bytes cut into pieces of ``piece`` (the last one shorter), in order."""
    if not (sizes > piece).any():
        return local, remote, sizes
    counts = (sizes + np.uint64(piece - 1)) // np.uint64(piece)
    owner = np.repeat(np.arange(len(sizes)), counts.astype(np.int64))
    first = np.cumsum(counts) - counts  # index of each fragment's first piece
    skip = (np.arange(len(owner), dtype=np.uint64) - first[owner].astype(np.uint64)) * np.uint64(piece)
    return local[owner] + skip, remote[owner] + skip, np.minimum(sizes[owner] - skip, np.uint64(piece))


def _merged(addr: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """iovecs of spans, neighbours that touch joined into one."""
    if len(addr) > 1:
        touching = addr[1:] == addr[:-1] + sizes[:-1]
        if touching.any():
            starts = np.flatnonzero(np.concatenate(([True], ~touching)))
            addr, sizes = addr[starts], np.add.reduceat(sizes, starts)
    iov = np.empty((len(addr), 2), dtype=np.uint64)
    iov[:, 0] = addr
    iov[:, 1] = sizes
    return iov


class CmaJob:
    """The batches of one transfer as a queue any thread may take from (:meth:`take`, then :meth:`batch_done`).

    ``on_done(job)`` runs once, on the thread that finishes the last batch (or the one that fails), with no lock
    held; not after :meth:`stop` when nothing was running (whoever stops also ends the transfer)."""

    def __init__(self, pid: int, write: bool, batches: list[Batch], on_done: Callable[[CmaJob], None]) -> None:
        self.pid, self.write, self.batches = pid, write, batches
        self._lock = threading.Lock()
        self._on_done = on_done
        self._next = self._running = 0
        self._over = False
        self.error: BaseException | None = None
        self.stopped = False
        self.finished = threading.Event()

    def take(self) -> Batch | None:
        """The next batch to copy, or None when none is left (or the job was stopped)."""
        with self._lock:
            if self.stopped or self._next >= len(self.batches):
                return None
            self._running += 1
            self._next += 1
            return self.batches[self._next - 1]

    def batch_done(self, error: BaseException | None) -> None:
        """A batch from :meth:`take` returned (``error``: how it failed)."""
        with self._lock:
            self._running -= 1
            if error is not None and self.error is None:
                self.error, self.stopped = error, True
            last = self._ending()
        if last:
            self.finished.set()
            self._on_done(self)

    def stop(self) -> None:
        """Start no more batches (those inside a system call finish: at most one per thread)."""
        with self._lock:
            self.stopped = True
            last = self._ending()
        if last:
            self.finished.set()

    def _ending(self) -> bool:
        if self._over or self._running or not (self.stopped or self._next >= len(self.batches)):
            return False
        self._over = True
        return True

    def wait(self, timeout: float) -> bool:
        """True once every batch has returned (or been skipped)."""
        return self.finished.wait(timeout)


class CrossMemory:
    """Runs batches against a peer process id: on the calling thread, or on a small pool of copy threads."""

    def __init__(self, library: UcxLibrary, threads: int, inline: int = INLINE_BYTES) -> None:
        self._library = library
        self.threads, self.inline = threads, inline
        # plan -> its batches; weak: a plan dropped by its owner takes its batches along
        self._plans: weakref.WeakKeyDictionary[TransferPlan, list[Batch]] = weakref.WeakKeyDictionary()
        self._queue: queue.SimpleQueue[CmaJob | None] = queue.SimpleQueue()  # cheap to put (C), unlike a pool
        self._workers: list[threading.Thread] = []
        self._pool_lock = threading.Lock()
        self._closed = False

    def batches(self, plan: TransferPlan) -> list[Batch]:
        """The batches of ``plan`` (host fragments), computed once per plan: plans are posted many times."""
        batches = self._plans.get(plan)
        if batches is None:
            local, remote = plan.local, plan.remote
            batches = plan_batches(local.addr, remote.addr, local.nbytes, inline=self.inline)
            self._plans[plan] = batches
        return batches

    def run(self, pid: int, write: bool, batch: Batch) -> None:
        """One system call; raises CmaError on failure or a short transfer."""
        if batch.call is None:
            batch.call = VmCall(self._library, batch.local, batch.remote)
        moved = batch.call.run(pid, write)
        if moved != batch.nbytes:
            code = -moved if moved < 0 else errno.EFAULT
            what = "process_vm_writev" if write else "process_vm_readv"
            detail = os.strerror(code) if moved < 0 else f"moved {moved} of {batch.nbytes} bytes"
            raise CmaError(code, f"{what} to pid {pid} failed: {detail}")

    def step(self, job: CmaJob) -> int:
        """Copy one batch of ``job`` on this thread; its byte count, 0 when there was none left to take."""
        batch = job.take()
        if batch is None:
            return 0
        error: BaseException | None = None
        try:
            self.run(job.pid, job.write, batch)
        except Exception as failure:  # noqa: BLE001 CmaError; anything else still ends the job (as its error), never hangs it
            error = failure
        job.batch_done(error)
        return batch.nbytes

    def share(self, job: CmaJob) -> int:
        """Let copy threads take batches of ``job`` too (one thread per batch beyond the first, at most all);
        returns how many were asked."""
        helpers = min(self.threads, len(job.batches) - 1)
        if helpers > 0:
            self._ensure_threads()
            for _ in range(helpers):
                self._queue.put(job)
        return max(helpers, 0)

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            while self.step(job):
                pass

    def _ensure_threads(self) -> None:
        if self._workers:
            return
        with self._pool_lock:
            if self._closed or self._workers:
                return
            workers = [
                threading.Thread(target=self._serve, name=f"kvxfer-ucx-cma-{i}", daemon=True)
                for i in range(self.threads)
            ]
            for worker in workers:
                worker.start()
            self._workers = workers

    def close(self, timeout: float = 5.0) -> None:
        """Stop the copy threads once the batches they took (skipped if cancelled) have returned."""
        with self._pool_lock:
            workers, self._workers, self._closed = self._workers, [], True
        for _ in workers:
            self._queue.put(None)
        for worker in workers:
            worker.join(timeout)

    def probe(self, pid: int, addr: int, token: bytes) -> str | None:
        """None when ``pid`` is reachable and holds ``token`` at ``addr`` (i.e. it *is* the peer, in our pid
        namespace, and the kernel lets us attach); else why not."""
        buffer = np.zeros(len(token), dtype=np.uint8)
        batch = Batch.span(buffer.ctypes.data, addr, len(token))
        try:
            self.run(pid, False, batch)
        except CmaError as error:
            return str(error)
        if buffer.tobytes() != token:
            return f"pid {pid} is not the peer (token mismatch: another pid namespace?)"
        return None
