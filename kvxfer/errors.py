"""The one exception tree of kvxfer.

Every error kvxfer raises is a :class:`KvxferError`. Errors about arguments also derive from ``ValueError`` so
that generic callers can catch them the usual way; timeouts derive from ``TimeoutError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .handle import Handle


class KvxferError(Exception):
    """Base class of every kvxfer error."""


class ConfigError(KvxferError, ValueError):
    """A bad spec, layout, shape, dtype or option."""


class LayoutMismatchError(ConfigError):
    """Two KV cache specs that cannot be mapped onto each other."""


class BackendUnavailableError(KvxferError):
    """An optional dependency or device is missing; the message names what is available."""


class RegistrationError(KvxferError):
    """Register/deregister failed, the region is unknown, or it is still in use."""


class DescriptorError(KvxferError, ValueError):
    """A descriptor outside its registered region, overlapping writes, or bad block ids."""


class PeerError(KvxferError):
    """Something about a peer agent; ``peer_name`` says which."""

    def __init__(self, message: str, peer_name: str | None = None) -> None:
        super().__init__(message)
        self.peer_name = peer_name


class HandshakeError(PeerError):
    """Undecodable, incompatible or unauthenticated metadata."""


class PeerDisconnectedError(PeerError):
    """The peer went away (closed, crashed, or its connection failed)."""


class TransferError(KvxferError):
    """A transfer failed; ``handle`` is the TransferHandle (if any), ``backend`` the backend name."""

    def __init__(self, message: str, handle: Handle | None = None, backend: str | None = None) -> None:
        super().__init__(message)
        self.handle = handle
        self.backend = backend


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer did not finish before its deadline, or a wait ran out of time."""


class TransferCancelledError(TransferError):
    """The transfer was cancelled."""


class BackendError(TransferError):
    """A native failure inside a backend, wrapped; ``__cause__`` keeps the original."""


class UcxStatusError(BackendError):
    """A UCX call failed; ``status`` is the UCS status code (negative), ``call`` the UCP function."""

    def __init__(self, message: str, status: int, call: str) -> None:
        super().__init__(message, backend="ucx")
        self.status = status
        self.call = call


class LeaseLostError(TransferError):
    """The sender let a block lease expire before the transfer finished: the blocks may already hold other data."""


class OutOfBlocksError(KvxferError, RuntimeError):
    """Not enough free KV cache blocks for a request (``needed`` and ``available`` say how many)."""

    def __init__(self, message: str, needed: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.needed, self.available = needed, available


class EngineTimeoutError(KvxferError, TimeoutError):
    """An engine's requests were still unfinished when a run's deadline passed."""


class UsageError(KvxferError, RuntimeError):
    """An API used in the wrong state: closed agent, released handle, plan used on another agent."""


class QueueFullError(KvxferError, RuntimeError):
    """A bounded queue is full (backpressure); ``limit`` is its bound, ``size`` its length when refused."""

    def __init__(self, message: str, limit: int = 0, size: int = 0) -> None:
        super().__init__(message)
        self.limit, self.size = limit, size


class RequeueLimitError(KvxferError, RuntimeError):
    """A request already requeued as often as allowed (once) was requeued again; ``request_id`` says which."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class AdmissionRejectedError(KvxferError):
    """Admission control refused a request; ``retry_after_s`` estimates when it would fit, ``reason`` says why."""

    def __init__(self, message: str, retry_after_s: float | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.retry_after_s, self.reason = retry_after_s, reason


__all__ = [
    "AdmissionRejectedError",
    "BackendError",
    "BackendUnavailableError",
    "ConfigError",
    "DescriptorError",
    "EngineTimeoutError",
    "HandshakeError",
    "KvxferError",
    "LayoutMismatchError",
    "LeaseLostError",
    "OutOfBlocksError",
    "PeerDisconnectedError",
    "PeerError",
    "QueueFullError",
    "RegistrationError",
    "RequeueLimitError",
    "TransferCancelledError",
    "TransferError",
    "TransferTimeoutError",
    "UcxStatusError",
    "UsageError",
]
