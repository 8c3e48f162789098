"""The contract every backend fulfils, and the small types passed across it.

A backend moves the bytes of a plan between this agent's regions and one peer's. :class:`Backend` is the
contract (eight methods: ``unavailable_reason``, ``attach``, ``info``, ``register``, ``deregister``, ``connect``,
``post``, ``close``). ``connect`` returns a :class:`Connection` (``notify``, ``close``) and ``post`` a
:class:`Request` (``poll``, ``cancel``, ``wait``). Abilities only some backends have are Protocols:
:class:`PreparesPlans`, :class:`ServesPeers`, :class:`MapsPeerMemory`. docs/backends.md explains the contract
for a new backend's author.
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


class Request(ABC):
    """A backend's record of one posted transfer, returned by :meth:`Backend.post`; the agent's TransferHandle
    drives it. ``state`` starts PENDING and becomes final once (DONE, FAILED or CANCELLED); ``error`` says why it
    FAILED or was CANCELLED (a KvxferError; None: the handle supplies a generic one).

    The handle serialises its :meth:`poll` and :meth:`cancel` calls (one lock per handle), but :meth:`wait` runs
    outside that lock, and the backend's threads (progress, copy workers, callbacks) may finalise the request
    concurrently: subclasses make ``state``/``error`` changes atomic (first final state wins).
    """

    def __init__(self, nbytes: int) -> None:
        self.state = TransferState.PENDING
        self.error: KvxferError | None = None
        self.nbytes = nbytes

    @abstractmethod
    def poll(self) -> TransferState:
        """The state now. Cheap and never blocking (microseconds): a backend may make progress here, but must not
        wait for a lock another thread holds long. May raise a KvxferError, which fails the transfer."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop the transfer: afterwards :meth:`poll` returns a final state. With ``caps.can_cancel`` no byte of
        it lands after this returns; without, it returns once the backend issues nothing more for it. Returns
        promptly (at most ``Timeouts.close``, or the end of a launched copy that cannot be recalled); raises
        nothing for a transfer that already ended. The handle also calls it when the transfer's deadline passes.
        """

    def wait(self, seconds: float) -> None:
        """Let up to ``seconds`` pass while a waiter has nothing else to do; return early when the request may
        be final (the caller polls afterwards). Default: sleep. Override to block on a completion event, or to
        make progress on the waiting thread instead."""
        time.sleep(seconds)


class Connection(ABC):
    """What a backend holds for one connected peer, returned by :meth:`Backend.connect`; the agent keeps it in
    the :class:`~kvxfer.peer.Peer` until it disconnects. Methods may be called from any thread."""

    @abstractmethod
    def notify(self, payload: bytes) -> None:
        """Send ``payload`` (at most ``Limits.notification_nbytes``, already checked) to the peer as a standalone
        notification; it reaches the peer's ``context.deliver``. Never waits for the peer to answer: the send
        may complete later. PeerDisconnectedError when the peer is gone."""

    def close(self) -> None:
        """Forget the peer (the agent disconnects it, reconnects under the same name, or closes): transfers still
        in flight with it end (completed or failed), resources opened for it are released. Called once per
        connection, under the agent's lock; never raises for a peer already lost. Default: nothing to release."""
        return None


