"""The receiving side of the UCX backend's control messages: notifications for the agent, and the target's half
of staged transfers (SCATTER into / GATHER from our registered host regions, answered on the sender's reply
endpoint; DSCATTER / DGATHER for CUDA regions go to device_serve.py). Every descriptor a peer sends is checked
against our registered regions before a byte is touched.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ...errors import KvxferError
from ...handle import Notification
from .gather import check_spans, gather, scatter
from .replies import Replies
from .services import Services
from .wire import (
    MAX_CHUNK_FRAGMENTS,
    NOTIFY_OVERHEAD,
    Header,
    Kind,
    descs_nbytes,
    unpack_descs,
    unpack_notification,
    unpack_span,
)

_log = logging.getLogger("kvxfer.ucx")

#: Default cap on a notification's payload when the agent's context carries no ``limits`` (kvxfer.limits).
NOTIFICATION_NBYTES = 16 << 20


class Responder:
    """Handles every message our worker receives (the worker's :class:`~.binding.Receiver`; called under the
    worker lock, maybe inside a UCX callback)."""

    def __init__(self, services: Services, replies: Replies) -> None:
        self._services, self._replies = services, replies
        self._device_server = services.device_server
        self._host_view = services.regions.host_view
        limits = getattr(services.context, "limits", None)
        self.notification_nbytes = int(getattr(limits, "notification_nbytes", NOTIFICATION_NBYTES))
        # staged chunks: descriptors + one chunk of a peer configured like us, with room for a 4x larger one
        chunk = max(4 * services.config.stage_chunk, 64 << 20)
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
            limit = self.notification_nbytes + NOTIFY_OVERHEAD
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
        reason = check_spans(addr, nbytes, region, self._host_view)
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
            return self._services.ledger.placement(header, length)
        return 0

    def on_refused(self, head: bytes, reason: str, reply_ep: int) -> None:
        """A message refused by :meth:`too_large`: staged requests are answered FAIL (the sender stops waiting)."""
        header = Header.decode(head)
        if header is None:
            return
        if header.kind is Kind.NOTIFY:  # counted with the agent's own notification drops
            self._services.context.count_dropped("oversized")
        self._replies.refuse(header, reply_ep, reason)

    def on_message(self, head: bytes, data: Any, reply_ep: int) -> None:
        """Dispatch one message by kind; a malformed or refused one is answered FAIL (if its sender waits)."""
        header = Header.decode(head)
        if header is None:
            _log.warning("ucx: dropped a message with an unknown header (%d bytes)", len(head))
            return
        try:
            if header.kind is Kind.NOTIFY:
                sender, payload = unpack_notification(data)
                deliver = self._services.context.deliver
                self._services.outbox.post(lambda: deliver(Notification(sender, payload)))
            elif header.kind is Kind.SCATTER:
                self._scatter(header, data, reply_ep)
            elif header.kind is Kind.GATHER:
                self._gather(header, data, reply_ep)
            elif header.kind is Kind.SCATTER_SPAN:
                if data is not None:  # an eager payload (a rendezvous one landed in place already)
                    addr, nbytes, region = self._span(header, len(data))
                    scatter(np.frombuffer(data, dtype=np.uint8), addr, nbytes, region, self._host_view)
                self._replies.reply(reply_ep, Header(Kind.ACK, header.transfer, header.chunk))
            elif header.kind is Kind.GATHER_SPAN:
                addr, nbytes, region = self._span(header, None)
                out = self._services.staging.take(int(nbytes[0]))
                gather(out, addr, nbytes, region, self._host_view)
                self._replies.reply(reply_ep, Header(Kind.DATA, header.transfer, header.chunk), out, pooled=True)
            elif header.kind in (Kind.DSCATTER, Kind.DGATHER):
                self._device_server.accept(header, data, reply_ep)
            elif header.kind is Kind.DCOMMIT:
                self._device_server.commit(header, data, reply_ep)
            else:
                self._services.ledger.route_reply(header, data)
        except (ValueError, KvxferError) as error:
            _log.warning("ucx: bad %s message: %s", header.kind.name, error)
            self._replies.refuse(header, reply_ep, str(error))

    def _scatter(self, header: Header, data: Any, reply_ep: int) -> None:
        payload = np.frombuffer(data, dtype=np.uint8)
        addr, nbytes, region, rest = unpack_descs(payload, header.count)
        total = int(nbytes.sum(dtype=np.uint64))
        if rest.size != total:
            raise ValueError(f"SCATTER carries {rest.size} data bytes for descriptors totalling {total}")
        reason = check_spans(addr, nbytes, region, self._host_view)
        if reason is not None:
            raise ValueError(reason)
        scatter(rest, addr, nbytes, region, self._host_view)
        self._replies.reply(reply_ep, Header(Kind.ACK, header.transfer, header.chunk))

    def _gather(self, header: Header, data: Any, reply_ep: int) -> None:
        payload = np.frombuffer(data, dtype=np.uint8)
        addr, nbytes, region, _rest = unpack_descs(payload, header.count)
        reason = check_spans(addr, nbytes, region, self._host_view)
        if reason is not None:
            raise ValueError(reason)
        out = self._services.staging.take(int(nbytes.sum(dtype=np.uint64)))
        gather(out, addr, nbytes, region, self._host_view)
        self._replies.reply(reply_ep, Header(Kind.DATA, header.transfer, header.chunk), out, pooled=True)
