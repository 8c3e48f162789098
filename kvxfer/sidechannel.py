"""A tiny TCP side channel that serves an agent's metadata, optionally behind a shared token.

Wire format (version 2, fixed-size request): the client sends ``b"KVX2"`` + a 16-byte fresh nonce (its time in ns,
then 8 random bytes: nonces.py) + a 32-byte proof (HMAC-SHA256 of the nonce under the token; zeros without one). A
server with a token accepts each nonce once and only while fresh (``Limits.metadata_max_age``), so a replayed
request is refused. The server answers ``b"OK"`` + u32 length + metadata
+ a 32-byte MAC of (nonce, metadata) under the token, or ``b"NO"`` + u32 length + a UTF-8 reason. A client holding a
token checks the MAC before it hands a byte of the metadata on (signature.py), so an answer from anyone without the
token never reaches the decoder or a backend; the token itself never travels.

The server is one thread and a selector: any number of slow clients cost it a file descriptor each, never a
thread. It serves at most ``Limits.side_channel_connections`` connections at once (a new one beyond that evicts
the oldest still-unanswered one, so a crowd of stalled clients cannot lock legitimate ones out; a round of the loop
accepts at most half that many and reads what arrived before accepting more, so a fresh connection whose request
trails its connect is read before newer ones can push it out) and gives each
``Limits.side_channel_request_seconds`` in all. The client's ``timeout`` is a total deadline too.
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from .errors import ConfigError, HandshakeError, PeerError
from .limits import Limits
from .metadata import MAX_METADATA_NBYTES
from .nonces import NonceBook, fresh_nonce
from .signature import MAC_NBYTES, NONCE_NBYTES, hello_proof, reply_mac, same, token_key

logger = logging.getLogger("kvxfer")

HELLO = b"KVX2"
REQUEST_NBYTES = len(HELLO) + NONCE_NBYTES + MAC_NBYTES
_MAX_REASON_NBYTES = 1024


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    if not isinstance(address, str) or ":" not in address:
        raise ConfigError(f"address must be 'host:port', got {address!r}")
    host, _, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"address must be 'host:port' with a numeric port, got {address!r}") from None
    if not host or not 0 <= port < 65536:
        raise ConfigError(f"address must be 'host:port' with port in [0, 65535], got {address!r}")
    return host, port


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def answer(request: bytes, key: bytes, get_metadata: Callable[[], bytes], nonces: NonceBook | None = None) -> bytes:
    """The server's whole reply to a complete ``request`` of REQUEST_NBYTES bytes (fuzzed on its own). With
    ``nonces``, an authenticated request's nonce must be fresh and unused (a replayed request is refused)."""
    if len(request) != REQUEST_NBYTES or request[:4] != HELLO:
        return _refusal(b"not a kvxfer side-channel request (version 2)")
    nonce, proof = request[4 : 4 + NONCE_NBYTES], request[4 + NONCE_NBYTES :]
    if key and not same(proof, hello_proof(key, nonce)):
        return _refusal(b"bad token")
    why = nonces.refusal(nonce) if nonces is not None and key else None
    if why is not None:
        return _refusal(f"request refused: {why}".encode())
    try:
        metadata = get_metadata()
    except Exception as error:  # noqa: BLE001 e.g. the agent closed while answering: tell the client, keep serving
        return _refusal(f"server error: {type(error).__name__}: {error}".encode())
    return b"OK" + struct.pack("!I", len(metadata)) + metadata + reply_mac(key, nonce, metadata)


def _refusal(reason: bytes) -> bytes:
    reason = reason[:_MAX_REASON_NBYTES]
    return b"NO" + struct.pack("!I", len(reason)) + reason


