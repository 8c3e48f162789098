"""Same-host messaging for the CUDA IPC backend over Unix sockets (Linux abstract namespace).

One server per backend. Peers keep one connection open for notifications; its end is how either side learns the
other process died. VMM file descriptors travel on short connections with SCM_RIGHTS. Every request carries the
server's secret (published only in the agent metadata), so knowing the socket name is not enough.
Frames: u32 big-endian length + msgpack list.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from ...errors import PeerDisconnectedError, PeerError

logger = logging.getLogger("kvxfer")
_MAX_FRAME = 1 << 20
_MAX_FDS = 4096


def _send(sock: socket.socket, message: list[Any], fds: list[int] | None = None) -> None:
    body = msgpack.packb(message, use_bin_type=True)
    frame = struct.pack("!I", len(body)) + body
    if fds:
        socket.send_fds(sock, [frame], fds)
    else:
        sock.sendall(frame)


def _recv(sock: socket.socket, with_fds: bool = False) -> tuple[list[Any] | None, list[int]]:
    """One frame (None at end of stream) and any file descriptors that came with it."""
    fds: list[int] = []
    if with_fds:
        data, fds, _, _ = socket.recv_fds(sock, _MAX_FRAME + 4, _MAX_FDS)
    else:
        data = sock.recv(4)
    if not data:
        return None, fds
    while len(data) < 4:
        more = sock.recv(4 - len(data))
        if not more:
            return None, fds
        data += more
    (length,) = struct.unpack("!I", data[:4])
    if length > _MAX_FRAME:
        raise PeerError(f"mailbox frame of {length} bytes is over the {_MAX_FRAME}-byte cap")
    body = data[4:]
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None, fds
        body += chunk
    message = msgpack.unpackb(body, raw=False)
    if not isinstance(message, list) or not message:
        raise PeerError("mailbox frame is not a message")
    return message, fds


class _Notes:
    """One connection's notifications in arrival order: delivered at once, or held (with every later one) until the
    sender's "done" for the held one comes."""

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        self._held: list[list[Any]] = []  # [sequence or None, payload, ready]

    @property
    def held(self) -> bool:
        return bool(self._held)

    def ready(self, payload: bytes) -> None:
        self._held.append([None, payload, True])
        self._flush()

    def hold(self, sequence: int, payload: bytes) -> None:
        self._held.append([sequence, payload, False])

    def done(self, sequence: int, landed: bool) -> None:
        """The copy behind ``sequence`` completed (``landed``) or failed (its notification is dropped)."""
        for entry in self._held:
            if entry[0] == sequence:
                entry[2] = True
                if not landed:
                    entry[1] = None
        self._flush()

    def _flush(self) -> None:
        while self._held and self._held[0][2]:
            payload = self._held.pop(0)[1]
            if payload is not None:
                self._deliver(payload)


