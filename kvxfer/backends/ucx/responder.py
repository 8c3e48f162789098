"""The receiving side of the UCX backend's control messages: notifications for the agent, and the target's half
of staged transfers (SCATTER into / GATHER from our registered host regions, answered on the sender's reply
endpoint; DSCATTER / DGATHER for CUDA regions go to device_serve.py). Every descriptor a peer sends is checked
against our registered regions before a byte is touched.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import KvxferError
from ...handle import Notification
from .gather import check_spans, gather, scatter
from .wire import Header, Kind, descs_nbytes, unpack_descs, unpack_span

MAX_CHUNK_FRAGMENTS = 1 << 16  # staged.MAX_CHUNK_FRAGMENTS (not imported: staged imports transfer, which is heavy)

if TYPE_CHECKING:
    from .backend import UcxBackend

_NAME = struct.Struct("<H")
_log = logging.getLogger("kvxfer.ucx")


def pack_notification(sender: str, payload: bytes) -> bytes:
    """NOTIFY payload: u16 name length, the sender's agent name (utf-8), the notification bytes."""
    name = sender.encode()[:_NAME_MAX]
    return _NAME.pack(len(name)) + name + payload


def unpack_notification(data: Any) -> tuple[str, bytes]:
    """(sender name, payload) from a NOTIFY payload; ValueError if malformed."""
    raw = bytes(data)
    if len(raw) < _NAME.size:
        raise ValueError("notification shorter than its name length")
    (length,) = _NAME.unpack_from(raw)
    if _NAME.size + length > len(raw):
        raise ValueError("notification name runs past its end")
    return raw[_NAME.size : _NAME.size + length].decode(errors="replace"), raw[_NAME.size + length :]


#: Default cap on a notification's payload when the agent's context carries no ``limits`` (kvxfer.limits).
NOTIFICATION_NBYTES = 16 << 20
_NAME_MAX = 1024


