"""The router's end of the control link on its asyncio loop: no link thread, no hop between threads.

:class:`kvxfer.serve.control.RouterLink` owns a thread: every frame the router sends crosses to it through an
inproc pipe, and every frame it receives crosses back with ``call_soon_threadsafe``. Each crossing waits for the
GIL and a thread wake-up — on a busy host most of the router's added time to first token. :class:`LoopRouterLink`
keeps the same ROUTER socket, options, bounds and counters but does everything on the loop that runs the router:
``send`` writes the frame at once (non-blocking), and the loop watches the socket's file descriptor.

zmq's descriptor is edge-triggered: it signals that *something* changed, and only ``EVENTS`` says whether frames
are waiting. So the reader drains while ``EVENTS`` has POLLIN (at most :data:`BATCH` frames per turn, then it
yields to the loop and comes back), and every send schedules one more check (a send can consume the edge).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from ..errors import ConfigError, HandshakeError
from . import protocol
from .control import HIGH_WATER_MARK
from .protocol import AnyMessage, Message, TokensBatch

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger("kvxfer.serve")

BATCH = 256  # frames handled per loop turn before yielding to other callbacks


class LoopRouterLink:
    """A ROUTER socket bound at ``bind`` served on ``loop`` (call every method on that loop's thread).
    ``on_message(identity, message)`` runs on the loop for every valid message (a TokensBatch as its Tokens)."""

    def __init__(
        self, bind: str, on_message: Callable[[bytes, AnyMessage], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._on_message, self._loop = on_message, loop
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        for option, value in (
            (zmq.LINGER, 0),
            (zmq.SNDHWM, HIGH_WATER_MARK),
            (zmq.RCVHWM, HIGH_WATER_MARK),
            (zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_NBYTES + 4096),
            (zmq.ROUTER_MANDATORY, 1),  # unknown identities fail the send (counted)
            (zmq.ROUTER_HANDOVER, 1),  # a restarted worker of the same name takes over
        ):
            self._socket.setsockopt(option, value)
        self.num_dropped = 0  # received frames that were not valid messages
        self.num_unsent = 0  # frames that could not be routed or queued
        self.num_received = 0
        self.num_sent = 0
        self._closed = False
        self._check_scheduled = False
        try:
            self._socket.bind(bind)
        except zmq.ZMQError as error:
            self._socket.close()
            self._context.term()
            raise ConfigError(f"LoopRouterLink: cannot bind control address {bind!r}: {error}") from error
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._fd = int(self._socket.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self._readable)
        self._schedule_check()  # frames may have arrived between bind and add_reader

    def send(self, identity: bytes, message: Message) -> bool:
        """Send ``message`` to the worker ``identity`` now (False, counted, when it cannot be routed or queued)."""
        if self._closed:
            self.num_unsent += 1
            return False
        payload = message.encode()
        try:
            self._socket.send_multipart([identity, payload], flags=zmq.NOBLOCK, copy=len(payload) < 65536)
            self.num_sent += 1
            return True
        except zmq.ZMQError as error:  # EHOSTUNREACH (unknown worker) or EAGAIN (peer far behind)
            self.num_unsent += 1
            logger.debug("control link: frame not sent: %s", error)
            return False
        finally:
            self._schedule_check()

    def _schedule_check(self) -> None:
        if not self._check_scheduled and not self._closed:
            self._check_scheduled = True
            self._loop.call_soon(self._readable)

    def _readable(self) -> None:
        self._check_scheduled = False
        for _ in range(BATCH):
            if self._closed or not int(self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            try:
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.num_received += 1
            self._received(frames)
        self._schedule_check()  # more may be waiting: come back after other callbacks ran

    def _received(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.num_dropped += 1
            return
        try:
            message = protocol.decode(frames[1])
        except HandshakeError as error:
            self.num_dropped += 1
            logger.warning("control link: dropped a bad frame (%d so far): %s", self.num_dropped, error)
            return
        items = message.items if isinstance(message, TokensBatch) else (message,)
        for item in items:
            self._on_message(frames[0], item)

    def close(self, linger_s: float = 0.5) -> None:
        """Stop watching the socket; frames already sent get up to ``linger_s`` to leave; close."""
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._socket.setsockopt(zmq.LINGER, int(linger_s * 1000))
        self._socket.close()
        self._context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
