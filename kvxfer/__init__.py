"""kvxfer: move the KV cache of LLM requests between prefill and decode engines.

``import kvxfer`` needs numpy and msgpack only: ``kvxfer.aio`` (asyncio) loads on first use, the kernel planners on
the first pipe request.
"""

from typing import TYPE_CHECKING, Any

from .agent import Agent
from .descs import Descs
from .errors import (
    AdmissionRejectedError,
    BackendError,
    BackendUnavailableError,
    ConfigError,
    DescriptorError,
    EngineTimeoutError,
    HandshakeError,
    KvxferError,
    LayoutMismatchError,
    LeaseLostError,
    OutOfBlocksError,
    PeerDisconnectedError,
    PeerError,
    QueueFullError,
    RegistrationError,
    RequeueLimitError,
    TransferCancelledError,
    TransferError,
    TransferTimeoutError,
    UcxStatusError,
    UsageError,
)
from .handle import Handle, Notification, Timeouts, TransferHandle, TransferState
from .limits import Limits
from .memory import MemoryKind, Region, RemoteRegion
from .peer import Peer
from .pipe import KVPipe, PipeHandle
from .plan import TransferPlan
from .spec import KVCacheSpec, KVLayout

if TYPE_CHECKING:
    from . import aio  # noqa: F401  (for type checkers: kvxfer.aio resolves lazily, see __getattr__)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``kvxfer.aio`` on first use (it imports asyncio)."""
    if name == "aio":
        import importlib

        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module 'kvxfer' has no attribute {name!r}")


__all__ = [
    "AdmissionRejectedError",
    "Agent",
    "BackendError",
    "BackendUnavailableError",
    "ConfigError",
    "DescriptorError",
    "Descs",
    "EngineTimeoutError",
    "Handle",
    "HandshakeError",
    "KVCacheSpec",
    "KVLayout",
    "KVPipe",
    "KvxferError",
    "LayoutMismatchError",
    "LeaseLostError",
    "Limits",
    "MemoryKind",
    "Notification",
    "OutOfBlocksError",
    "Peer",
    "PeerDisconnectedError",
    "PeerError",
    "PipeHandle",
    "QueueFullError",
    "Region",
    "RegistrationError",
    "RemoteRegion",
    "RequeueLimitError",
    "Timeouts",
    "TransferCancelledError",
    "TransferError",
    "TransferHandle",
    "TransferPlan",
    "TransferState",
    "TransferTimeoutError",
    "UcxStatusError",
    "UsageError",
    "__version__",
]