class Responder:
    """Handles every message our worker receives (called under the worker lock, maybe inside a UCX callback)."""

    def __init__(self, backend: UcxBackend) -> None:
        self.backend = backend
        limits = getattr(backend.context, "limits", None)
        self.notification_nbytes = int(getattr(limits, "notification_nbytes", NOTIFICATION_NBYTES))
        # staged chunks: descriptors + one chunk of a peer configured like us, with room for a 4x larger one
        chunk = max(4 * backend.config.stage_chunk, 64 << 20)
        self.message_nbytes = descs_nbytes(MAX_CHUNK_FRAGMENTS) + chunk

    def too_large(self, head: bytes, length: int) -> str | None:
        """Why a message of ``length`` payload bytes with header ``head`` is refused before it is received (the
        receiver would allocate ``length`` bytes for it, or write it into our memory), or None."""
        header = Header.decode(head)
        if header is None:
            return None  # dropped unread by on_message
        if header.kind is Kind.SCATTER_SPAN:
            try:
                self._span(header, length)
            except ValueError as error:
                return str(error)
            return None
        if header.kind is Kind.NOTIFY:
            limit = self.notification_nbytes + _NAME.size + _NAME_MAX
        else:
            limit = self.message_nbytes
        if length > limit:
            return f"{header.kind.name} of {length} bytes exceeds the {limit}-byte cap"
        return None

    def _span(self, header: Header, length: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The one descriptor of a SCATTER_SPAN / GATHER_SPAN, checked against our registered host regions (and,
        when ``length`` is given, against the payload's length); ValueError saying why not."""
        addr, nbytes, region = unpack_span(header.tail)
        if length is not None and length != int(nbytes[0]):
            raise ValueError(f"{header.kind.name} carries {length} bytes for a {int(nbytes[0])}-byte span")
        reason = check_spans(addr, nbytes, region, self.backend.host_view)
        if reason is not None:
            raise ValueError(reason)
        return addr, nbytes, region

    def placement(self, head: bytes, length: int) -> int:
        """Where a rendezvous payload may be received directly (0: into a pooled buffer): the checked span of a
        SCATTER_SPAN (too_large ran first), or the local span a DATA answer of one of our transfers fills."""
        header = Header.decode(head)
        if header is None:
            return 0
        if header.kind is Kind.SCATTER_SPAN:
            return int(self._span(header, length)[0][0])
        if header.kind is Kind.DATA:
            return self.backend.reply_placement(header, length)
        return 0

    def on_refused(self, head: bytes, reason: str, reply_ep: int) -> None:
        """A message refused by :meth:`too_large`: staged requests are answered FAIL (the sender stops waiting)."""
        header = Header.decode(head)
        if header is None:
            return
        if header.kind is Kind.NOTIFY:  # counted with the agent's own notification drops
            self.backend.attached_context().count_dropped("oversized")
        self.refuse(header, reply_ep, reason)

    def on_message(self, head: bytes, data: Any, reply_ep: int) -> None:
        header = Header.decode(head)
        if header is None:
            _log.warning("ucx: dropped a message with an unknown header (%d bytes)", len(head))
            return
        try:
            if header.kind is Kind.NOTIFY:
                sender, payload = unpack_notification(data)
                deliver = self.backend.attached_context().deliver
                self.backend.post_outbox(lambda: deliver(Notification(sender, payload)))
            elif header.kind is Kind.SCATTER:
                self._scatter(header, data, reply_ep)
            elif header.kind is Kind.GATHER:
                self._gather(header, data, reply_ep)
            elif header.kind is Kind.SCATTER_SPAN:
                if data is not None:  # an eager payload (a rendezvous one landed in place already)
                    addr, nbytes, region = self._span(header, len(data))
                    scatter(np.frombuffer(data, dtype=np.uint8), addr, nbytes, region, self.backend.host_view)
                self.reply(reply_ep, Header(Kind.ACK, header.transfer, header.chunk))
            elif header.kind is Kind.GATHER_SPAN:
                addr, nbytes, region = self._span(header, None)
                out = self.backend.staging.take(int(nbytes[0]))
                gather(out, addr, nbytes, region, self.backend.host_view)
                self.reply(reply_ep, Header(Kind.DATA, header.transfer, header.chunk), out, pooled=True)
            elif header.kind in (Kind.DSCATTER, Kind.DGATHER):
                self.backend.device_server.accept(header, data, reply_ep)
            elif header.kind is Kind.DCOMMIT:
                self.backend.device_server.commit(header, data, reply_ep)
            else:
                self.backend.route_reply(header, data)
        except (ValueError, KvxferError) as error:
            _log.warning("ucx: bad %s message: %s", header.kind.name, error)
            self.refuse(header, reply_ep, str(error))

    def _scatter(self, header: Header, data: Any, reply_ep: int) -> None:
        payload = np.frombuffer(data, dtype=np.uint8)
        addr, nbytes, region, rest = unpack_descs(payload, header.count)
        total = int(nbytes.sum(dtype=np.uint64))
        if rest.size != total:
            raise ValueError(f"SCATTER carries {rest.size} data bytes for descriptors totalling {total}")
        reason = check_spans(addr, nbytes, region, self.backend.host_view)
        if reason is not None:
            raise ValueError(reason)
        scatter(rest, addr, nbytes, region, self.backend.host_view)
        self.reply(reply_ep, Header(Kind.ACK, header.transfer, header.chunk))

    def _gather(self, header: Header, data: Any, reply_ep: int) -> None:
        payload = np.frombuffer(data, dtype=np.uint8)
        addr, nbytes, region, _rest = unpack_descs(payload, header.count)
        reason = check_spans(addr, nbytes, region, self.backend.host_view)
        if reason is not None:
            raise ValueError(reason)
        out = self.backend.staging.take(int(nbytes.sum(dtype=np.uint64)))
        gather(out, addr, nbytes, region, self.backend.host_view)
        self.reply(reply_ep, Header(Kind.DATA, header.transfer, header.chunk), out, pooled=True)

    def refuse(self, header: Header, reply_ep: int, reason: str) -> None:
        if header.kind in (
            Kind.SCATTER,
            Kind.GATHER,
            Kind.DSCATTER,
            Kind.DGATHER,
            Kind.DCOMMIT,
            Kind.SCATTER_SPAN,
            Kind.GATHER_SPAN,
        ):
            self.reply(
                reply_ep,
                Header(Kind.FAIL, header.transfer, header.chunk),
                np.frombuffer(reason.encode()[:1000], dtype=np.uint8).copy(),
            )

    def reply(self, reply_ep: int, header: Header, payload: np.ndarray | None = None, pooled: bool = False) -> None:
        if not reply_ep:
            _log.warning("ucx: cannot answer %s: the sender gave no reply endpoint", header.kind.name)
            return
        worker, staging = self.backend.worker, self.backend.staging
        ep = self.backend.library.ffi.cast("ucp_ep_h", reply_ep)
        encoded = header.encode()
        pooled_buffer = payload if pooled else None  # back to the staging pool once UCX is done with it

        def send() -> None:
            addr, size = (payload.ctypes.data, payload.size) if payload is not None and payload.size else (0, 0)
            done = (lambda _status: staging.give(pooled_buffer)) if pooled_buffer is not None else None
            try:
                worker.send(ep, encoded, addr, size, keepalive=payload, on_done=done)
            except KvxferError as error:
                _log.warning("ucx: answering %s failed: %s", header.kind.name, error)

        worker.defer(send)
