"""Posted transfers of the UCX backend, one class per data path.

- :class:`CmaTransfer`: same-host host memory, batched ``process_vm_readv``/``writev`` (the posting thread copies
  the first batch; the copy threads and a waiting thread share the rest).
- :class:`DirectTransfer`: one UCP put/get per (coalesced) fragment, then one endpoint flush. Any memory, any
  transport; the path for device memory and for large host fragments.
- :class:`StagedTransfer` (staged.py): small host fragments over UCX, packed into few large messages;
  :class:`DeviceStagedTransfer` (device_staged.py): small device fragments through GPU slots.

paths.py chooses the class for a plan. Every request reaches the backend's parts through :class:`Services` only.

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

from ...errors import BackendError, KvxferError, TransferCancelledError, UcxStatusError
from ...handle import TransferState
from ..base import Op, Request
from .binding import UCS_INPROGRESS, UCS_OK
from .cma import CmaError, CmaJob
from .link import Link
from .services import Services

if TYPE_CHECKING:
    from ...plan import TransferPlan

#: Seconds past a transfer's deadline after which a cancel presumes its peer hung and marks it lost.
LOST_GRACE = 0.2


class UcxRequest(Request):
    """One posted transfer on one link."""

    strategy = "?"

    def __init__(self, services: Services, link: Link, op: Op, plan: TransferPlan, notify: bytes | None) -> None:
        super().__init__(plan.nbytes)
        self.services, self.link, self.op, self.plan, self.notify = services, link, op, plan, notify
        self.id = services.ledger.next_id()
        self.deadline = time.monotonic() + services.timeouts.transfer
        self.finished = threading.Event()
        self.stopped = False
        self._notifying = False

    def poll(self) -> TransferState:
        """The state now; makes progress itself when the worker lock is free (never waits for it)."""
        services = self.services
        lock = services.worker.lock
        if not self.state.final and lock.acquire(blocking=False):
            try:  # if the progress thread holds the lock it is making progress: do not wait for it
                services.worker.progress()
                services.device_server.poll()
                self.advance()
            finally:
                lock.release()
            services.outbox.flush()
        return self.state

    def wait(self, seconds: float) -> None:
        """Let up to ``seconds`` pass for a waiter, returning early once the request may be final."""
        if self.poll() is TransferState.PENDING:
            self.finished.wait(seconds)

    def cancel(self) -> None:
        """CANCELLED unless already final; nothing more is issued (what UCX issued may still land)."""
        services = self.services
        # A handle cancels at its own deadline, microseconds before ours: only a cancel clearly past ours (the
        # peer silent for longer than any deadline allowed) presumes it hung.
        overdue = time.monotonic() > self.deadline + LOST_GRACE
        with services.worker.lock:
            self.halt()
            if not self.state.final:
                outstanding = self.strategy != CmaTransfer.strategy
                self.finish(TransferState.CANCELLED, TransferCancelledError("cancelled", backend="ucx"))
                if overdue and outstanding:
                    # UCX cannot abort what it issued; a peer that let the deadline pass is presumed hung.
                    services.links.lose(self.link, "unresponsive: a transfer missed its deadline", None)
        self.quiesce(services.timeouts.close)
        services.outbox.flush()

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
            self.services.notify(self.link, self.notify, self._notified)
        except KvxferError as error:
            self.fail(f"sending the notification failed: {error}", error)

    def _notified(self, status: int) -> None:
        if status == UCS_OK:
            self.finish(TransferState.DONE)
        else:
            self.fail(f"sending the notification failed: {self.services.library.status_text(status)}")

    def finish(self, state: TransferState, error: KvxferError | None = None) -> None:
        """Make the request final (first call wins) and retire it (under the worker lock)."""
        if self.state.final:
            return
        self.error = error
        self.state = state
        self.finished.set()
        self.services.ledger.retire(self)
        self.link.requests.discard(self)

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
        cma = self.services.cma
        batches = cma.batches(self.plan)
        inline = cma.inline
        if self.nbytes <= inline:  # the common case: this thread copies it all, no queue, no hand-off
            try:
                for batch in batches:
                    if not self.stopped:
                        cma.run(self.link.pid, self.op is Op.WRITE, batch)
            except Exception as failure:  # noqa: BLE001 CmaError; anything else must still end the transfer (as its error)
                self.copy_error = failure
            self.copied = True
            self._copied(None)
            return
        self.job = job = CmaJob(self.link.pid, self.op is Op.WRITE, batches, self._copied)
        if self.stopped:  # halted (peer lost, backend closed) between post() and here
            job.stop()
        helpers = cma.share(job)
        share, copied = min(inline, self.nbytes // (helpers + 1)), 0
        while True:  # at least one batch, then up to this thread's share
            moved = cma.step(job)
            copied += moved
            if not moved or copied >= share:
                return

    def help(self) -> bool:
        """Copy one batch on the calling thread (one that would otherwise sleep); False if none was left."""
        return self.job is not None and self.services.cma.step(self.job) > 0

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
        services = self.services
        with services.worker.lock:
            self.advance()
        services.outbox.flush()
        if not self.state.final:
            services.wake()  # the notification's send is in flight: the progress thread completes it

    def advance(self) -> None:
        if self.state.final or not self.copied:
            return
        error = self.copy_error
        if error is None:
            if not self.stopped:
                self.data_done()
            return
        if isinstance(error, CmaError) and error.errno == errno.ESRCH:  # the peer process is gone
            self.services.links.lose(self.link, f"its process (pid {self.link.pid}) is gone", error)
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
        memhs = self.services.regions.memh_list(local.region)
        rkeys = self.link.rkey_list(remote.region)
        with self.services.worker.lock:
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
        self.services.wake()

    def advance(self) -> None:
        if self.state.final or not self._flush or self.stopped:
            return
        status = self.services.library.request_status(self._flush)
        if status == UCS_INPROGRESS:
            return
        self._flush = 0
        # In none error mode a flush may report OK for puts to a peer that died meanwhile; so check the process.
        peer_gone = self.link.mode == "none" and self.link.process_verified and self.link.process_gone()
        ep_failed = self.link.ep.failed_status
        if status == UCS_OK and ep_failed is None and not peer_gone:
            self.data_done()
        elif peer_gone:
            self.services.links.lose(self.link, f"its process (pid {self.link.pid}) exited", None)
            self.fail("the peer process exited during the transfer")
        else:
            # A flush can report OK while the endpoint already failed (none error mode): trust neither alone.
            failed = status if status != UCS_OK or ep_failed is None else ep_failed
            self.fail(f"endpoint flush failed: {self.services.library.status_text(failed)}")

    def halt(self) -> None:
        super().halt()
        if self._flush:
            # Freed while in flight, UCX releases it on completion; the puts themselves cannot be recalled.
            self.services.library.free_request(self._flush)
            self._flush = 0
