"""Active messages in: the worker's receive callback, rendezvous receives, and the hand-off to a :class:`Receiver`.

Messages arrive in one of three forms and all three are handled: plain (data valid only inside the callback),
``FLAG_DATA`` (UCX-owned; the receiver copies what it keeps before we return UCS_OK) and ``FLAG_RNDV`` (fetched
with ``ucp_am_recv_data_nbx`` into a buffer we own, or straight into a registered span the receiver names, and
handed on when that receive completes). Everything here runs under the worker's lock (the callback inside
``ucp_worker_progress``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from . import cdef
from .library import UcxLibrary
from .status import pointer_status

_log = logging.getLogger("kvxfer.ucx")


class UserSpan(tuple[int, int]):
    """``(addr, nbytes)`` of registered memory a send reads from or a rendezvous receive lands in directly (no
    pooled buffer): while one is in flight its region is busy (``Worker.touches``)."""

    @property
    def addr(self) -> int:
        return int(self[0])

    @property
    def nbytes(self) -> int:
        return int(self[1])

    def overlaps(self, addr: int, nbytes: int) -> bool:
        """True if the span meets ``[addr, addr + nbytes)``."""
        return self.addr < addr + nbytes and addr < self.addr + self.nbytes


class Buffers(Protocol):
    """Host buffers for rendezvous receives (the backend's staging pool)."""

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of exactly ``nbytes`` bytes."""
        ...

    def give(self, buffer: np.ndarray) -> None:
        """Return a buffer from :meth:`take` once nothing uses it any more."""
        ...


class Receiver(Protocol):
    """What the inbox calls for each active message (under the worker lock, maybe inside a UCX callback)."""

    def too_large(self, head: bytes, length: int) -> str | None:
        """Why a message of ``length`` payload bytes with header ``head`` is refused before it is received, or
        None (size caps per message kind)."""
        ...

    def on_refused(self, head: bytes, reason: str, reply_ep: int) -> None:
        """A message :meth:`too_large` refused."""
        ...

    def placement(self, head: bytes, length: int) -> int:
        """Where a rendezvous payload may land directly, or 0: a pooled buffer."""
        ...

    def on_message(self, head: bytes, data: Any, reply_ep: int) -> None:
        """A message: ``data`` is a read-only buffer valid only during the call (copy what you keep), or None when
        the payload already landed where :meth:`placement` said; ``reply_ep`` is an int ucp_ep_h (0 when the sender
        asked for no reply)."""
        ...


class _Deaf:
    """The receiver until one is set: refuses everything (nothing progresses the worker before then)."""

    def too_large(self, head: bytes, length: int) -> str | None:
        return "nothing receives messages yet"

    def on_refused(self, head: bytes, reason: str, reply_ep: int) -> None:
        pass

    def placement(self, head: bytes, length: int) -> int:
        return 0

    def on_message(self, head: bytes, data: Any, reply_ep: int) -> None:
        pass


_Receive = tuple[int, bytes, "np.ndarray | UserSpan", int]  # request, header, where it lands, reply ep


class Inbox:
    """The receiving half of a worker. ``defer(work)`` runs ``work`` after the current ``ucp_worker_progress``."""

    def __init__(self, library: UcxLibrary, buffers: Buffers, defer: Callable[[Callable[[], None]], None]) -> None:
        self._library, self._buffers, self._defer = library, buffers, defer
        self.receiver: Receiver = _Deaf()
        self.worker_handle: Any = None  # set by the worker once created; None again once destroyed
        self.refused = 0  # messages refused by the receiver's size caps
        self.forms: Counter[str] = Counter()  # messages received per form: "plain", "data", "rndv"
        # rendezvous receives: buffer exactly the message's size, or the registered span it lands in
        self.receives: list[_Receive] = []
        ffi = library.ffi
        self._recv_param = ffi.new("ucp_request_param_t *")  # no callback: rendezvous receives are polled
        self.callback = ffi.callback(
            "ucs_status_t(void *, const void *, size_t, void *, size_t, const void *)",
            self._on_am,
            onerror=self._on_callback_error,
        )

    def _on_am(self, _arg: Any, header: Any, header_length: int, data: Any, length: int, param: Any) -> int:
        ffi = self._library.ffi
        recv = ffi.cast("ucp_am_recv_param_t *", param)
        attributes = int(recv.recv_attr)
        reply_ep = int(ffi.cast("uintptr_t", recv.reply_ep)) if attributes & cdef.UCP_AM_RECV_ATTR_FIELD_REPLY_EP else 0
        head = bytes(ffi.buffer(header, header_length)) if header_length else b""
        receiver = self.receiver
        refusal = receiver.too_large(head, length)
        if refusal is not None:  # too large for its kind: never allocated, never received (UCX drops the data)
            self.refused += 1
            _log.warning("ucx: refused a %d-byte message: %s", length, refusal)
            receiver.on_refused(head, refusal, reply_ep)
            return cdef.UCS_OK
        if attributes & cdef.UCP_AM_RECV_ATTR_FLAG_RNDV:
            self.forms["rndv"] += 1
            place = receiver.placement(head, length)  # checked by the receiver: a span of a registered region
            buffer: np.ndarray | UserSpan = UserSpan((place, length)) if place else self._buffers.take(length)
            target = place or buffer.ctypes.data  # type: ignore[union-attr]
            request = self._library.lib.ucp_am_recv_data_nbx(self.worker_handle, data, target, length, self._recv_param)
            status = pointer_status(request)
            if status == cdef.UCS_INPROGRESS:
                self.receives.append((request, head, buffer, reply_ep))
            elif status == cdef.UCS_OK:
                self._defer(lambda: self._hand_on(head, buffer, reply_ep))
            else:
                text = self._library.status_text(status)
                _log.warning("ucx: rendezvous receive of %d bytes failed: %s", length, text)
            return cdef.UCS_OK
        # Plain and FLAG_DATA payloads: handled (copied or consumed) before we return UCS_OK, so UCX may reuse them.
        self.forms["data" if attributes & cdef.UCP_AM_RECV_ATTR_FLAG_DATA else "plain"] += 1
        receiver.on_message(head, ffi.buffer(data, length) if length else b"", reply_ep)
        return cdef.UCS_OK

    def reap(self) -> int:
        """Hand on the rendezvous receives that completed; returns how many ended."""
        lib = self._library.lib
        done = 0
        pending = []
        for request, head, buffer, reply_ep in self.receives:
            status = lib.ucp_request_check_status(request)
            if status == cdef.UCS_INPROGRESS:
                pending.append((request, head, buffer, reply_ep))
                continue
            lib.ucp_request_free(request)
            done += 1
            if status == cdef.UCS_OK:
                self._hand_on(head, buffer, reply_ep)
            else:
                _log.warning("ucx: rendezvous receive failed: %s", self._library.status_text(status))
                if not isinstance(buffer, UserSpan):
                    self._buffers.give(buffer)  # UCX is done with it: back to the pool, not to the allocator
        self.receives = pending
        return done

    def _hand_on(self, head: bytes, buffer: np.ndarray | UserSpan, reply_ep: int) -> None:
        if isinstance(buffer, UserSpan):
            self.receiver.on_message(head, None, reply_ep)  # None: the payload already landed where placement said
            return
        try:
            self.receiver.on_message(head, buffer.data, reply_ep)  # .data: the array's memoryview
        finally:
            self._buffers.give(buffer)  # handlers copy what they keep

    def touches(self, addr: int, nbytes: int) -> bool:
        """True while a rendezvous receive lands in ``[addr, addr + nbytes)`` directly."""
        return any(isinstance(entry[2], UserSpan) and entry[2].overlaps(addr, nbytes) for entry in self.receives)

    def _on_callback_error(self, exc_type: Any, exc: BaseException | None, _traceback: Any) -> int:
        _log.error("ucx: active-message handler raised %s: %s", getattr(exc_type, "__name__", exc_type), exc)
        return cdef.UCS_OK

    def cancel_all(self) -> None:
        """Cancel and release the receives in flight (the worker is being destroyed)."""
        lib = self._library.lib
        for request, *_rest in self.receives:
            lib.ucp_request_cancel(self.worker_handle, request)
            lib.ucp_request_free(request)
        self.receives = []
