"""The Agent: owns regions, backends and peers; plans and posts transfers; receives notifications."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from . import backends as backend_registry
from .arguments import check_agent_arguments, check_payload, check_subscription
from .backends.base import Backend, BackendContext, Op, ServesPeers, prepare_plan
from .control import PREFIX as CONTROL_PREFIX
from .control import ControlChannel, Service, ServiceT
from .descs import Descs
from .environment import host_id as default_host_id
from .errors import (
    DescriptorError,
    HandshakeError,
    PeerError,
    RegistrationError,
    UsageError,
)
from .handle import Notification, Timeouts, TransferHandle
from .inbox import Inbox
from .limits import Limits, check_timeout
from .memory import MemoryKind, Region, check_writable
from .metadata import AgentMetadata, RegionMeta
from .nonces import NonceBook
from .peer import Peer, check_not_replayed, connected_tag, enroll
from .plan import TransferPlan, check_pair_sizes
from .registry import RegionRegistry
from .senders import BYE, HEAD_NBYTES, HELLO, SenderBook, SenderKeys
from .sidechannel import SideChannelServer, fetch_metadata
from .signature import is_envelope, open_metadata, sign_metadata, token_key

logger = logging.getLogger("kvxfer")


class Agent:
    """One participant in transfers (e.g. one engine rank).

    ``backends``: names ("local", "cuda_ipc", "ucx", ...) or Backend instances; default: every backend available
    here (or ``KVXFER_BACKENDS``). ``listen``: "host:port" to serve metadata on a side channel (port 0 picks one);
    ``token``: a shared secret the side channel requires (and signs the metadata it serves with; needs
    ``listen``). A side channel on an address other than loopback needs a token unless
    ``allow_unauthenticated=True`` says that anyone who reaches it may read the metadata (docs/security.md).
    ``compat``: a string peers must match (e.g. a model id). ``limits``: bounds on what peers may make this agent
    hold (:class:`~kvxfer.limits.Limits`).
    """

    def __init__(
        self,
        name: str,
        backends: Sequence[str | Backend] | None = None,
        *,
        timeouts: Timeouts | None = None,
        listen: str | None = None,
        token: str | None = None,
        compat: str = "",
        host_id: str | None = None,
        limits: Limits | None = None,
        allow_unauthenticated: bool = False,
    ) -> None:
        check_agent_arguments(name, timeouts, listen, token, compat, host_id, limits)
        self.name = name
        self.uid = uuid.uuid4().hex
        self.timeouts = timeouts or Timeouts()
        self.limits = limits or Limits()
        self.compat = compat
        self.host_id = host_id or default_host_id()
        self.pid = os.getpid()
        self._lock = threading.RLock()
        self._closed = True  # until construction succeeds: a half-built agent has nothing to close
        self._peers: dict[str, Peer] = {}
        self._services: dict[type, Service] = {}
        #: kvxfer's own control messages (leases, layer announcements, connector notes) to and from peers
        self.control = ControlChannel(name, self.notify)
        self._inbox = Inbox(name, self.limits)
        self._nonces = NonceBook(self.limits.handshake_nonces, self.limits.metadata_max_age)  # signed envelopes
        self._keys = SenderKeys(self.uid)  # notifications carry a per-receiver key; the book binds sender names
        self._senders = SenderBook(
            self.limits.notification_senders,
            partial(connected_tag, self._peers),
            self._inbox.count_dropped,
            token_key(token),
        )
        self._regions = RegionRegistry()
        self._active: set[TransferHandle] = set()
        context = BackendContext(
            self.name,
            self.uid,
            self.host_id,
            self.pid,
            self.timeouts,
            self._deliver,
            self._peer_lost,
            limits=replace(self.limits, notification_nbytes=self.limits.notification_nbytes + HEAD_NBYTES),
            count_dropped=self._inbox.count_dropped,
        )
        self._backends = backend_registry.create_all(backends, context)
        self._closed = False
        enroll(self)
        try:
            self._side_channel = (
                SideChannelServer(listen, self.metadata, token, self.limits, allow_unauthenticated) if listen else None
            )
        except Exception:
            self.close()
            raise
        logger.debug("agent %s: backends %s", name, [b.caps.name for b in self._backends])

    # ---- regions -----------------------------------------------------------------------------------------------

    def register(self, array: Any, name: str | None = None) -> Region:
        """Register an array (numpy / torch / cupy / DLPack) or a :class:`Region`; returns the Region."""
        self._check_open()
        region = Region.from_array(array)
        if region.kind is MemoryKind.HOST:
            check_writable(region.addr, region.nbytes)  # a peer may write into it; a READ lands in it
        with self._lock:
            if region.registered:
                raise RegistrationError(
                    f"region {region.name!r} is already registered with agent {region.agent.name!r}"
                )
            self._regions.check_no_overlap(region, f"agent {self.name!r}")
            index = self._regions.add(region, name)
            done: list[Backend] = []
            try:
                for backend in self._backends:
                    if region.kind in backend.caps.memory_kinds:
                        region.set_backend_key(backend.caps.wire, backend.register(region))
                        done.append(backend)
            except Exception as error:
                for backend in done:
                    backend.deregister(region)
                self._regions.remove(index)
                raise RegistrationError(f"registering {region.name!r} with backend failed: {error}") from error
            region.bind(self)
        return region

    def deregister(self, region: Region, timeout: float = 0.0) -> None:
        """Unregister ``region``. Refused with RegistrationError while a transfer uses it, unless those transfers
        finish within ``timeout`` seconds."""
        self._check_open()
        self._deregister(region, timeout, force=False)

    def _deregister(self, region: Region, timeout: float, force: bool) -> None:
        if not isinstance(region, Region) or region.agent is not self:
            raise RegistrationError(
                f"region {getattr(region, 'name', region)!r} is not registered with agent {self.name!r}"
            )
        give_up = time.monotonic() + timeout
        while self._busy_with(region.index):
            if time.monotonic() >= give_up:
                if force:
                    logger.warning(
                        "agent %s: region %s deregistered while a peer's transfer still uses it; the "
                        "memory stays alive until that transfer ends",
                        self.name,
                        region.name,
                    )
                    break
                raise RegistrationError(
                    f"region {region.name!r} is in use by a transfer in flight; wait for it, "
                    "cancel it, or pass a timeout"
                )
            time.sleep(1e-3)
        with self._lock:
            for backend in self._backends:
                if region.kind in backend.caps.memory_kinds:
                    backend.deregister(region)
            self._regions.remove(region.index)
            region.bind(None)

    @property
    def regions(self) -> list[Region]:
        """The regions registered now."""
        return self._regions.all()

    def region_at(self, index: int) -> Region:
        """The registered region with index ``index`` (RegistrationError when none is)."""
        return self._regions.get(index)

    def _busy_with(self, index: int) -> bool:
        for handle in list(self._active):
            handle.poll()
        region = self._regions.get(index)
        return self._regions.in_use(index) or any(isinstance(b, ServesPeers) and b.busy(region) for b in self._backends)

    # ---- metadata and peers ------------------------------------------------------------------------------------

    def metadata(self, token: str | None = None) -> bytes:
        """This agent's metadata: opaque, versioned bytes a peer passes to :meth:`connect`. With ``token``: signed
        under it (HMAC-SHA256, timestamped), for a peer that calls ``connect(meta, token=...)``."""
        self._check_open()
        if token is not None:
            return sign_metadata(self.metadata(), token)
        with self._lock:
            regions = tuple(
                RegionMeta(r.name, r.index, r.addr, r.nbytes, r.kind, r.device, r.backend_keys)
                for r in self._regions.all()
            )
            meta = AgentMetadata(
                self.name,
                self.uid,
                self.host_id,
                self.pid,
                self.compat,
                {b.caps.wire: b.info() for b in self._backends},
                regions,
                self.listen_address,
            )
        return meta.encode()

    @property
    def listen_address(self) -> str | None:
        """ "host:port" of the side channel, or None when not listening."""
        return self._side_channel.address if self._side_channel else None

    @property
    def side_channel(self) -> SideChannelServer | None:
        """The side-channel server (None when not listening); its counters (``shed``, ``open_connections``) are
        for diagnostics and benchmarks."""
        return self._side_channel

    def connect(self, metadata: bytes, token: str | None = None) -> Peer:
        """Connect to the agent whose :meth:`metadata` this is; reconnecting replaces the old Peer.

        With ``token``, ``metadata`` must be signed under it (``metadata(token=...)``) and at most
        ``Limits.metadata_max_age`` seconds old; the signature is checked before anything else reads it. Metadata
        that claims to come from this process must match what that agent really registered (docs/security.md)."""
        self._check_open()
        if token is not None:
            metadata = open_metadata(metadata, token, self.limits.metadata_max_age, self._nonces)
        elif is_envelope(metadata):
            raise HandshakeError("metadata is signed: pass the token that verifies it, connect(meta, token=...)")
        return self._connect(metadata, token)

    def _connect(self, metadata: bytes, token: str | None) -> Peer:
        """Connect to authenticated (under ``token``) or unauthenticated (None) ``metadata``."""
        meta = AgentMetadata.decode(metadata)
        if meta.compat != self.compat:
            raise HandshakeError(
                f"peer {meta.name!r} is incompatible: compat {meta.compat!r} != ours {self.compat!r}", meta.name
            )
        meta = check_not_replayed(meta, self)
        with self._lock:
            old = self._peers.get(meta.name)
            if old is not None:  # the same instance again: no BYE, so its name stays bound to us there
                old.connected = old.connected and old.meta.uid != meta.uid
                self.disconnect(old)
            peer = Peer(meta, [])
            peer.attach(self._backends, self.name, self.host_id, self.pid)
            peer.notify_header = self._keys.header(meta.uid, self.name, token_key(token))
            self._peers[meta.name] = peer
        self._keys.announce(peer, HELLO)
        logger.info("agent %s connected to %s via %s", self.name, meta.name, [b.caps.name for b in peer.backends])
        return peer

    def connect_to(self, address: str, token: str | None = None, timeout: float | None = None) -> Peer:
        """Fetch a peer's metadata from its side channel at "host:port" and connect, all within ``timeout``
        seconds (default ``Timeouts.connect``). With ``token``, the server must prove it holds the same token (its
        answer is authenticated) before any byte of it is decoded."""
        self._check_open()
        limit = check_timeout(timeout)
        return self._connect(fetch_metadata(address, token, self.timeouts.connect if limit is None else limit), token)

    def disconnect(self, peer: Peer | str) -> None:
        """Forget ``peer``; transfers still in flight with it fail."""
        peer = self.peer(peer)
        if peer.connected:
            self._keys.announce(peer, BYE)
        with self._lock:
            connections, peer.connections = peer.connections, []  # each closes once, even if disconnected again
            for connection in connections:
                connection.close()
            peer.connected = False
            peer.lost_reason = peer.lost_reason or "disconnected"
            if self._peers.get(peer.name) is peer:
                del self._peers[peer.name]

    def peer(self, peer: Peer | str) -> Peer:
        """The connected Peer named ``peer`` (or ``peer`` itself)."""
        if isinstance(peer, Peer):
            return peer
        try:
            return self._peers[peer]
        except KeyError:
            raise PeerError(f"unknown peer {peer!r}; connected: {sorted(self._peers)}", str(peer)) from None

    @property
    def peers(self) -> dict[str, Peer]:
        """Connected peers by name."""
        return dict(self._peers)

    # ---- transfers ---------------------------------------------------------------------------------------------

    def plan(self, local_descs: Descs, peer: Peer | str, remote_descs: Descs) -> TransferPlan:
        """Pair ``local_descs[i]`` with ``remote_descs[i]``; validate both sides and pick a backend."""
        self._check_open()
        peer = self.peer(peer)
        if not peer.connected:
            raise PeerError(f"peer {peer.name!r} is disconnected ({peer.lost_reason})", peer.name)
        for descs, argument in ((local_descs, "local_descs"), (remote_descs, "remote_descs")):
            if not isinstance(descs, Descs):
                raise DescriptorError(f"{argument} must be a Descs, got {type(descs).__name__}")
        if local_descs.space is not self:
            raise DescriptorError(
                f"local_descs describe regions of {getattr(local_descs.space, 'name', '?')!r}, "
                f"not of agent {self.name!r}"
            )
        if remote_descs.space is not peer:
            raise DescriptorError(
                f"remote_descs describe regions of {getattr(remote_descs.space, 'name', '?')!r}, "
                f"not of peer {peer.name!r}"
            )
        check_pair_sizes(local_descs, remote_descs)
        local_kinds = self._regions.table().check(local_descs, "local_descs", f"agent {self.name!r}")
        remote_kinds = peer.table.check(remote_descs, "remote_descs", f"peer {peer.name!r}")
        backend = self.backend_for(peer, local_kinds, remote_kinds)
        plan = TransferPlan(self, peer, backend, local_descs, remote_descs)
        prepare_plan(backend, plan)
        return plan

    def backend_for(self, peer: Peer, local_kinds: Iterable[MemoryKind], remote_kinds: Iterable[MemoryKind]) -> Backend:
        """The preferred backend of ``peer`` that moves every pair of memory kinds (local kind, remote kind);
        BackendUnavailableError when none does."""
        return peer.backend_for(local_kinds, remote_kinds)

    def read(self, plan: TransferPlan, notify: bytes | None = None, timeout: float | None = None) -> TransferHandle:
        """Pull the peer's bytes into local memory. ``notify`` reaches the peer after the data moved."""
        return self._post(Op.READ, plan, notify, timeout)

    def write(self, plan: TransferPlan, notify: bytes | None = None, timeout: float | None = None) -> TransferHandle:
        """Push local bytes into the peer's memory. ``notify`` reaches the peer after the data landed."""
        return self._post(Op.WRITE, plan, notify, timeout)

    def _post(self, op: Op, plan: TransferPlan, notify: bytes | None, timeout: float | None) -> TransferHandle:
        self._check_open()
        if not isinstance(plan, TransferPlan):
            raise UsageError(f"plan must be a TransferPlan from Agent.plan, got {type(plan).__name__}")
        plan.check_owner(self)
        if notify is not None:
            notify = plan.peer.notify_header + check_payload(notify, self.limits, "notify")
        limit = check_timeout(timeout)
        plan.check_destination(op)
        self._regions.check_live(plan.local_regions)
        deadline = time.monotonic() + (self.timeouts.transfer if limit is None else limit)
        request = plan.backend.post(op, plan, notify)
        handle = TransferHandle(
            self, plan.backend, request, op, plan.nbytes, deadline, self._on_final, regions=plan.local_regions
        )
        self._regions.pin(plan.local_regions)
        self._active.add(handle)
        return handle

    def _on_final(self, handle: TransferHandle) -> None:
        if handle in self._active:
            self._active.discard(handle)
            self._regions.unpin(handle.regions)

    # ---- notifications -----------------------------------------------------------------------------------------

    def notifications(self, timeout: float = 0.0) -> list[Notification]:
        """Take the notifications received so far; with ``timeout`` > 0, wait that long for at least one."""
        self._check_open()
        return self._inbox.take(check_timeout(timeout, allow_none=False) or 0.0)

    @property
    def dropped_notifications(self) -> dict[str, int]:
        """Incoming notifications dropped so far, by reason: over ``limits`` ("oversized", "queue full", "senders
        full"), or a sender name that does not check out ("sender mismatch", "unframed")."""
        return dict(self._inbox.dropped)

    def notify(self, peer: Peer | str, payload: bytes) -> None:
        """Send ``peer`` a standalone message (no data attached), of at most ``Limits.notification_nbytes``."""
        self._check_open()
        peer = self.peer(peer)
        framed = peer.notify_header + check_payload(payload, self.limits, "payload")
        if not peer.connected:
            raise PeerError(f"peer {peer.name!r} is disconnected ({peer.lost_reason})", peer.name)
        peer.connections[0].notify(framed)

    def subscribe(self, prefix: bytes, callback: Callable[[Notification], None]) -> None:
        """Hand notifications whose payload starts with ``prefix`` to ``callback(notification)`` (called from a
        backend thread) instead of :meth:`notifications`. kvxfer's own control messages use b"kvx:" (reserved:
        they go to :attr:`control`)."""
        self._check_open()
        check_subscription(prefix, callback, CONTROL_PREFIX)
        self._inbox.subscribe(prefix, callback)

    def service(self, kind: type[ServiceT]) -> ServiceT:
        """This agent's ``kind`` service, built by ``kind(self)`` on first use; :meth:`close` closes it (services
        close in the reverse order of their creation, before the peers and backends)."""
        with self._lock:
            found = self._services.get(kind)
            if found is None:
                self._check_open()
                found = self._services[kind] = kind(self)  # type: ignore[call-arg]
        return found  # type: ignore[return-value]

    def _deliver(self, notification: Notification) -> None:
        """Backends hand every notification here (any thread): control messages to :attr:`control`, the rest to
        the bounded inbox, once the sender's name checks out (senders.py)."""
        payload = self._senders.open(notification.peer_name, notification.payload)
        if payload is None:
            return
        notification = Notification(notification.peer_name, payload)
        if notification.payload.startswith(CONTROL_PREFIX):
            if len(notification.payload) > self.limits.notification_nbytes:
                self._inbox.deliver(notification)  # counted and dropped there as oversized
                return
            try:
                self.control.deliver(notification.peer_name, notification.payload)
            except Exception:  # a handler's bug must not break the backend thread delivering
                logger.exception("agent %s: control message handler failed", self.name)
            return
        self._inbox.deliver(notification)

    def _peer_lost(self, peer_name: str, error: BaseException) -> None:
        peer = self._peers.get(peer_name)
        if peer is not None:
            peer.connected = False
            peer.lost_reason = str(error)
            logger.warning("agent %s lost peer %s: %s", self.name, peer_name, error)

    # ---- lifetime ----------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"agent {self.name!r} is closed")

    def close(self) -> None:
        """Wait up to ``Timeouts.close`` for transfers in flight, cancel the rest, and release everything."""
        if self._closed:
            return
        give_up = time.monotonic() + self.timeouts.close
        pending = [h for h in list(self._active) if not h.poll().final]  # poll() may shrink the set
        if pending:
            warnings.warn(
                f"Agent {self.name!r} closed with {len(pending)} transfer(s) never waited or released",
                ResourceWarning,
                stacklevel=2,
            )
        for handle in pending:
            while not handle.poll().final and time.monotonic() < give_up:
                time.sleep(1e-3)
            if not handle.state.final:
                handle.cancel()
        for service in reversed(list(self._services.values())):
            service.close()
        self.control.close()
        side_channel = getattr(self, "_side_channel", None)  # absent when __init__ failed before it
        if side_channel is not None:
            side_channel.close()
        for peer in list(self._peers.values()):
            self.disconnect(peer)
        for region in self._regions.all():
            self._deregister(region, max(give_up - time.monotonic(), 0.0), force=True)
        self._closed = True
        for backend in self._backends:
            backend.close()
        self._inbox.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(
                f"Agent {self.name!r} was not closed; use it as a context manager or call close()",
                ResourceWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, backends={[b.caps.name for b in self._backends]}, peers={sorted(self._peers)})"
