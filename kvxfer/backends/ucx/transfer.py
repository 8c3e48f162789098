"""Posted transfers of the UCX backend, one class per data path.

- :class:`CmaTransfer`: same-host host memory, batched ``process_vm_readv``/``writev`` (inline when small, else on
  the copy threads).
- :class:`DirectTransfer`: one UCP put/get per (coalesced) fragment, then one endpoint flush. Any memory, any
  transport; the path for device memory and for large host fragments.
- :class:`StagedTransfer` (staged.py): small host fragments over UCX, packed into few large messages.

All of them end the same way: when the data is visible on the destination side, the notification (if any) is sent,
and when that send completes locally, the request is DONE. Methods named ``advance``/``on_*`` run under the
worker lock.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import TYPE_CHECKING

from ...errors import BackendError, KvxferError
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

INLINE_CMA_NBYTES = 1 << 20  # smaller transfers copy in post(): cheaper than a hand-off to a copy thread


class UcxRequest(Request):
    """One posted transfer on one link."""

    strategy = "?"

    def __init__(self, backend: "UcxBackend", link: "Link", op: Op, plan: "TransferPlan",
                 notify: bytes | None) -> None:
        super().__init__(plan.nbytes)
        self.backend, self.link, self.op, self.plan, self.notify = backend, link, op, plan, notify
        self.id = backend.next_transfer_id()
        self.deadline = time.monotonic() + backend.timeouts.transfer
        self.finished = threading.Event()
        self.stopped = False
        self._notifying = False

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
        error = BackendError(f"ucx {self.strategy} {self.op.value} with peer {self.link.name!r}: {message}",
                             backend="ucx")
        error.__cause__ = cause
        self.finish(TransferState.FAILED, error)


class CmaTransfer(UcxRequest):
    """Same-host host memory through batched cross-memory calls; the peer takes no part."""

    strategy = "cma"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.job: CmaJob | None = None
        self.error_seen: BaseException | None = None
        self.copied = False

    def start(self) -> None:
        batches = self.backend.cma_batches(self.plan)
        write = self.op is Op.WRITE
        if self.nbytes > INLINE_CMA_NBYTES:
            self.job = CmaJob(lambda _job: self.backend.wake())
            self.backend.cma.submit(self.link.pid, write, batches, self.job)
            return
        try:
            for batch in batches:
                self.backend.cma.run(self.link.pid, write, batch)
        except CmaError as failure:
            self.error_seen = failure
        self.copied = True
        with self.backend.worker.lock:
            self.advance()

    def advance(self) -> None:
        if self.state.final:
            return
        if self.job is not None:
            if not self.job.finished.is_set():
                return
            self.error_seen, self.copied = self.job.error, True
        if not self.copied:
            return
        error = self.error_seen
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
                self.link.ep.rma(self.op is Op.WRITE, local.addr.tolist(), remote.addr.tolist(),
                                 local.nbytes.tolist(), rkeys, memhs)
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
        if status == cdef.UCS_OK and self.link.ep.failed_status is None and not peer_gone:
            self.data_done()
        elif peer_gone:
            self.backend.links.lose(self.link, f"its process (pid {self.link.pid}) exited", None)
            self.fail("the peer process exited during the transfer")
        else:
            # A flush can report OK while the endpoint already failed (none error mode): trust neither alone.
            failed = self.link.ep.failed_status if status == cdef.UCS_OK else status
            self.fail(f"endpoint flush failed: {self.backend.library.status_text(failed)}")

    def halt(self) -> None:
        super().halt()
        if self._flush:
            # Freed while in flight, UCX releases it on completion; the puts themselves cannot be recalled.
            self.backend.library.lib.ucp_request_free(self._flush)
            self._flush = 0


def new_request(backend: "UcxBackend", link: "Link", op: Op, plan: "TransferPlan", notify: bytes | None,
                strategy: str) -> UcxRequest:
    """The request class for ``strategy`` ("cma", "direct" or "staged")."""
    if strategy == "cma":
        return CmaTransfer(backend, link, op, plan, notify)
    if strategy == "direct":
        return DirectTransfer(backend, link, op, plan, notify)
    from .staged import StagedTransfer

    return StagedTransfer(backend, link, op, plan, notify)