def _open(sock: socket.socket) -> bool:
    """False once the other end closed ``sock`` (checked without consuming or blocking)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


class Mailbox:
    """Receives notifications and fd requests; sends notifications; watches peers' connections."""

    def __init__(
        self,
        uid: str,
        on_note: Callable[[str, bytes], None],
        on_lost: Callable[[str, str, str], None],
        fds_of: Callable[[int], tuple[list[int], list[int]]],
        await_event: Callable[[bytes, Callable[[], bool]], bool | None] | None = None,
    ) -> None:
        self.address = f"\0kvxfer-ipc-{uid}-{os.getpid()}"
        self.secret = secrets.token_bytes(16)
        self._on_note, self._on_lost, self._fds_of = on_note, on_lost, fds_of
        self._await_event = await_event
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.address)
        self._server.listen(64)
        self._server.settimeout(0.2)
        self._closed = threading.Event()
        self._outgoing: dict[str, socket.socket] = {}
        self._send_lock = threading.Lock()
        threading.Thread(target=self._accept, name="kvxfer-ipc-mailbox", daemon=True).start()

    # ---- server side -------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        peer_uid, peer_name = None, ""
        with connection:
            try:
                message, _ = _recv(connection)
                if message is None or len(message) < 3 or message[1] != self.secret:
                    return
                kind, peer_uid = message[0], str(message[2])
                if kind == "fds":
                    fds, chunks = self._fds_of(int(message[3]))
                    _send(connection, ["fds", chunks], fds)
                    return
                if kind != "hello":
                    return
                peer_name = str(message[3])
                notes = _Notes(lambda payload: self._on_note(peer_name, payload))
                while not self._closed.is_set():
                    message, _ = _recv(connection)
                    if message is None:
                        break
                    if message[0] == "note":
                        notes.ready(bytes(message[1]))
                    elif message[0] == "note_after":
                        # sent as the copy started: deliver once the copy's event completes (dropped if the sender
                        # died first); if the event cannot be waited on here, once the sender's "done" comes
                        outcome = None
                        if self._await_event is not None and not notes.held:
                            outcome = self._await_event(bytes(message[1]), lambda: _open(connection))
                        if outcome is None:
                            notes.hold(int(message[3]), bytes(message[2]))
                        elif outcome:
                            notes.ready(bytes(message[2]))
                    elif message[0] == "done":
                        notes.done(int(message[1]), bool(message[2]))
            except Exception as error:  # noqa: BLE001 a broken or hostile client ends its own connection only
                logger.debug("cuda_ipc mailbox: connection ended: %s", error)
            if peer_uid is not None and not self._closed.is_set():
                self._on_lost(peer_uid, peer_name, "its connection closed (process ended?)")

    # ---- client side -------------------------------------------------------------------------------------------

    def _dial(self, address: str, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as error:
            sock.close()
            raise PeerDisconnectedError(f"cuda_ipc: peer mailbox unreachable: {error}") from None
        return sock

    def open(
        self, peer_uid: str, peer_name: str, address: str, secret: bytes, me: tuple[str, str], timeout: float
    ) -> None:
        """Keep a connection to a peer's mailbox; its end reports the peer lost. ``me``: (uid, name)."""
        sock = self._dial(address, timeout)
        _send(sock, ["hello", secret, me[0], me[1]])
        sock.settimeout(None)
        self._outgoing[peer_uid] = sock
        threading.Thread(target=self._watch, args=(peer_uid, peer_name, sock), daemon=True).start()

    def _watch(self, peer_uid: str, peer_name: str, sock: socket.socket) -> None:
        try:
            while sock.recv(64):
                pass
        except OSError:
            pass
        if self._outgoing.get(peer_uid) is sock and not self._closed.is_set():
            self._on_lost(peer_uid, peer_name, "its mailbox connection closed (process ended?)")

    def send_note(self, peer_uid: str, payload: bytes) -> None:
        """Send a notification on the open connection to ``peer_uid``."""
        self._send_to(peer_uid, ["note", payload])

    def send_note_after(self, peer_uid: str, event_handle: bytes, payload: bytes, sequence: int) -> None:
        """Send a notification the peer delivers once the interprocess event ``event_handle`` completes (or, if it
        cannot wait on that event, once :meth:`send_done` says so for ``sequence``)."""
        self._send_to(peer_uid, ["note_after", event_handle, payload, sequence])

    def send_done(self, peer_uid: str, sequence: int, landed: bool = True) -> None:
        """Tell the peer the copy behind notification ``sequence`` completed (``landed``) or failed."""
        self._send_to(peer_uid, ["done", sequence, landed])

    def _send_to(self, peer_uid: str, message: list[Any]) -> None:
        sock = self._outgoing.get(peer_uid)
        if sock is None:
            raise PeerDisconnectedError("cuda_ipc: no open connection to the peer")
        try:
            with self._send_lock:
                _send(sock, message)
        except OSError as error:
            raise PeerDisconnectedError(f"cuda_ipc: sending to the peer failed: {error}") from None

    def fetch_fds(
        self, address: str, secret: bytes, my_uid: str, region_index: int, timeout: float
    ) -> tuple[list[int], Any]:
        """File descriptors (and chunk sizes) of a peer region's VMM allocation."""
        with self._dial(address, timeout) as sock:
            _send(sock, ["fds", secret, my_uid, region_index])
            message, fds = _recv(sock, with_fds=True)
        if message is None or message[0] != "fds":
            for fd in fds:
                os.close(fd)
            raise PeerError(f"cuda_ipc: peer sent no file descriptors for region {region_index}")
        return fds, message[1]

    def close_peer(self, peer_uid: str) -> None:
        """Close the connection to ``peer_uid`` (without reporting it lost)."""
        sock = self._outgoing.pop(peer_uid, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Stop serving and close every connection."""
        self._closed.set()
        self._server.close()
        for peer_uid in list(self._outgoing):
            self.close_peer(peer_uid)
