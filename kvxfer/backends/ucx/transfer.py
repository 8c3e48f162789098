"""Posted transfers of the UCX backend, one class per data path.

- :class:`CmaTransfer`: same-host host memory, batched ``process_vm_readv``/``writev`` (the posting thread copies
  the first batch; the copy threads and a waiting thread share the rest).
- :class:`DirectTransfer`: one UCP put/get per (coalesced) fragment, then one endpoint flush. Any memory, any
  transport; the path for device memory and for large host fragments.
- :class:`StagedTransfer` (staged.py): small host fragments over UCX, packed into few large messages;
  :class:`DeviceStagedTransfer` (device_staged.py): small device fragments through GPU slots.

All of them end the same way: when the data is visible on the destination side, the notification (if any) is sent,
and when that send completes locally, the request is DONE. Methods named ``advance``/``on_*`` run under the
worker lock.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import TYPE_CHECKING

from ...errors import BackendError, KvxferError, TransferCancelledError
from ...handle import TransferState
from ..base import Op, Request
from . import cdef
from .cma import CmaError, CmaJob
from .endpoint import request_status
from .library import UcxStatusError

if TYPE_CHECKING:
    from ...plan import TransferPlan
    from .backend import UcxBackend
    from .link import Link

#: Seconds past a transfer's deadline after which a cancel presumes its peer hung and marks it lost.
LOST_GRACE = 0.2


class UcxRequest(Request):
    """One posted transfer on one link."""

    strategy = "?"

    def __init__(self, backend: UcxBackend, link: Link, op: Op, plan: TransferPlan, notify: bytes | None) -> None:
        super().__init__(plan.nbytes)
        self.backend, self.link, self.op, self.plan, self.notify = backend, link, op, plan, notify
        self.id = backend.next_transfer_id()
        self.deadline = time.monotonic() + backend.timeouts.transfer
        self.finished = threading.Event()
        self.stopped = False
        self._notifying = False

    def poll(self) -> TransferState:
        backend = self.backend
        if not self.state.final and backend.worker.lock.acquire(blocking=False):
            try:  # if the progress thread holds the lock it is making progress: do not wait for it
                backend.worker.progress()
                backend.device_server.poll()
                self.advance()
            finally:
                backend.worker.lock.release()
            backend.flush_outbox()
        return self.state

    def wait(self, seconds: float) -> None:
        if self.poll() is TransferState.PENDING:
            self.finished.wait(seconds)

    def cancel(self) -> None:
        backend = self.backend
        # A handle cancels at its own deadline, microseconds before ours: only a cancel clearly past ours (the
        # peer silent for longer than any deadline allowed) presumes it hung.
        overdue = time.monotonic() > self.deadline + LOST_GRACE
        with backend.worker.lock:
            self.halt()
            if not self.state.final:
                outstanding = self.strategy != "cma"
                self.finish(TransferState.CANCELLED, TransferCancelledError("cancelled", backend="ucx"))
                if overdue and outstanding:
                    # UCX cannot abort what it issued; a peer that let the deadline pass is presumed hung.
                    backend.links.lose(self.link, "unresponsive: a transfer missed its deadline", None)
        self.quiesce(backend.timeouts.close)
        backend.flush_outbox()

    def start(self) -> None:
        """Begin moving bytes; called once by post(), without the worker lock."""
        raise NotImplementedError

    def advance(self) -> None:
        """Move forward if possible (under the worker lock)."""

    def halt(self) -> None:
        """Issue nothing more (cancel, peer loss, close); under the worker lock, never waits."""
        self.stopped = True

    def quiesce(self, timeout: float) -> None:
        """After :meth:`halt`, wait (without the worker lock) until this request touches memory no more, where
        that can be known: for cross-memory copies it can; for UCX operations already issued it cannot."""

    def data_done(self) -> None:
        """The data is visible at its destination: notify (if asked), then finish. Under the worker lock."""
        if self.state.final or self._notifying:
            return
        if self.notify is None:
            self.finish(TransferState.DONE)
            return
        self._notifying = True
        try:
            self.backend.send_notify(self.link, self.notify, self._notified)
        except KvxferError as error:
            self.fail(f"sending the notification failed: {error}", error)

    def _notified(self, status: int) -> None:
        if status == cdef.UCS_OK:
            self.finish(TransferState.DONE)
        else:
            self.fail(f"sending the notification failed: {self.backend.library.status_text(status)}")

    def finish(self, state: TransferState, error: KvxferError | None = None) -> None:
        """Make the request final (first call wins) and retire it."""
        if self.state.final:
            return
        self.error = error
        self.state = state
        self.finished.set()
        self.backend.retire(self)

    def fail(self, message: str, cause: BaseException | None = None) -> None:
        """FAILED with a BackendError saying ``message`` (``cause`` kept as ``__cause__``)."""
        error = BackendError(
            f"ucx {self.strategy} {self.op.value} with peer {self.link.name!r}: {message}", backend="ucx"
        )
        error.__cause__ = cause
        self.finish(TransferState.FAILED, error)


class CmaTransfer(UcxRequest):
    """Same-host host memory through batched cross-memory calls; the peer takes no part.

    post() copies a transfer of up to ``config.cma_inline`` bytes itself; a larger one it shares with the copy
    threads, copying its part (up to ``cma_inline`` bytes) before it returns; a thread waiting for the transfer
    (:meth:`help`) takes batches too, and whichever thread finishes the last batch completes the transfer: no
    hand-off to the progress thread."""

    strategy = "cma"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.job: CmaJob | None = None  # only for transfers shared with other threads
        self.copied = False
        self.copy_error: BaseException | None = None

    def start(self) -> None:
        backend = self.backend
        batches = backend.cma_batches(self.plan)
        inline = backend.config.cma_inline
        if self.nbytes <= inline:  # the common case: this thread copies it all, no queue, no hand-off
            try:
                for batch in batches:
                    if not self.stopped:
                        backend.cma.run(self.link.pid, self.op is Op.WRITE, batch)
            except Exception as failure:  # noqa: BLE001 CmaError; anything else must still end the transfer (as its error)
                self.copy_error = failure
            self.copied = True
            self._copied(None)
            return
        self.job = job = CmaJob(self.link.pid, self.op is Op.WRITE, batches, self._copied)
        if self.stopped:  # halted (peer lost, backend closed) between post() and here
            job.stop()
        helpers = backend.cma.share(job)
        share, copied = min(inline, self.nbytes // (helpers + 1)), 0
        while True:  # at least one batch, then up to this thread's share
            moved = backend.cma.step(job)
            copied += moved
            if not moved or copied >= share:
                return

    def help(self) -> bool:
        """Copy one batch on the calling thread (one that would otherwise sleep); False if none was left."""
        return self.job is not None and self.backend.cma.step(self.job) > 0

    def wait(self, seconds: float) -> None:
        if self.help():
            return  # the waiter copied a batch instead of sleeping; the next poll sees where it stands
        # The last batches run on copy threads (at most one batch time): yield instead of sleeping, since waking a
        # sleeping thread costs ~50 µs here; the next poll then completes the transfer.
        give_up = time.monotonic() + seconds
        while self.copying and time.monotonic() < give_up:
            os.sched_yield()
        if not self.copying:
            return
        super().wait(seconds)

    @property
    def copying(self) -> bool:
        """True while batches of this transfer run on other threads (none left to take)."""
        return self.job is not None and not self.job.finished.is_set()

    def _copied(self, job: CmaJob | None) -> None:
        # The last batch returned, on this thread, no lock held: complete here (waking no one but the waiter).
        if job is not None:
            self.copy_error, self.copied = job.error, True
        backend = self.backend
        with backend.worker.lock:
            self.advance()
        backend.flush_outbox()
        if not self.state.final:
            backend.wake()  # the notification's send is in flight: the progress thread completes it

    def advance(self) -> None:
        if self.state.final or not self.copied:
            return
        error = self.copy_error
        if error is None:
            if not self.stopped:
                self.data_done()
            return
        if isinstance(error, CmaError) and error.errno == errno.ESRCH:  # the peer process is gone
            self.backend.links.lose(self.link, f"its process (pid {self.link.pid}) is gone", error)
        self.fail(str(error), error)

    def halt(self) -> None:
        super().halt()
        if self.job is not None:
            self.job.stop()

    def quiesce(self, timeout: float) -> None:
        # Batches already inside a system call finish; none starts after this: no byte lands after cancel().
        if self.job is not None:
            self.job.wait(timeout)


class DirectTransfer(UcxRequest):
    """One UCP put (WRITE) or get (READ) per fragment, then a flush of the endpoint."""

    strategy = "direct"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self._flush = 0

    def start(self) -> None:
        local, remote = self.plan.local, self.plan.remote
        memhs = self.backend.memh_list(local.region)
        rkeys = self.backend.rkey_list(self.link, remote.region)
        with self.backend.worker.lock:
            try:
                self.link.ep.rma(
                    self.op is Op.WRITE, local.addr.tolist(), remote.addr.tolist(), local.nbytes.tolist(), rkeys, memhs
                )
                self._flush = self.link.ep.flush()
            except UcxStatusError as error:
                self.fail(str(error), error)
                return
            if not self._flush:
                self.data_done()
        self.backend.wake()

    def advance(self) -> None:
        if self.state.final or not self._flush or self.stopped:
            return
        status = request_status(self.backend.library, self._flush)
        if status == cdef.UCS_INPROGRESS:
            return
        self._flush = 0
        # In none error mode a flush may report OK for puts to a peer that died meanwhile; so check the process.
        peer_gone = self.link.mode == "none" and self.link.process_verified and self.link.process_gone()
        ep_failed = self.link.ep.failed_status
        if status == cdef.UCS_OK and ep_failed is None and not peer_gone:
            self.data_done()
        elif peer_gone:
            self.backend.links.lose(self.link, f"its process (pid {self.link.pid}) exited", None)
            self.fail("the peer process exited during the transfer")
        else:
            # A flush can report OK while the endpoint already failed (none error mode): trust neither alone.
            failed = status if status != cdef.UCS_OK or ep_failed is None else ep_failed
            self.fail(f"endpoint flush failed: {self.backend.library.status_text(failed)}")

    def halt(self) -> None:
        super().halt()
        if self._flush:
            # Freed while in flight, UCX releases it on completion; the puts themselves cannot be recalled.
            self.backend.library.lib.ucp_request_free(self._flush)
            self._flush = 0


def new_request(
    backend: UcxBackend, link: Link, op: Op, plan: TransferPlan, notify: bytes | None, strategy: str
) -> UcxRequest:
    """The request class for ``strategy`` ("cma", "direct" or "staged")."""
    if strategy == "cma":
        return CmaTransfer(backend, link, op, plan, notify)
    if strategy == "direct":
        return DirectTransfer(backend, link, op, plan, notify)
    if plan.on_device:
        from .device_staged import DeviceStagedTransfer

        return DeviceStagedTransfer(backend, link, op, plan, notify)
    from .staged import StagedTransfer

    return StagedTransfer(backend, link, op, plan, notify)
