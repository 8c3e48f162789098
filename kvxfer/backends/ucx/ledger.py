"""The UCX backend's ledger of transfers: ids, the requests in flight, those waiting for answers from their target,
and GPU slots written off with a chunk that was never answered. Used under the worker lock."""

from __future__ import annotations

import itertools
from typing import Any, Protocol

from .wire import Header


class Tracked(Protocol):
    """A posted transfer as the ledger, its link and the progress thread see it (transfer.py's UcxRequest)."""

    id: int

    def advance(self) -> None:
        """Move forward if possible."""
        ...

    def halt(self) -> None:
        """Issue nothing more."""
        ...

    def fail(self, message: str, cause: BaseException | None = None) -> None:
        """End FAILED (first final state wins)."""
        ...


class AwaitsReplies(Tracked, Protocol):
    """A staged transfer: its target answers each chunk (staged.py)."""

    def placement(self, header: Header, length: int) -> int:
        """Where the DATA answer ``header`` (``length`` bytes) may land directly; 0: a pooled buffer."""
        ...

    def on_reply(self, header: Header, data: Any) -> None:
        """ACK / DATA / FAIL / GRANT for one chunk (``data`` valid only during the call)."""
        ...


class WrittenOff(Protocol):
    """A pool of GPU slots (device_slots.DeviceSlots) as far as written-off slots go."""

    def write_off(self, slot: int) -> None:
        """Forget a slot a peer may still touch."""
        ...

    def recover(self, slot: int) -> None:
        """A written-off slot's late answer came: the peer is done with it."""
        ...


class Ledger:
    """Transfers by id (see the module docstring)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.active: dict[int, Tracked] = {}
        self.awaiting: dict[int, AwaitsReplies] = {}
        self._abandoned: dict[tuple[int, int], tuple[WrittenOff, int]] = {}

    def next_id(self) -> int:
        """A new transfer id (unique within this backend)."""
        return next(self._ids)

    def add(self, request: Tracked) -> None:
        """A posted request, in flight until :meth:`retire`."""
        self.active[request.id] = request

    def expect_replies(self, request: AwaitsReplies) -> None:
        """Route ACK/DATA/FAIL/GRANT messages for ``request.id`` to it."""
        self.awaiting[request.id] = request

    def retire(self, request: Tracked) -> None:
        """Forget a final request."""
        self.active.pop(request.id, None)
        self.awaiting.pop(request.id, None)

    def placement(self, header: Header, length: int) -> int:
        """Where the DATA answer ``header`` (``length`` bytes) of one of our staged chunks may land directly (0: a
        pooled buffer). Inside a UCX callback."""
        request = self.awaiting.get(header.transfer)
        return request.placement(header, length) if request is not None else 0

    def route_reply(self, header: Header, data: Any) -> None:
        """An answer to one of our staged chunks."""
        request = self.awaiting.get(header.transfer)
        if request is not None:
            request.on_reply(header, data)
            return
        abandoned = self._abandoned.pop((header.transfer, header.chunk), None)
        if abandoned is not None:  # a late answer: the peer touches that slot no more
            abandoned[0].recover(abandoned[1])

    def abandon_slot(self, transfer: int, chunk: int, pool: WrittenOff, slot: int) -> None:
        """A finished transfer left ``slot`` with an unanswered chunk: written off until its answer comes."""
        pool.write_off(slot)
        self._abandoned[(transfer, chunk)] = (pool, slot)
