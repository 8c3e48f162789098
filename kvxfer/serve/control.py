"""The router <-> worker control link over zmq: one ROUTER socket on the router, one DEALER per worker.

Each end is an object that owns a thread and its sockets (zmq sockets are not thread-safe): ``send`` may be called
from any thread (frames travel to the link thread through an inproc pipe), received frames are decoded with
:func:`kvxfer.serve.protocol.decode` and handed to ``on_message`` on the link thread (keep it short: queue the
work). Bad frames are dropped and counted (``num_dropped``), never raised. Every queue is bounded: a frame that
cannot be queued (the peer is gone or far behind) is dropped and counted too.

Workers connect (``WorkerLink``); zmq reconnects by itself, and zmq heartbeats (ZMTP PING every 0.25 s, 1 s
timeout) notice a dead router even without TCP errors. ``WorkerLink.disconnected_s`` says how long the link has
been down; ``on_connect`` runs after each (re)connection (a worker registers there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..errors import ConfigError, HandshakeError
from . import protocol
from .protocol import AnyMessage, Message, TokensBatch

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

logger = logging.getLogger("kvxfer.serve")

HIGH_WATER_MARK = 10_000  # frames queued per socket direction before sends are dropped
POLL_S = 0.05


class _Link:
    """What both ends share: the socket, the inproc pipe for sends, the thread, the counters."""

    def __init__(self, kind: int, name: str) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(kind)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_NBYTES + 4096)
        endpoint = f"inproc://kvxfer-control-{id(self)}"
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.bind(endpoint)
        self._outbox = self._context.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._outbox.setsockopt(zmq.LINGER, 0)
        self._outbox.connect(endpoint)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kvxfer-control-{name}", daemon=True)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._inbox, zmq.POLLIN)
        self.num_dropped = 0  # received frames that were not valid messages
        self.num_unsent = 0  # frames that could not be queued or routed
        self.num_received = 0
        self.num_sent = 0
        self._closed = False

    def _queue(self, frames: list[bytes]) -> bool:
        with self._send_lock:
            if self._closed:
                self.num_unsent += 1
                return False
            try:
                self._outbox.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
                return True
            except zmq.ZMQError:
                self.num_unsent += 1
                return False

    def _run(self) -> None:
        while not self._stop.is_set():
            events = dict(self._poller.poll(int(POLL_S * 1000)))
            if self._inbox in events:
                self._forward()
            if self._socket in events:
                self._receive_all()
            self._tick(events)
        self._forward()  # whatever was queued before close

    def _forward(self) -> None:
        while True:
            try:
                frames = self._inbox.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
                self.num_sent += 1
            except zmq.ZMQError as error:  # EHOSTUNREACH (unknown worker) or EAGAIN (peer far behind)
                self.num_unsent += 1
                logger.debug("control link: frame not sent: %s", error)

    def _receive_all(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.num_received += 1
            self._received(frames)

    def _decode(self, frame: bytes) -> AnyMessage | None:
        try:
            return protocol.decode(frame)
        except HandshakeError as error:
            self.num_dropped += 1
            logger.warning("control link: dropped a bad frame (%d so far): %s", self.num_dropped, error)
            return None

    def _received(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def _tick(self, events: dict) -> None:
        """Per loop iteration (monitor events)."""

    def close(self, linger_s: float = 0.5) -> None:
        """Send what is queued (up to ``linger_s``), stop the thread, close the sockets."""
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._socket.setsockopt(zmq.LINGER, int(linger_s * 1000))
        self._close_extra()
        for sock in (self._outbox, self._inbox, self._socket):
            sock.close()
        self._context.term()

    def _close_extra(self) -> None:
        """Close sockets of a subclass (the thread has stopped)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RouterLink(_Link):
    """The router's end: a ROUTER socket bound at ``bind`` ("tcp://127.0.0.1:0" picks a port; see
    :attr:`address`). ``on_message(identity, message)``: identity is the worker's zmq routing id (its name,
    UTF-8); a TokensBatch is delivered as its Tokens one by one."""

    def __init__(self, bind: str, on_message: Callable[[bytes, AnyMessage], None]) -> None:
        super().__init__(zmq.ROUTER, "router")
        self._on_message = on_message
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown identities fail the send (counted)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker of the same name takes over
        try:
            self._socket.bind(bind)
        except zmq.ZMQError as error:
            self.close()
            raise ConfigError(f"RouterLink: cannot bind control address {bind!r}: {error}") from error
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread.start()

    def send(self, identity: bytes, message: Message) -> bool:
        """Queue ``message`` for the worker ``identity`` (False when it cannot be queued)."""
        return self._queue([identity, message.encode()])

    def _received(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.num_dropped += 1
            return
        message = self._decode(frames[1])
        if message is None:
            return
        items = message.items if isinstance(message, TokensBatch) else (message,)
        for item in items:
            self._on_message(frames[0], item)


class WorkerLink(_Link):
    """A worker's end: a DEALER with routing id ``identity`` connected to ``router`` ("tcp://host:port").
    ``on_message(message)`` for every valid message; ``on_connect()`` after every (re)connection."""

    def __init__(
        self,
        router: str,
        identity: str,
        on_message: Callable[[AnyMessage], None],
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(zmq.DEALER, identity)
        self._on_message, self._on_connect = on_message, on_connect
        self._socket.setsockopt(zmq.ROUTING_ID, identity.encode()[:255])
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, 250)
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1000)
        self._socket.setsockopt(zmq.HEARTBEAT_TTL, 2000)
        self._socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.connected = False
        self._down_since = time.monotonic()
        try:
            self._socket.connect(router)
        except zmq.ZMQError as error:
            self.close()
            raise ConfigError(f"WorkerLink: cannot connect to router {router!r}: {error}") from error
        self._thread.start()

    @property
    def disconnected_s(self) -> float:
        """Seconds since the link went down (since creation before the first connection); 0 while connected."""
        return 0.0 if self.connected else time.monotonic() - self._down_since

    def send(self, message: Message) -> bool:
        """Queue ``message`` for the router (False when it cannot be queued)."""
        return self._queue([message.encode()])

    def _received(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self.num_dropped += 1
            return
        message = self._decode(frames[0])
        if message is not None:
            self._on_message(message)

    def _tick(self, events: dict) -> None:
        if self._monitor not in events:
            return
        while True:
            try:
                event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                if self._on_connect is not None:
                    self._on_connect()
            elif event["event"] == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                self._down_since = time.monotonic()

    def _close_extra(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close()
