"""Who sent a notification: the sender's name bound to the agent instance that first spoke under it.

Backends report a notification's sender by a name that, over the network, is only a claim (UCX carries the name
inside the message). So the agent frames every notification it sends (backends carry opaque bytes)::

    b"KVN" + kind (1 byte) + sender uid tag (16 bytes) + key (16 bytes) + certificate (16 bytes) + payload

``uid tag``: the first 16 bytes of SHA-256 of the sender agent's uid. ``key``: 16 bytes derived from a random
secret of the sending agent and the *receiver's* uid (HMAC-SHA256), so every (sender, receiver) pair has its own
key and a receiver cannot replay the key it was given to speak as that sender to a third agent. ``kind``: DATA
(deliver the payload), HELLO (sent when the sender connects: it binds the name before any data flows) or BYE (sent
when it disconnects: it releases the name). ``certificate``: when the sender connected under a token, an HMAC under
it of (sender name, uid tag, key); zeros otherwise.

The receiver (:class:`SenderBook`) binds a name to the first (uid tag, key) that speaks under it and then drops
and counts (reason "sender mismatch") every notification claiming that name with another key; a BYE under the
bound key releases the name. A name bound to one agent instance passes to another uid only when the receiver is
itself connected to that name and the metadata it accepted carries the new uid (the peer restarted and was
reconnected), or — on a receiver with a token (``Agent(listen=..., token=...)``) — when the new speaker's
certificate verifies under that token and the holder's did not (a token holder takes its name back from anyone
without the token; a name bound under a certificate is never taken by a speaker without one). Peers that
connected without a token (unsigned metadata handed over out of band) still notify a receiver with a token: their
names are bound first-come, as on a receiver without one. While the receiver is connected to a name, only the uid
in that peer's metadata may bind it. The book holds at most ``Limits.notification_senders`` names; new names beyond
that are dropped ("senders full"), never evicting a bound one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import KvxferError

if TYPE_CHECKING:
    from .peer import Peer

logger = logging.getLogger("kvxfer")

HEAD_NBYTES = 52
_MAGIC = b"KVN"
DATA, HELLO, BYE = 0, 1, 2
_KEY_DOMAIN = b"kvxfer-notification-key\0"
_CERT_DOMAIN = b"kvxfer-notification-sender\0"
_LOG_EVERY_SECONDS = 5.0


def _certificate(token_key: bytes, name: str, tag: bytes, key: bytes) -> bytes:
    if not token_key:
        return bytes(16)
    return hmac.new(token_key, _CERT_DOMAIN + name.encode() + b"\0" + tag + key, hashlib.sha256).digest()[:16]


def uid_tag(uid: str) -> bytes:
    """The 16-byte tag of an agent uid carried in every frame."""
    return hashlib.sha256(uid.encode()).digest()[:16]


class SenderKeys:
    """The sending side: frame headers for the notifications this agent sends to each receiver."""

    def __init__(self, uid: str) -> None:
        self._tag = uid_tag(uid)
        self._secret = os.urandom(32)

    def header(self, receiver_uid: str, name: str = "", token_key: bytes = b"", kind: int = DATA) -> bytes:
        """The frame header of a notification of ``kind`` from the agent called ``name`` to the agent whose uid
        is ``receiver_uid``, certified under ``token_key`` (the token the connection was authenticated under; b"":
        none)."""
        key = hmac.new(self._secret, _KEY_DOMAIN + receiver_uid.encode(), hashlib.sha256).digest()[:16]
        return _MAGIC + bytes((kind,)) + self._tag + key + _certificate(token_key, name, self._tag, key)

    def announce(self, peer: Peer, kind: int) -> None:
        """Tell ``peer`` that we start (HELLO) or stop (BYE) speaking to it under our name; best effort (a peer
        that misses a HELLO binds us at our first notification; one that misses a BYE keeps the name bound)."""
        frame = peer.notify_header[:3] + bytes((kind,)) + peer.notify_header[4:]
        try:
            peer.connections[0].notify(frame)
        except (KvxferError, OSError) as error:
            logger.debug("could not announce kind %d to %s: %s", kind, peer.name, error)


@dataclass
class _Binding:
    tag: bytes
    key: bytes
    certified: bool


class SenderBook:
    """The receiving side: which agent instance (uid tag, key) speaks under each sender name.

    ``connected_tag(name)``: the uid tag of the connected peer named ``name`` (from the metadata this agent
    accepted), or None when it is not connected to one. ``count_dropped(reason)``: counts a refused frame.
    ``token_key``: this agent's token (b"": none); with one, a certified speaker outranks an uncertified one.
    """

    def __init__(
        self,
        capacity: int,
        connected_tag: Callable[[str], bytes | None],
        count_dropped: Callable[[str], None],
        token_key: bytes = b"",
    ) -> None:
        self._capacity = capacity
        self._token_key = token_key
        self._connected_tag = connected_tag
        self._count_dropped = count_dropped
        self._bindings: dict[str, _Binding] = {}
        self._lock = threading.Lock()
        self._last_log = 0.0

    def open(self, name: str, frame: bytes) -> bytes | None:
        """The payload of ``frame``, claimed to come from ``name``, when it is a DATA frame from the agent bound to
        that name; None otherwise (a refused frame is counted; HELLO and BYE are consumed here)."""
        if len(frame) < HEAD_NBYTES or frame[:3] != _MAGIC or frame[3] > BYE:
            self._refuse("unframed", name)
            return None
        kind, tag, key = frame[3], frame[4:20], frame[20:36]
        anchor = self._connected_tag(name)
        if anchor is not None and not hmac.compare_digest(anchor, tag):
            self._refuse("sender mismatch", name)
            return None
        with self._lock:
            bound = self._bindings.get(name)
            if bound is not None and hmac.compare_digest(bound.tag, tag):
                if not hmac.compare_digest(bound.key, key):
                    self._refuse("sender mismatch", name)
                    return None
                if kind == BYE:
                    del self._bindings[name]
                return frame[HEAD_NBYTES:] if kind == DATA else None
            certified = bool(self._token_key) and hmac.compare_digest(
                frame[36:52], _certificate(self._token_key, name, tag, key)
            )
            if bound is not None and anchor is None and (bound.certified or not certified):
                self._refuse("sender mismatch", name)  # another instance holds the name
                return None
            if kind == BYE:
                return None
            if bound is None and len(self._bindings) >= self._capacity:
                self._refuse("senders full", name)
                return None
            # a new name, a peer we reconnected to under a new uid, or a token holder taking its name back
            self._bindings[name] = _Binding(bytes(tag), bytes(key), certified)
        return frame[HEAD_NBYTES:] if kind == DATA else None

    def _refuse(self, reason: str, name: str) -> None:
        self._count_dropped(reason)
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_SECONDS:  # a flood of forgeries must not flood the log too
            self._last_log = now
            logger.warning("dropped a notification claiming to come from %r: %s", name, reason)

    def bound(self, name: str) -> bool:
        """True while ``name`` is bound to an agent instance."""
        with self._lock:
            return name in self._bindings
