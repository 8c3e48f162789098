"""The contract every backend fulfils, and the small types passed across it.

A backend moves the bytes of a plan between this agent's regions and one peer's. The agent calls, in order:
``attach`` once; ``info`` for its metadata; ``register``/``deregister`` per region; ``connect`` per peer;
``post`` per transfer (never blocking), then ``poll`` until final or ``cancel``; ``close`` last. Incoming
notifications are handed to ``context.deliver`` only after the data of their transfer is visible.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..errors import KvxferError
from ..handle import Notification, Timeouts, TransferState
from ..memory import MemoryKind

if TYPE_CHECKING:
    from ..agent import Peer
    from ..memory import Region
    from ..plan import TransferPlan


class Op(str, Enum):
    """READ pulls the peer's bytes into local memory; WRITE pushes local bytes into the peer's memory."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class BackendCaps:
    """What a backend can do; the agent picks a backend per peer and memory kinds from these.

    ``wire``: the protocol name peers must share (a mock speaks "local"). ``scope``: "process", "host" or
    "network" — how far apart the two agents may be. ``can_cancel``: no byte lands after cancel() returns.
    """

    name: str
    wire: str
    memory_kinds: frozenset[MemoryKind]
    scope: str
    one_sided: bool = True
    can_cancel: bool = True
    max_batch: int = 1 << 30
    preference: int = 0


@dataclass
class BackendContext:
    """What an agent hands its backends. ``deliver`` may be called from any thread."""

    agent_name: str
    agent_uid: str
    host_id: str
    pid: int
    timeouts: Timeouts
    deliver: Callable[[Notification], None]
    peer_lost: Callable[[str, BaseException], None]
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("kvxfer"))


class Request:
    """A backend's record of one posted transfer. Subclasses add what they need."""

    def __init__(self, nbytes: int) -> None:
        self.state = TransferState.PENDING
        self.error: KvxferError | None = None
        self.nbytes = nbytes


class Backend(ABC):
    """Moves bytes between this agent's registered regions and peers' regions."""

    caps: ClassVar[BackendCaps]

    def __init__(self) -> None:
        self.context: BackendContext | None = None

    def attach(self, context: BackendContext) -> None:
        """Called once by the agent that owns this backend, before anything else."""
        self.context = context

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can run here, else a one-line reason (missing library or device)."""
        return None

    def info(self) -> bytes:
        """Agent-level public information peers need to connect (e.g. a worker address); b"" if none."""
        return b""

    @abstractmethod
    def register(self, region: "Region") -> bytes:
        """Make ``region`` reachable; return its public key for the metadata (b"" if none)."""

    @abstractmethod
    def deregister(self, region: "Region") -> None:
        """Undo :meth:`register`. The agent calls it only when no transfer uses the region."""

    def busy(self, region: "Region") -> bool:
        """True while this backend still uses ``region`` for a peer's transfer (deregister must wait)."""
        return False

    @abstractmethod
    def connect(self, peer: "Peer") -> None:
        """Prepare to move bytes to/from ``peer`` (its metadata is ``peer.meta``)."""

    def disconnect(self, peer: "Peer") -> None:
        """Forget ``peer``; transfers still in flight with it fail."""

    def can_reach(self, peer: "Peer") -> bool:
        """True if this backend can move bytes with ``peer`` (by scope and what the peer speaks)."""
        assert self.context is not None
        if self.caps.wire not in peer.meta.backends:
            return False
        if self.caps.scope == "process":
            return peer.meta.host_id == self.context.host_id and peer.meta.pid == self.context.pid
        if self.caps.scope == "host":
            return peer.meta.host_id == self.context.host_id
        return True

    def supports(self, local_kind: MemoryKind, remote_kind: MemoryKind) -> bool:
        """True if this backend moves bytes between these memory kinds."""
        return local_kind in self.caps.memory_kinds and remote_kind in self.caps.memory_kinds

    def map_remote(self, peer: "Peer", region_index: int, device: int) -> int | None:
        """Where the first byte of the peer's region ``region_index`` can be dereferenced by code of this process
        running on ``device`` (-1: the CPU), or None when this backend cannot map peer memory (then only
        :meth:`post` moves its bytes). Kernels use it to read or write peer blocks in place."""
        return None

    def prepare(self, plan: "TransferPlan") -> None:
        """Called once per plan when it is built (may take time: open peer handles, build tables), so that
        :meth:`post` stays cheap."""

    @abstractmethod
    def post(self, op: Op, plan: "TransferPlan", notify: bytes | None) -> Request:
        """Start moving ``plan``'s bytes; never blocks. ``notify`` reaches the peer after all the data."""

    @abstractmethod
    def poll(self, request: Request) -> TransferState:
        """The request's state now; cheap."""

    @abstractmethod
    def cancel(self, request: Request) -> None:
        """Stop the request (see ``caps.can_cancel`` for what is guaranteed)."""

    @abstractmethod
    def send_notification(self, peer: "Peer", payload: bytes) -> None:
        """Send a standalone message to ``peer``."""

    def idle_wait(self, request: Request, seconds: float) -> None:
        """Let time pass while a waiter has nothing to do; a backend may make progress here instead."""
        time.sleep(seconds)

    def close(self) -> None:
        """Release everything; called once, last."""