class _Connection:
    """One client: what it sent so far, what is left to send, and when it must be done."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline
        self.received = bytearray()
        self.reply: memoryview | None = None


class SideChannelServer:
    """Serves ``get_metadata()`` to whoever proves it holds ``token`` (or to anyone when token is None).

    A token is required on any address but loopback unless ``allow_unauthenticated`` opts in to serving anyone.
    ``served`` and ``shed`` count answered and evicted connections.
    """

    def __init__(
        self,
        listen: str,
        get_metadata: Callable[[], bytes],
        token: str | None = None,
        limits: Limits | None = None,
        allow_unauthenticated: bool = False,
    ) -> None:
        host, port = parse_address(listen)
        self._key = token_key(token)
        if len(self._key) > 4096:
            raise ConfigError(f"token must be <= 4096 bytes, got {len(self._key)}")
        if token is None and not is_loopback(host):
            if not allow_unauthenticated:
                raise ConfigError(
                    f"listen={listen!r} would serve this agent's metadata to anyone who reaches it: "
                    "pass token= (recommended) or allow_unauthenticated=True"
                )
            logger.warning("side channel on %s serves metadata to anyone (allow_unauthenticated=True)", listen)
        self._limits = limits or Limits()
        self._get_metadata = get_metadata
        self._nonces = NonceBook(self._limits.handshake_nonces, self._limits.metadata_max_age)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._socket = socket.create_server((host, port), family=family, backlog=128)
        except OSError as error:
            raise ConfigError(f"listen={listen!r}: cannot listen there: {error}") from error
        self._socket.setblocking(False)
        bound_host, bound_port = self._socket.getsockname()[:2]
        self.address = f"[{bound_host}]:{bound_port}" if family == socket.AF_INET6 else f"{bound_host}:{bound_port}"
        self._connections: dict[int, _Connection] = {}  # by fd, oldest first
        self.served = 0
        self.shed = 0
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._socket, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"kvxfer-sidechannel-{bound_port}", daemon=True)
        self._thread.start()

    @property
    def open_connections(self) -> int:
        """Client connections held right now."""
        return len(self._connections)

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                timeout = 0.5
                if self._connections:
                    oldest_deadline = min(c.deadline for c in self._connections.values())
                    timeout = max(0.0, min(timeout, oldest_deadline - time.monotonic()))
                events = self._selector.select(timeout)
                for key, mask in events:  # connections first: a request that arrived is served before new accepts
                    if key.data == "wake":
                        return
                    if key.data != "accept":
                        self._step(key.data, mask)
                if any(key.data == "accept" for key, _ in events):
                    self._accept()
                self._expire()
        finally:
            for connection in list(self._connections.values()):
                self._drop(connection)

    def _accept(self) -> None:
        for _ in range(max(1, self._limits.side_channel_connections // 2)):
            try:
                sock, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. out of file descriptors: the clients waiting will retry
                logger.warning("side channel %s: accept failed: %s", self.address, error)
                return
            sock.setblocking(False)
            connection = _Connection(sock, time.monotonic() + self._limits.side_channel_request_seconds)
            if self._answer_at_once(connection):
                continue
            if len(self._connections) >= self._limits.side_channel_connections:
                self._drop(next(iter(self._connections.values())))  # the oldest: it had the most time
                self.shed += 1
            self._connections[sock.fileno()] = connection
            events = selectors.EVENT_READ if connection.reply is None else selectors.EVENT_WRITE
            self._selector.register(sock, events, connection)

    def _answer_at_once(self, connection: _Connection) -> bool:
        """Serve a client whose whole request is already here without giving it a slot (a legitimate client
        sends it at once): True when it is done with."""
        try:
            request = connection.sock.recv(REQUEST_NBYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            connection.sock.close()
            return True
        if not request:  # closed before it sent anything
            connection.sock.close()
            return True
        if len(request) < REQUEST_NBYTES and request[:4] == HELLO[: len(request[:4])]:
            connection.received += request  # a plausible start: the rest comes later, in a slot
            return False
        try:
            reply = answer(request, self._key, self._get_metadata, self._nonces)
            sent = connection.sock.send(reply)
        except OSError:
            connection.sock.close()
            return True
        if sent == len(reply):
            self.served += 1
            connection.sock.close()
            return True
        connection.reply = memoryview(reply)[sent:]  # the rest goes out as the client reads
        return False

    def _step(self, connection: _Connection, mask: int) -> None:
        try:
            if connection.reply is None:
                chunk = connection.sock.recv(REQUEST_NBYTES - len(connection.received))
                if not chunk:
                    self._drop(connection)
                    return
                connection.received += chunk
                if (
                    len(connection.received) == REQUEST_NBYTES
                    or connection.received[:4] != HELLO[: len(connection.received[:4])]
                ):
                    connection.reply = memoryview(
                        answer(bytes(connection.received), self._key, self._get_metadata, self._nonces)
                    )
                    self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
            if connection.reply is not None and mask & selectors.EVENT_WRITE:
                sent = connection.sock.send(connection.reply)
                connection.reply = connection.reply[sent:]
                if not connection.reply.nbytes:
                    self.served += 1
                    self._drop(connection)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            logger.debug("side channel: client dropped: %s", error)
            self._drop(connection)

    def _expire(self) -> None:
        now = time.monotonic()
        for connection in [c for c in self._connections.values() if c.deadline <= now]:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        if self._connections.pop(fd, None) is None:
            return
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()

    def close(self) -> None:
        """Stop serving, close every connection and the socket."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5.0)
        self._selector.close()
        self._socket.close()
        self._wake_read.close()
        self._wake_write.close()


def _recv_exact(sock: socket.socket, count: int, deadline: float) -> bytes:
    chunks, remaining = [], count
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the total deadline passed")
        sock.settimeout(left)
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed with {remaining} of {count} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def fetch_metadata(address: str, token: str | None, timeout: float) -> bytes:
    """Ask the side channel at ``address`` for its agent's metadata, within ``timeout`` seconds in all.

    With ``token``, the answer must carry a MAC under it (HandshakeError otherwise), checked before return."""
    host, port = parse_address(address)
    key = token_key(token)
    nonce = fresh_nonce()
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=max(timeout, 1e-3)) as sock:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            sock.sendall(HELLO + nonce + hello_proof(key, nonce))
            return read_reply(sock, address, key, nonce, deadline)
    except TimeoutError:
        raise PeerError(f"side channel {address} unreachable: no complete answer within {timeout} s") from None
    except (OSError, ConnectionError) as error:
        raise PeerError(f"side channel {address} unreachable: {error}") from error


def read_reply(sock: socket.socket, address: str, key: bytes, nonce: bytes, deadline: float) -> bytes:
    """The metadata in the server's reply on ``sock``, authenticated when ``key`` is not empty (HandshakeError for
    a refusal, a malformed or an unauthenticated reply; OSError / TimeoutError from the socket)."""
    status = _recv_exact(sock, 2, deadline)
    (length,) = struct.unpack("!I", _recv_exact(sock, 4, deadline))
    if status == b"NO":
        reason = _recv_exact(sock, min(length, _MAX_REASON_NBYTES), deadline)
        raise HandshakeError(f"side channel {address} refused: {reason.decode(errors='replace')}")
    if status != b"OK":
        raise HandshakeError(f"side channel {address} answered with an unknown status {status!r}")
    if length > MAX_METADATA_NBYTES:
        raise HandshakeError(f"side channel {address} sent {length} bytes, over the metadata cap")
    body = _recv_exact(sock, length, deadline)
    mac = _recv_exact(sock, MAC_NBYTES, deadline)
    if key and not same(mac, reply_mac(key, nonce, body)):
        raise HandshakeError(
            f"side channel {address} did not prove it holds the token: its answer does not authenticate"
        )
    return body
