"""Control messages between agents: typed, versioned, validated, on one channel per agent; and the Service
protocol of what an agent runs for its users over that channel (block leases, layer announcements).

kvxfer's own protocols (block leases, layer announcements, the engine connectors' notes) ride on notifications
whose payload starts with :data:`PREFIX`: msgpack ``[version, kind, [fields]]``. Every message is a frozen
dataclass with a ``KIND``; decoding checks the version, the kind, the number and type of every field and their
sizes, and raises :class:`~kvxfer.errors.HandshakeError` for anything else. An agent's :class:`ControlChannel`
(``agent.control``) sends messages and hands each one received to the handlers registered for its type.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import astuple, dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias, TypeVar

import msgpack

from .errors import HandshakeError, KvxferError

if TYPE_CHECKING:
    from .peer import Peer

logger = logging.getLogger("kvxfer")

#: notifications starting with these bytes are control messages (reserved: Agent.subscribe refuses them)
PREFIX = b"kvx:"
#: the format version this side writes and reads
VERSION = 1
MAX_KEY = 1024  # bytes of a lease or request key
MAX_LAYER = 1 << 16  # layer ids are below this
MAX_TEXT = 1024  # characters of a request id
_MAX_MESSAGE = 1 << 20  # bytes of one encoded message


class LeaseVerb(str, Enum):
    """What a lease message says: RENEW (receiver -> sender), ACK / EXPIRED (the sender's answer), RELEASE
    (receiver -> sender: the blocks may be freed)."""

    RENEW = "renew"
    ACK = "ack"
    RELEASE = "release"
    EXPIRED = "expired"


def _key(value: object, field: str) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_KEY:
        raise HandshakeError(f"control message field {field!r}: expected 1 to {MAX_KEY} bytes, got {value!r:.80}")
    return value


@dataclass(frozen=True)
class LeaseMessage:
    """A block-lease message about lease ``key`` (:mod:`kvxfer.pipe.lease`)."""

    KIND: ClassVar[str] = "lease"
    verb: LeaseVerb
    key: bytes

    @classmethod
    def from_fields(cls, fields: list[Any]) -> LeaseMessage:
        """Validated message from decoded fields ``[verb, key]``."""
        verb, key = fields
        try:
            parsed = LeaseVerb(verb)
        except ValueError:
            raise HandshakeError(f"lease message: unknown verb {verb!r:.40}") from None
        return cls(parsed, _key(key, "key"))

    def fields(self) -> list[Any]:
        """The fields as msgpack writes them."""
        return [self.verb.value, self.key]


@dataclass(frozen=True)
class LayersReady:
    """Layers ``layers`` of the request a pull streams as ``key`` are computed (:mod:`kvxfer.pipe.layer_board`)."""

    KIND: ClassVar[str] = "layers"
    key: bytes
    layers: tuple[int, ...]

    @classmethod
    def from_fields(cls, fields: list[Any]) -> LayersReady:
        """Validated message from decoded fields ``[key, [layer ids]]``."""
        key, layers = fields
        if not isinstance(layers, list) or not all(type(x) is int and 0 <= x < MAX_LAYER for x in layers):
            raise HandshakeError(f"layers message: layers must be a list of ints in [0, {MAX_LAYER})")
        return cls(_key(key, "key"), tuple(layers))

    def fields(self) -> list[Any]:
        """The fields as msgpack writes them."""
        return [self.key, [int(x) for x in self.layers]]


@dataclass(frozen=True)
class BlocksExpired:
    """Connector note, prefill -> decode: the lease ``key`` expired, its blocks may hold other data now."""

    KIND: ClassVar[str] = "conn.expired"
    key: bytes

    @classmethod
    def from_fields(cls, fields: list[Any]) -> BlocksExpired:
        """Validated message from decoded fields ``[key]``."""
        (key,) = fields
        return cls(_key(key, "key"))

    def fields(self) -> list[Any]:
        """The fields as msgpack writes them."""
        return [self.key]


@dataclass(frozen=True)
class PushOutcome:
    """Connector note, prefill -> decode: the push of ``request_id`` ended (``ok``), first token ``token``
    computed at ``token_time`` (the prefill's clock, seconds)."""

    KIND: ClassVar[str] = "conn.pushed"
    request_id: str
    ok: bool
    token: int
    token_time: float

    @classmethod
    def from_fields(cls, fields: list[Any]) -> PushOutcome:
        """Validated message from decoded fields ``[request_id, ok, token, token_time]``."""
        request_id, ok, token, token_time = fields
        if not isinstance(request_id, str) or len(request_id) > MAX_TEXT:
            raise HandshakeError(f"push message: request_id must be a string of <= {MAX_TEXT} characters")
        if (
            type(ok) is not bool
            or type(token) is not int
            or not isinstance(token_time, (int, float))
            or isinstance(token_time, bool)
        ):
            raise HandshakeError("push message: expected ok: bool, token: int, token_time: float")
        return cls(request_id, ok, token, float(token_time))

    def fields(self) -> list[Any]:
        """The fields as msgpack writes them."""
        return list(astuple(self))


Message: TypeAlias = LeaseMessage | LayersReady | BlocksExpired | PushOutcome
MESSAGE_TYPES: dict[str, type[Message]] = {t.KIND: t for t in (LeaseMessage, LayersReady, BlocksExpired, PushOutcome)}


def encode(message: Message) -> bytes:
    """The notification payload carrying ``message``."""
    body: bytes = msgpack.packb([VERSION, message.KIND, message.fields()], use_bin_type=True)
    return PREFIX + body


def decode(payload: bytes) -> Message:
    """The message a control payload carries; HandshakeError when it is not a valid one of this version."""
    if not payload.startswith(PREFIX):
        raise HandshakeError("not a control message")
    if len(payload) > _MAX_MESSAGE:
        raise HandshakeError(f"control message of {len(payload)} bytes exceeds {_MAX_MESSAGE}")
    try:
        decoded = msgpack.unpackb(
            payload[len(PREFIX) :],
            raw=False,
            max_bin_len=MAX_KEY,
            max_str_len=MAX_TEXT,
            max_array_len=MAX_LAYER,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise HandshakeError(f"control message is not msgpack: {type(error).__name__} {error}") from None
    if not isinstance(decoded, list) or len(decoded) != 3:
        raise HandshakeError("control message must be [version, kind, [fields]]")
    version, kind, fields = decoded
    if version != VERSION:
        raise HandshakeError(f"control message version {version!r:.20}, this side speaks {VERSION}")
    kind_type = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if kind_type is None:
        raise HandshakeError(f"unknown control message kind {kind!r:.40}")
    if not isinstance(fields, list):
        raise HandshakeError(f"{kind} message: fields must be a list")
    try:
        return kind_type.from_fields(fields)
    except ValueError:  # wrong number of fields
        raise HandshakeError(f"{kind} message: wrong number of fields ({len(fields)})") from None


MessageT = TypeVar("MessageT", LeaseMessage, LayersReady, BlocksExpired, PushOutcome)


class Sender(Protocol):
    """Sends a payload to a peer by name (``Agent.notify``)."""

    def __call__(self, peer: Peer | str, payload: bytes) -> None: ...


class ControlChannel:
    """One agent's control messages: :meth:`send` one to a peer, :meth:`on` registers a handler called with
    ``(peer name, message)`` for every valid message of a type (from the thread that delivers notifications);
    invalid ones are logged and dropped."""

    def __init__(self, agent_name: str, send: Sender) -> None:
        self.agent_name = agent_name
        self._send = send
        self._lock = threading.Lock()
        self._handlers: dict[type[Message], list[Callable[[str, Any], None]]] = {}

    def send(self, peer: Peer | str, message: Message) -> None:
        """Send ``message`` to ``peer`` (a Peer or its name); kvxfer errors of the send propagate."""
        self._send(peer, encode(message))

    def on(self, kind: type[MessageT], handler: Callable[[str, MessageT], None]) -> None:
        """Call ``handler(peer_name, message)`` for every ``kind`` message received."""
        with self._lock:
            self._handlers.setdefault(kind, []).append(handler)

    def off(self, kind: type[MessageT], handler: Callable[[str, MessageT], None]) -> None:
        """Stop calling ``handler`` (no error if it was not registered)."""
        with self._lock:
            handlers = self._handlers.get(kind, [])
            if handler in handlers:
                handlers.remove(handler)

    def deliver(self, peer_name: str, payload: bytes) -> None:
        """Decode a received control payload and hand it to its handlers."""
        try:
            message = decode(payload)
        except HandshakeError as error:
            logger.warning("agent %s: malformed control message from %s ignored: %s", self.agent_name, peer_name, error)
            return
        with self._lock:
            handlers = list(self._handlers.get(type(message), []))
        if not handlers:
            logger.debug("agent %s: %s message from %s has no handler", self.agent_name, message.KIND, peer_name)
        for handler in handlers:
            try:
                handler(peer_name, message)
            except KvxferError as error:  # a handler's failure must not break the delivering backend thread
                logger.warning(
                    "agent %s: handling a %s message from %s failed: %s",
                    self.agent_name,
                    message.KIND,
                    peer_name,
                    error,
                )

    def close(self) -> None:
        """Forget every handler."""
        with self._lock:
            self._handlers.clear()


class Service(Protocol):
    """Something an agent runs for its users (block leases, layer announcements): built by ``kind(agent)`` on
    first :meth:`Agent.service`, closed by :meth:`Agent.close`."""

    def close(self) -> None: ...


ServiceT = TypeVar("ServiceT", bound=Service)
