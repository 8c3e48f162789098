"""A tiny TCP side channel that serves an agent's metadata, optionally behind a shared token.

Wire format: the client sends ``b"KVX1"`` + u32 token length + token; the server answers ``b"OK"`` + u32 length +
metadata, or ``b"NO"`` + u32 length + a UTF-8 reason. Every socket operation has a deadline.
"""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
from typing import Callable

from .errors import ConfigError, HandshakeError, PeerError
from .metadata import MAX_METADATA_NBYTES

logger = logging.getLogger("kvxfer")

_HELLO = b"KVX1"
_MAX_TOKEN_NBYTES = 4096
_SERVER_IO_SECONDS = 5.0


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


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    chunks, remaining = [], count
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed with {remaining} of {count} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class SideChannelServer:
    """Serves ``get_metadata()`` to whoever presents ``token`` (or to anyone when token is None)."""

    def __init__(self, listen: str, get_metadata: Callable[[], bytes], token: str | None = None) -> None:
        host, port = parse_address(listen)
        if token is not None and (not isinstance(token, str) or len(token.encode()) > _MAX_TOKEN_NBYTES):
            raise ConfigError(f"token must be a string of <= {_MAX_TOKEN_NBYTES} bytes")
        if token is None and host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning("side channel on %s serves metadata to anyone: pass token= to require a secret", listen)
        self._token = None if token is None else token.encode()
        self._get_metadata = get_metadata
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=64)
        self._socket.settimeout(0.2)
        bound_host, bound_port = self._socket.getsockname()[:2]
        self.address = f"[{bound_host}]:{bound_port}" if family == socket.AF_INET6 else f"{bound_host}:{bound_port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"kvxfer-sidechannel-{bound_port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(_SERVER_IO_SECONDS)
            try:
                hello = _recv_exact(connection, 8)
                if hello[:4] != _HELLO:
                    return
                (length,) = struct.unpack("!I", hello[4:])
                if length > _MAX_TOKEN_NBYTES:
                    self._reply(connection, b"NO", b"token too long")
                    return
                token = _recv_exact(connection, length)
                if self._token is not None and not hmac.compare_digest(token, self._token):
                    self._reply(connection, b"NO", b"bad token")
                    return
                self._reply(connection, b"OK", self._get_metadata())
            except (OSError, ConnectionError) as error:
                logger.debug("side channel: client dropped: %s", error)
            except Exception as error:  # e.g. the agent closed while answering: tell the client, keep serving
                self._reply(connection, b"NO", f"server error: {error}".encode()[:1024])

    @staticmethod
    def _reply(connection: socket.socket, status: bytes, body: bytes) -> None:
        try:
            connection.sendall(status + struct.pack("!I", len(body)) + body)
        except OSError:
            pass

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._stop.set()
        self._socket.close()
        self._thread.join(timeout=2.0)


def fetch_metadata(address: str, token: str | None, timeout: float) -> bytes:
    """Ask the side channel at ``address`` for its agent's metadata, within ``timeout`` seconds."""
    host, port = parse_address(address)
    secret = b"" if token is None else token.encode()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_HELLO + struct.pack("!I", len(secret)) + secret)
            status = _recv_exact(sock, 2)
            (length,) = struct.unpack("!I", _recv_exact(sock, 4))
            if length > MAX_METADATA_NBYTES:
                raise HandshakeError(f"side channel {address} sent {length} bytes, over the metadata cap")
            body = _recv_exact(sock, length)
    except (OSError, ConnectionError) as error:
        raise PeerError(f"side channel {address} unreachable: {error}") from error
    if status == b"NO":
        raise HandshakeError(f"side channel {address} refused: {body.decode(errors='replace')}")
    if status != b"OK":
        raise HandshakeError(f"side channel {address} answered with an unknown status {status!r}")
    return body
