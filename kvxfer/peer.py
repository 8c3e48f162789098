"""Peers: remote agents an agent has connected to, as their metadata describes them."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .errors import BackendUnavailableError, HandshakeError, KvxferError, PeerError
from .memory import MemoryKind, RemoteRegion
from .metadata import AgentMetadata
from .plan import RegionTable
from .senders import uid_tag

if TYPE_CHECKING:
    from .agent import Agent
    from .backends.base import Backend, Connection

logger = logging.getLogger("kvxfer")

# The agents alive in this process, by uid (weak: a dropped agent disappears). Metadata that claims to come from
# this process is checked against them, so an agent's own metadata, replayed with a region pointed elsewhere, cannot
# make it copy into memory it never exported.
_PROCESS_AGENTS: weakref.WeakValueDictionary[str, Agent] = weakref.WeakValueDictionary()


def enroll(agent: Agent) -> None:
    """Record ``agent`` as alive in this process (the Agent constructor calls it)."""
    _PROCESS_AGENTS[agent.uid] = agent


def _published(agent: Agent) -> AgentMetadata | None:
    try:
        return AgentMetadata.decode(agent.metadata())
    except KvxferError:  # closed meanwhile
        return None


def check_not_replayed(meta: AgentMetadata, me: Agent) -> AgentMetadata:
    """The metadata to connect with. When ``meta`` claims to come from this process — our (host id, pid), or a
    backend address of one of our agents — it must name a live agent here by uid and name, and list only regions
    that agent registered, with the same index, name, span, kind, device and keys (HandshakeError otherwise); what
    is returned then is that agent's current metadata, so backends never see a same-process claim, only the truth
    (which also refreshes backend information that changed since ``meta`` was taken)."""
    live = {
        uid: published
        for uid, agent in list(_PROCESS_AGENTS.items())
        if not agent.closed and (published := _published(agent)) is not None
    }
    addresses = {
        (wire, info): uid for uid, published in live.items() for wire, info in published.backends.items() if info
    }
    claimed = {addresses[(wire, info)] for wire, info in meta.backends.items() if (wire, info) in addresses}
    ours = meta.pid == me.pid and meta.host_id in {p.host_id for p in live.values()} | {me.host_id}
    if not ours and not claimed:
        return meta
    real = live.get(meta.uid)
    why = None
    if real is None:
        why = f"no live agent of this process has uid {meta.uid!r}"
    elif claimed - {meta.uid}:
        why = "it carries the backend address of another agent of this process"
    elif (meta.name, meta.host_id, meta.pid, set(meta.backends)) != (
        real.name,
        real.host_id,
        real.pid,
        set(real.backends),
    ):
        why = f"its name, host, pid or backends differ from agent {real.name!r}'s"
    else:
        registered = {r.index: r for r in real.regions}
        for region in meta.regions:
            own = registered.get(region.index)
            if own is None or (own.name, own.addr, own.nbytes, own.kind, own.device, own.keys) != (
                region.name,
                region.addr,
                region.nbytes,
                region.kind,
                region.device,
                region.keys,
            ):
                why = f"its region {region.name!r} (index {region.index}) is not what agent {real.name!r} registered"
                break
    if why is not None or real is None:
        raise HandshakeError(
            f"metadata of {meta.name!r} claims to come from this process (pid {me.pid}) but {why}; "
            "refused (replayed or forged metadata)",
            meta.name,
        )
    return real


def connected_tag(peers: dict[str, Peer], name: str) -> bytes | None:
    """The uid tag of the connected peer named ``name`` in ``peers``, or None (senders.py binds names to it)."""
    peer = peers.get(name)
    return peer.uid_tag if peer is not None and peer.connected else None


class Peer:
    """A connected remote agent: its name, metadata, regions, the backends that reach it and each one's
    :class:`~kvxfer.backends.base.Connection` (``connections[i]`` belongs to ``backends[i]``)."""

    def __init__(self, meta: AgentMetadata, backends: list[Backend]) -> None:
        self.meta = meta
        self.name = meta.name
        self.backends = backends
        self.connections: list[Connection] = []
        self.connected = True
        self.lost_reason: str | None = None
        #: the tag of the peer's uid its notifications must carry (senders.py)
        self.uid_tag = uid_tag(meta.uid)
        #: what our agent puts before every notification it sends this peer (set by Agent.connect)
        self.notify_header = b""
        self._regions = {
            r.name: RemoteRegion(r.name, r.index, r.addr, r.nbytes, r.kind, r.device, self, r.keys)
            for r in meta.regions
        }
        self.table = RegionTable(
            [r.index for r in meta.regions],
            [r.addr for r in meta.regions],
            [r.nbytes for r in meta.regions],
            [r.kind for r in meta.regions],
        )

    def attach(self, backends: Sequence[Backend], agent_name: str, host_id: str, pid: int) -> None:
        """Connect every backend of ours that reaches this peer (agent ``agent_name`` in process ``pid`` on host
        ``host_id``); HandshakeError when none does. A backend that fails to connect is logged and skipped."""
        for backend in backends:
            if not backend.caps.reaches(self.meta, host_id, pid):
                continue
            try:
                connection = backend.connect(self)
            except KvxferError as error:
                logger.warning(
                    "agent %s: backend %s could not connect to %s: %s", agent_name, backend.caps.name, self.name, error
                )
                continue
            self.backends.append(backend)
            self.connections.append(connection)
        if not self.backends:
            raise HandshakeError(
                f"no backend reaches peer {self.name!r}: ours {[b.caps.name for b in backends]}, it speaks "
                f"{sorted(self.meta.backends)} (host {self.meta.host_id!r}, pid {self.meta.pid})",
                self.name,
            )

    def backend_for(self, local_kinds: Iterable[MemoryKind], remote_kinds: Iterable[MemoryKind]) -> Backend:
        """The preferred backend reaching this peer that moves every pair of memory kinds (local, remote);
        BackendUnavailableError when none does."""
        pairs = [(a, b) for a in local_kinds for b in remote_kinds]
        for backend in sorted(self.backends, key=lambda b: -b.caps.preference):
            if all(backend.caps.supports(a, b) for a, b in pairs):
                return backend
        raise BackendUnavailableError(
            f"no backend moves {sorted(str(a.value) + '->' + str(b.value) for a, b in pairs)} with peer "
            f"{self.name!r}; reachable: {[b.caps.name for b in self.backends]}"
        )

    def region(self, name: str) -> RemoteRegion:
        """The peer's region registered under ``name``."""
        try:
            return self._regions[name]
        except KeyError:
            raise PeerError(
                f"peer {self.name!r} has no region named {name!r}; it has {sorted(self._regions)}", self.name
            ) from None

    @property
    def regions(self) -> list[RemoteRegion]:
        """All regions the peer published."""
        return list(self._regions.values())

    @property
    def host_id(self) -> str:
        """The peer's host identity (equal host ids mean same-host paths are possible)."""
        return self.meta.host_id

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"disconnected ({self.lost_reason})"
        return f"Peer({self.name!r}, {len(self._regions)} regions, {[b.caps.name for b in self.backends]}, {state})"
