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
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from ..errors import ConfigError, KvxferError
from ..handle import Notification, Timeouts, TransferState
from ..limits import Limits
from ..memory import MemoryKind

if TYPE_CHECKING:
    from ..memory import Region
    from ..metadata import AgentMetadata
    from ..peer import Peer
    from ..plan import TransferPlan


class Op(str, Enum):
    """READ pulls the peer's bytes into local memory; WRITE pushes local bytes into the peer's memory. Equal to
    its string value ("read" / "write"), which :meth:`parse` also accepts."""

    READ = "read"
    WRITE = "write"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: Op | str) -> Op:
        """``value`` as an Op; ConfigError for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"op must be 'read' or 'write', got {value!r}") from None


class Scope(str, Enum):
    """How far apart two agents a backend connects may be. Equal to its string value."""

    PROCESS = "process"
    HOST = "host"
    NETWORK = "network"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class BackendCaps:
    """What a backend can do; the agent picks a backend per peer and memory kinds from these.

    ``wire``: the protocol name peers must share (a mock speaks "local"). ``scope``: a :class:`Scope` (or its
    name) — how far apart the two agents may be. ``can_cancel``: no byte lands after cancel() returns.
    """

    name: str
    wire: str
    memory_kinds: frozenset[MemoryKind]
    scope: Scope
    one_sided: bool = True
    can_cancel: bool = True
    max_batch: int = 1 << 30
    preference: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scope", Scope(self.scope))
        except ValueError:
            raise ConfigError(
                f"BackendCaps.scope must be one of {[s.value for s in Scope]}, got {self.scope!r}"
            ) from None

    def reaches(self, meta: AgentMetadata, host_id: str, pid: int) -> bool:
        """True if a backend with these caps, in process ``pid`` of host ``host_id``, can move bytes with the
        agent of ``meta`` (by scope and what the peer speaks)."""
        if self.wire not in meta.backends:
            return False
        if self.scope is Scope.PROCESS:
            return meta.host_id == host_id and meta.pid == pid
        if self.scope is Scope.HOST:
            return meta.host_id == host_id
        return True

    def supports(self, local_kind: MemoryKind, remote_kind: MemoryKind) -> bool:
        """True if the backend moves bytes between these memory kinds."""
        return local_kind in self.memory_kinds and remote_kind in self.memory_kinds


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
    #: the agent's bounds: backends cap what peers send (notification sizes) before allocating for it
    limits: Limits = field(default_factory=Limits)
    #: counts an incoming notification a backend refused before receiving it (reason: "oversized"), in the same
    #: tally as the agent's own drops (Agent.dropped_notifications)
    count_dropped: Callable[[str], None] = lambda reason: None


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
    def register(self, region: Region) -> bytes:
        """Make ``region`` reachable; return its public key for the metadata (b"" if none)."""

    @abstractmethod
    def deregister(self, region: Region) -> None:
        """Undo :meth:`register`. The agent calls it only when no transfer uses the region."""

    def busy(self, region: Region) -> bool:
        """True while this backend still uses ``region`` for a peer's transfer (deregister must wait)."""
        return False

    @abstractmethod
    def connect(self, peer: Peer) -> None:
        """Prepare to move bytes to/from ``peer`` (its metadata is ``peer.meta``)."""

    def disconnect(self, peer: Peer) -> None:
        """Forget ``peer``; transfers still in flight with it fail. Default: nothing to forget."""
        return None

    def prepare(self, plan: TransferPlan) -> None:
        """Called once per plan when it is built (may take time: open peer handles, build tables), so that
        :meth:`post` stays cheap. Default: nothing to prepare."""
        return None

    @abstractmethod
    def post(self, op: Op, plan: TransferPlan, notify: bytes | None) -> Request:
        """Start moving ``plan``'s bytes; never blocks. ``notify`` reaches the peer after all the data."""

    @abstractmethod
    def poll(self, request: Request) -> TransferState:
        """The request's state now; cheap."""

    @abstractmethod
    def cancel(self, request: Request) -> None:
        """Stop the request (see ``caps.can_cancel`` for what is guaranteed)."""

    @abstractmethod
    def send_notification(self, peer: Peer, payload: bytes) -> None:
        """Send a standalone message to ``peer``."""

    def idle_wait(self, request: Request, seconds: float) -> None:
        """Let time pass while a waiter has nothing to do; a backend may make progress here instead."""
        time.sleep(seconds)

    def close(self) -> None:
        """Release everything; called once, last. Default: nothing to release."""
        return None


@runtime_checkable
class MapsPeerMemory(Protocol):
    """An optional ability, for the pipe's kernel strategy: a backend that maps a peer's memory into this process
    (local: the same process; cuda_ipc: IPC handles) so kernels read or write peer blocks in place."""

    def map_remote(self, peer: Peer, region_index: int, device: int) -> int | None:
        """Where the first byte of the peer's region ``region_index`` can be dereferenced by code of this process
        running on ``device`` (-1: the CPU), or None when it cannot be mapped there."""
