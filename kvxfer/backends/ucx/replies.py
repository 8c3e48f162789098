"""Answers of the target's side of staged transfers (ACK, DATA, GRANT, FAIL), sent on the reply endpoint UCX gave
with the message. Used by the responder (host chunks) and the device server (GPU chunks), under the worker lock."""

from __future__ import annotations

import logging

import numpy as np

from ...errors import KvxferError
from .binding import Worker
from .pool import BufferPool
from .wire import Header, Kind

_log = logging.getLogger("kvxfer.ucx")

#: Message kinds whose sender waits for an answer: a refusal of one is answered FAIL.
ANSWERED = frozenset(
    {Kind.SCATTER, Kind.GATHER, Kind.DSCATTER, Kind.DGATHER, Kind.DCOMMIT, Kind.SCATTER_SPAN, Kind.GATHER_SPAN}
)


class Replies:
    """Sends answers on reply endpoints, after the UCX callback that received the message (worker.defer)."""

    def __init__(self, worker: Worker, staging: BufferPool) -> None:
        self._worker, self._staging = worker, staging

    def refuse(self, header: Header, reply_ep: int, reason: str) -> None:
        """Answer FAIL with ``reason`` if the message ``header`` expects an answer."""
        if header.kind in ANSWERED:
            self.reply(
                reply_ep,
                Header(Kind.FAIL, header.transfer, header.chunk),
                np.frombuffer(reason.encode()[:1000], dtype=np.uint8).copy(),
            )

    def reply(self, reply_ep: int, header: Header, payload: np.ndarray | None = None, pooled: bool = False) -> None:
        """Send ``header`` (and ``payload``, uint8 host; a staging buffer returned to the pool once sent when
        ``pooled``) on ``reply_ep`` (an int ucp_ep_h; 0: the sender gave none)."""
        if not reply_ep:
            _log.warning("ucx: cannot answer %s: the sender gave no reply endpoint", header.kind.name)
            return
        worker, staging = self._worker, self._staging
        encoded = header.encode()
        pooled_buffer = payload if pooled else None  # back to the staging pool once UCX is done with it

        def send() -> None:
            addr, size = (payload.ctypes.data, payload.size) if payload is not None and payload.size else (0, 0)
            done = (lambda _status: staging.give(pooled_buffer)) if pooled_buffer is not None else None
            try:
                worker.send(reply_ep, encoded, addr, size, keepalive=payload, on_done=done)
            except KvxferError as error:
                _log.warning("ucx: answering %s failed: %s", header.kind.name, error)

        worker.defer(send)
