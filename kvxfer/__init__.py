"""kvxfer: move the KV cache of LLM requests between prefill and decode engines."""

from . import aio
from .agent import Agent
from .descs import Descs
from .errors import (BackendError, BackendUnavailableError, ConfigError, DescriptorError, EngineTimeoutError,
                     HandshakeError, KvxferError, LayoutMismatchError, LeaseLostError, OutOfBlocksError,
                     PeerDisconnectedError, PeerError, RegistrationError, TransferCancelledError, TransferError,
                     TransferTimeoutError, UcxStatusError, UsageError)
from .handle import Handle, Notification, Timeouts, TransferHandle, TransferState
from .memory import MemoryKind, Region, RemoteRegion
from .peer import Peer
from .pipe import KVPipe, PipeHandle
from .plan import TransferPlan
from .spec import KVCacheSpec, KVLayout

__version__ = "0.1.0"

__all__ = [
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
    "MemoryKind",
    "Notification",
    "OutOfBlocksError",
    "Peer",
    "PeerDisconnectedError",
    "PeerError",
    "PipeHandle",
    "Region",
    "RegistrationError",
    "RemoteRegion",
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