class Backend(ABC):
    """Moves bytes between this agent's registered regions and peers' regions: the contract, eight methods.

    Life, all calls made by one :class:`~kvxfer.agent.Agent`: :meth:`unavailable_reason` (before creating it);
    :meth:`attach` once; :meth:`register` / :meth:`deregister` per region; :meth:`info` whenever the agent builds
    its metadata; :meth:`connect` per peer (the agent keeps the :class:`Connection`); :meth:`post` per transfer
    (the agent keeps the :class:`Request`); :meth:`close` once, last (after every connection was closed and every
    region deregistered). Threads: ``register``, ``deregister``, ``info``, ``connect`` and ``Connection.close``
    come one at a time, under the agent's lock; ``post``, ``Connection.notify`` and the request's methods come
    from any thread, concurrently with each other and with the backend's own threads: a backend protects its
    tables itself.

    Notifications: an incoming notification (attached to a transfer, or standalone) goes to
    ``context.deliver(Notification(peer_name, payload))``, from any thread, only once every byte of its transfer
    is visible where it was written. A peer found dead goes to ``context.peer_lost(peer_name, error)``.

    Errors: raise kvxfer errors (errors.py) carrying argument / expected / actual, and wrap native failures once,
    in one place per backend, as BackendError (the native error as ``__cause__``). Deadlines: every wait inside a
    backend is bounded by ``context.timeouts`` (``transfer`` for data, ``connect`` for handshakes, ``close`` for
    draining); the handle enforces a transfer's own deadline by cancelling the request.

    Optional abilities, each a Protocol below, implemented only when they apply: :class:`PreparesPlans`,
    :class:`ServesPeers`, :class:`MapsPeerMemory`.
    """

    caps: ClassVar[BackendCaps]

    def __init__(self) -> None:
        self.context: BackendContext | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can run here, else a one-line reason (missing library or device). Cheap, never
        raises, loads nothing it does not need: the registry asks every known backend."""
        return None

    def attach(self, context: BackendContext) -> None:
        """Called once by the agent that owns this backend, before anything else: keep ``context``, start what
        the backend runs (threads, listening sockets). Raise BackendUnavailableError when it cannot start."""
        self.context = context

    def info(self) -> bytes:
        """Agent-level public information peers need to connect (e.g. a worker address), for the metadata; b""
        if none. Called whenever the agent builds its metadata: it may change after :meth:`register`. A peer's
        copy arrives as ``peer.meta.backends[caps.wire]``, untrusted."""
        return b""

    @abstractmethod
    def register(self, region: Region) -> bytes:
        """Make ``region`` (``region.index`` is already set) reachable by peers; return its public key for the
        metadata (b"" if none; a peer's copy arrives in ``RemoteRegion.keys[caps.wire]``, untrusted). Called
        only for regions whose kind is in ``caps.memory_kinds``. Raise on failure: the agent undoes the other
        backends' registrations and raises RegistrationError."""

    @abstractmethod
    def deregister(self, region: Region) -> None:
        """Undo :meth:`register`. The agent calls it once no transfer of its own uses the region and (for a
        :class:`ServesPeers` backend) :meth:`ServesPeers.busy` says False or the agent is closing."""

    @abstractmethod
    def connect(self, peer: Peer) -> Connection:
        """Prepare to move bytes to and from ``peer`` (its metadata: ``peer.meta``, untrusted: check what you
        read), within ``context.timeouts.connect``. Called only when ``caps.reaches`` the peer. Raise a
        KvxferError when it cannot: the agent then connects the peer without this backend."""

    @abstractmethod
    def post(self, op: Op, plan: TransferPlan, notify: bytes | None) -> Request:
        """Start moving ``plan``'s bytes (READ: peer to local; WRITE: local to peer); never blocks on the peer or
        the data. ``plan.local`` / ``plan.remote`` are checked against both sides' region tables and sized
        pairwise. ``notify`` (already size-checked) must reach the peer only after all the data is visible there.
        Raise (PeerDisconnectedError, DescriptorError, ...) when it
        cannot start: nothing is pinned then."""

    def close(self) -> None:
        """Release everything (end threads within ``context.timeouts.close``, fail what is still in flight);
        called once, last. Default: nothing to release."""
        return None


@runtime_checkable
class PreparesPlans(Protocol):
    """An optional ability: a backend whose per-plan setup is slow (open peer handles, build device tables) does
    it here, when the agent builds a plan (``Agent.plan``, ``TransferPlan.select``), so that :meth:`Backend.post`
    stays cheap. Errors raised here reach the caller of ``plan``."""

    def prepare(self, plan: TransferPlan) -> None:
        """Build what posting ``plan`` needs; may take time (bounded by ``context.timeouts.connect``)."""


def prepare_plan(backend: Backend, plan: TransferPlan) -> None:
    """``backend.prepare(plan)`` when the backend :class:`PreparesPlans`; nothing otherwise. (An attribute look-up,
    not ``isinstance``: a runtime Protocol check costs ~10 µs, and ``TransferPlan.select`` runs per request.)"""
    prepare: Callable[[TransferPlan], None] | None = getattr(backend, "prepare", None)
    if prepare is not None:
        prepare(plan)


@runtime_checkable
class ServesPeers(Protocol):
    """An optional ability: a backend that itself reads or writes this agent's regions for transfers a peer posted
    (the local backend's copy threads, UCX's staged messages), which this agent holds no handle for. The agent
    deregisters a region only once :meth:`busy` says False for it (or its deregister timeout runs out while
    closing); a backend whose peers move bytes without it (cuda_ipc) cannot know and does not implement this."""

    def busy(self, region: Region) -> bool:
        """True while this backend still uses ``region`` for a peer's transfer. Cheap; any thread."""


@runtime_checkable
class MapsPeerMemory(Protocol):
    """An optional ability, for the pipe's kernel strategy: a backend that maps a peer's memory into this process
    (local: the same process; cuda_ipc: IPC handles) so kernels read or write peer blocks in place."""

    def map_remote(self, peer: Peer, region_index: int, device: int) -> int | None:
        """Where the first byte of the peer's region ``region_index`` can be dereferenced by code of this process
        running on ``device`` (-1: the CPU), or None when it cannot be mapped there."""
