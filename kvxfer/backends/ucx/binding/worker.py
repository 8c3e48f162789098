"""A UCP worker: progress, wakeup, active messages out (in: inbox.py), endpoint error dispatch.

Thread safety: the worker is created in ``UCS_THREAD_MODE_SERIALIZED`` and every call into it happens under
``worker.lock`` — by the caller's thread (posting, polling) or the progress thread. Callbacks run only inside
``ucp_worker_progress``, i.e. under the lock; they never call progress and never send (they queue work that
:meth:`progress` runs once ``ucp_worker_progress`` has returned).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from . import cdef
from .inbox import Buffers, Inbox, Receiver, UserSpan
from .library import UcxLibrary
from .status import check, closed_error, pointer_status, status_error

AM_ID = 7  # our one active-message id; the header's kind byte says what the message is
_PROGRESS_BURST = 64

SendDone = Callable[[int], None]
EndpointErrorHandler = Callable[[int], None]
_Send = tuple[int, Any, SendDone | None, int]  # a send in flight: request, keepalive, on_done, ucp_ep_h

_log = logging.getLogger("kvxfer.ucx")


class Worker:
    """One UCP worker, its address (bytes for the metadata) and its wakeup file descriptor. Received messages go
    to the :class:`Receiver` given to :meth:`receive_with`."""

    def __init__(self, library: UcxLibrary, context_handle: Any, name: str, buffers: Buffers) -> None:
        self.library = library
        ffi, lib = library.ffi, library.lib
        self.lock = threading.Lock()
        self._deferred: list[Callable[[], None]] = []
        self.inbox = Inbox(library, buffers, self.defer)
        params = ffi.new("ucp_worker_params_t *")
        self._name = ffi.new("char[]", name.encode()[:63])
        params.field_mask = cdef.UCP_WORKER_PARAM_FIELD_THREAD_MODE | cdef.UCP_WORKER_PARAM_FIELD_NAME
        params.thread_mode = cdef.UCS_THREAD_MODE_SERIALIZED
        params.name = self._name
        handle = ffi.new("ucp_worker_h *")
        check(library, lib.ucp_worker_create(context_handle, params, handle), "ucp_worker_create")
        self.handle: Any = handle[0]
        address, length = ffi.new("ucp_address_t **"), ffi.new("size_t *")
        check(library, lib.ucp_worker_get_address(self.handle, address, length), "ucp_worker_get_address")
        self.address = bytes(ffi.buffer(address[0], length[0]))
        lib.ucp_worker_release_address(self.handle, address[0])
        efd = ffi.new("int *")
        check(library, lib.ucp_worker_get_efd(self.handle, efd), "ucp_worker_get_efd")
        self.efd = int(efd[0])
        self.inbox.worker_handle = self.handle
        self._sends: list[_Send] = []  # sends in flight
        self.abandoned = 0  # sends given up on because their peer process is gone (see abandon_sends)
        handler = ffi.new("ucp_am_handler_param_t *")
        handler.field_mask = (
            cdef.UCP_AM_HANDLER_PARAM_FIELD_ID
            | cdef.UCP_AM_HANDLER_PARAM_FIELD_FLAGS
            | cdef.UCP_AM_HANDLER_PARAM_FIELD_CB
        )
        handler.id = AM_ID
        handler.flags = cdef.UCP_AM_FLAG_WHOLE_MSG
        handler.cb = self.inbox.callback
        check(library, lib.ucp_worker_set_am_recv_handler(self.handle, handler), "ucp_worker_set_am_recv_handler")
        # One endpoint error callback for the worker's whole life, dispatching on the ``arg`` id each endpoint was
        # created with: UCX may call an endpoint's handler after we closed it (none error mode: a flushing close
        # that never completes, then the peer dies), so a per-endpoint callback object could be freed under it.
        self.ep_error_callback = ffi.callback("void(void *, ucp_ep_h, ucs_status_t)", self._on_ep_error)
        self._ep_handlers: dict[int, EndpointErrorHandler] = {}
        self._ep_ids = itertools.count(1)
        self._send_param = ffi.new("ucp_request_param_t *")
        self._send_param.op_attr_mask = cdef.UCP_OP_ATTR_FIELD_FLAGS

    def receive_with(self, receiver: Receiver) -> None:
        """Hand every message received from now on to ``receiver`` (set once, before the first progress)."""
        self.inbox.receiver = receiver

    # ---- progress ---------------------------------------------------------------------------------------------

    def progress(self) -> int:
        """Drive communication; run the work callbacks queued. Caller holds :attr:`lock`. Returns an event count.

        Work queued by callbacks (answers on a reply endpoint, rendezvous hand-offs) runs right after the
        ``ucp_worker_progress`` call that queued it: a reply endpoint UCX hands a callback may be destroyed by a
        later progress call (its peer failed), so it is never kept across calls."""
        lib, handle = self.library.lib, self.handle
        if handle is None:  # closed: a thread that lost the race with close() must not touch a destroyed worker
            return 0
        count = 0
        for _ in range(_PROGRESS_BURST):
            events = lib.ucp_worker_progress(handle)
            count += events
            if self.inbox.receives:
                count += self.inbox.reap()
            while self._deferred:
                work, self._deferred = self._deferred, []
                for item in work:
                    item()
                count += len(work)
            if not events:
                break
        if self._sends:
            count += self._reap_sends()
        return count

    def arm(self) -> bool:
        """True when the worker is armed (its efd will signal the next event); False when events are pending
        (progress again at once). Caller holds :attr:`lock`."""
        if self.handle is None:
            return True
        status = self.library.lib.ucp_worker_arm(self.handle)
        if status == cdef.UCS_ERR_BUSY:
            return False
        check(self.library, status, "ucp_worker_arm")
        return not self._deferred

    def defer(self, work: Callable[[], None]) -> None:
        """Run ``work`` at the end of the current (or next) :meth:`progress`, outside UCX callbacks."""
        self._deferred.append(work)

    @property
    def receiving(self) -> bool:
        """True while rendezvous receives are in flight."""
        return bool(self.inbox.receives)

    @property
    def busy(self) -> bool:
        """True while sends or rendezvous receives are in flight."""
        return bool(self._sends or self.inbox.receives)

    # ---- sending ----------------------------------------------------------------------------------------------

    def send(
        self,
        ep: Any,
        header: bytes,
        addr: int = 0,
        nbytes: int = 0,
        keepalive: Any = None,
        reply: bool = False,
        on_done: SendDone | None = None,
    ) -> None:
        """Send one active message on ``ep`` (a ucp_ep_h, or an int one: a reply endpoint); ``[addr, addr +
        nbytes)`` must stay valid until ``on_done(status)`` (``keepalive`` is held until then). Caller holds
        :attr:`lock`."""
        ffi, lib = self.library.ffi, self.library.lib
        if self.handle is None or ep is None or ep == 0 or ep == ffi.NULL:
            # a closed worker, or the endpoint of a link lost meanwhile: UCX would dereference NULL
            raise closed_error("ucp_am_send_nbx")
        if isinstance(ep, int):  # a reply endpoint, as the receive callback gave it
            ep = ffi.cast("ucp_ep_h", ep)
        param = self._send_param
        param.flags = cdef.UCP_AM_SEND_FLAG_COPY_HEADER | (cdef.UCP_AM_SEND_FLAG_REPLY if reply else 0)
        request = lib.ucp_am_send_nbx(ep, AM_ID, ffi.from_buffer(header), len(header), addr, nbytes, param)
        status = pointer_status(request)
        if status < 0:
            raise status_error(self.library, status, "ucp_am_send_nbx")
        if status == cdef.UCS_INPROGRESS:
            self._sends.append((request, keepalive, on_done, int(ffi.cast("uintptr_t", ep))))
        elif on_done is not None:
            on_done(cdef.UCS_OK)

    def _reap_sends(self) -> int:
        lib = self.library.lib
        still: list[tuple[_Send, int]] = []
        finished: list[tuple[_Send, int]] = []
        for entry in self._sends:
            status = lib.ucp_request_check_status(entry[0])
            (still if status == cdef.UCS_INPROGRESS else finished).append((entry, status))
        self._sends = [entry for entry, _ in still]
        for (request, _keepalive, on_done, _ep), status in finished:
            lib.ucp_request_free(request)
            if on_done is not None:
                on_done(status)
        return len(finished)

    def sends_on(self, ep: int) -> int:
        """Sends in flight on endpoint ``ep`` (an int ucp_ep_h)."""
        return sum(1 for entry in self._sends if entry[3] == ep)

    @property
    def sends_in_flight(self) -> int:
        """Sends in flight on every endpoint."""
        return len(self._sends)

    def abandon_sends(self, ep: int) -> int:
        """Give up on the sends in flight on endpoint ``ep`` (an int ucp_ep_h) whose peer process is gone: no one
        will ever read their buffers, and in none error mode UCX never completes them. Each request is released
        (UCX frees it if it ever completes) and its ``on_done(UCS_ERR_CANCELED)`` called, which returns a pooled
        buffer to its pool (no one reads it any more: reusing it beats a fresh multi-MiB allocation, which the
        allocator may never give back). Caller holds :attr:`lock`. Returns how many."""
        free = self.library.lib.ucp_request_free
        keep: list[_Send] = []
        gone: list[_Send] = []
        for entry in self._sends:
            (gone if entry[3] == ep else keep).append(entry)
        self._sends = keep
        for request, _keepalive, on_done, _ep in gone:
            free(request)
            if on_done is not None:
                on_done(cdef.UCS_ERR_CANCELED)
        dropped = len(gone)
        self.abandoned += dropped
        return dropped

    # ---- endpoint errors ----------------------------------------------------------------------------------------

    def watch_endpoint(self, on_error: EndpointErrorHandler) -> int:
        """A new id for ``ucp_ep_params_t.err_handler.arg``: errors of that endpoint call ``on_error(status)``
        until :meth:`unwatch_endpoint`."""
        key = next(self._ep_ids)
        self._ep_handlers[key] = on_error
        return key

    def unwatch_endpoint(self, key: int) -> None:
        """Stop reporting errors of the endpoint created with ``key`` (it is closing or closed)."""
        self._ep_handlers.pop(key, None)

    @property
    def watched_endpoints(self) -> int:
        """Endpoints whose errors are reported (open endpoints)."""
        return len(self._ep_handlers)

    def _on_ep_error(self, arg: Any, _ep: Any, status: int) -> None:
        handler = self._ep_handlers.get(int(self.library.ffi.cast("uintptr_t", arg)))
        if handler is not None:
            handler(int(status))

    def touches(self, addr: int, nbytes: int) -> bool:
        """True while a send reads from, or a rendezvous receive lands in, ``[addr, addr + nbytes)``."""
        return self.inbox.touches(addr, nbytes) or any(
            isinstance(entry[1], UserSpan) and entry[1].overlaps(addr, nbytes) for entry in self._sends
        )

    # ---- teardown ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the worker (idempotent). Caller has closed its endpoints."""
        if self.handle is None:
            return
        lib = self.library.lib
        self.inbox.cancel_all()
        for request, _keepalive, _done, _ep in self._sends:
            lib.ucp_request_cancel(self.handle, request)
            lib.ucp_request_free(request)
        self._sends, self._deferred = [], []
        self._ep_handlers.clear()
        lib.ucp_worker_destroy(self.handle)
        self.handle = self.inbox.worker_handle = None
