"""The Backend contract (kvxfer/backends/base.py): its size, and an agent driving a backend written against it alone.

``Minimal`` below implements only the eight contract methods (plus a Request and a Connection): if the agent called
anything else on a backend (a retired method, an optional ability it did not check for), these tests would fail.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import kvxfer
from kvxfer import Descs, RegistrationError, TransferCancelledError, TransferState, TransferTimeoutError
from kvxfer.backends.base import (
    Backend,
    BackendCaps,
    BackendContext,
    Connection,
    MapsPeerMemory,
    Op,
    PreparesPlans,
    Request,
    Scope,
    ServesPeers,
)
from kvxfer.backends.local import LocalBackend
from kvxfer.backends.mock import MockBackend
from kvxfer.handle import Notification
from kvxfer.memory import MemoryKind
from tests.helpers import random_bytes

CONTRACT = {"unavailable_reason", "attach", "info", "register", "deregister", "connect", "post", "close"}
RETIRED = ("poll", "cancel", "idle_wait", "send_notification", "disconnect", "busy", "prepare")

# Minimal backends of this process by agent uid (what the local backend's registry does, in three lines).
_LIVE: dict[str, Minimal] = {}


class MinimalRequest(Request):
    """Copies on its first poll (unless ``hold``), then notifies; counts the waits the handle asked for."""

    def __init__(self, pairs: list[tuple[int, int, int]], nbytes: int, deliver, notify: bytes | None) -> None:
        super().__init__(nbytes)
        self.pairs, self.deliver, self.notify = pairs, deliver, notify
        self.hold = False
        self.waits = 0
        self.cancels = 0

    def poll(self) -> TransferState:
        if self.state is TransferState.PENDING and not self.hold:
            for source, destination, size in self.pairs:
                ctypes.memmove(destination, source, size)
            self.state = TransferState.DONE
            if self.notify is not None:
                self.deliver(self.notify)
        return self.state

    def cancel(self) -> None:
        self.cancels += 1
        if self.state is TransferState.PENDING:
            self.state = TransferState.CANCELLED

    def wait(self, seconds: float) -> None:
        self.waits += 1
        super().wait(seconds)  # the contract's default: sleep


class MinimalConnection(Connection):
    def __init__(self, sender: str, target: Minimal) -> None:
        self.sender, self.target = sender, target
        self.closed = 0

    def notify(self, payload: bytes) -> None:
        assert self.target.context is not None
        self.target.context.deliver(Notification(self.sender, payload))

    def close(self) -> None:
        self.closed += 1


class Minimal(Backend):
    """Host memory within one process, with nothing but the contract."""

    caps = BackendCaps("minimal", "minimal", frozenset({MemoryKind.HOST}), Scope.PROCESS)

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.registered: set[int] = set()
        self.connections: list[MinimalConnection] = []
        self.requests: list[MinimalRequest] = []

    def attach(self, context: BackendContext) -> None:
        super().attach(context)
        _LIVE[context.agent_uid] = self

    def register(self, region) -> bytes:
        self.registered.add(region.index)
        return b""

    def deregister(self, region) -> None:
        self.registered.discard(region.index)

    def connect(self, peer) -> MinimalConnection:
        assert self.context is not None
        connection = MinimalConnection(self.context.agent_name, _LIVE[peer.meta.uid])
        self.connections.append(connection)
        return connection

    def post(self, op: Op, plan, notify: bytes | None) -> MinimalRequest:
        assert self.context is not None
        target, sender = _LIVE[plan.peer.meta.uid], self.context.agent_name
        local, remote = plan.local.addr.tolist(), plan.remote.addr.tolist()
        sources, destinations = (remote, local) if op is Op.READ else (local, remote)
        pairs = list(zip(sources, destinations, plan.local.nbytes.tolist(), strict=True))

        def deliver(payload: bytes) -> None:
            assert target.context is not None
            target.context.deliver(Notification(sender, payload))

        request = MinimalRequest(pairs, plan.nbytes, deliver, notify)
        request.hold = self.hold
        self.requests.append(request)
        return request

    def close(self) -> None:
        assert self.context is not None
        _LIVE.pop(self.context.agent_uid, None)


class Preparing(Minimal):
    """With the optional PreparesPlans ability."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[int] = []

    def prepare(self, plan) -> None:
        self.prepared.append(len(plan))


class Serving(Minimal):
    """With the optional ServesPeers ability; ``in_use`` says what :meth:`busy` answers."""

    def __init__(self) -> None:
        super().__init__()
        self.in_use = threading.Event()

    def busy(self, region) -> bool:
        return self.in_use.is_set()


def _pair(source_backend: Minimal, destination_backend: Minimal, nbytes: int = 4096):
    source_agent = kvxfer.Agent("src", backends=[source_backend])
    destination_agent = kvxfer.Agent("dst", backends=[destination_backend])
    source, destination = random_bytes(nbytes), np.zeros(nbytes, np.uint8)
    source_agent.register(source, name="buf")
    region = destination_agent.register(destination, name="buf")
    peer = destination_agent.connect(source_agent.metadata())
    offsets = np.arange(0, nbytes, 512)[::-1].copy()
    plan = destination_agent.plan(
        Descs.from_ranges(region, np.arange(0, nbytes, 512), 512),
        peer,
        Descs.from_ranges(peer.region("buf"), offsets, 512),
    )
    return source_agent, destination_agent, source, destination, region, peer, plan


def test_the_contract_has_eight_methods_and_the_objects_it_returns_carry_the_rest():
    methods = {name for name, value in vars(Backend).items() if not name.startswith("_") and name != "caps"}
    assert methods == CONTRACT and len(methods) <= 8
    assert Backend.__abstractmethods__ == {"register", "deregister", "connect", "post"}
    assert Request.__abstractmethods__ == {"poll", "cancel"} and callable(Request.wait)
    assert Connection.__abstractmethods__ == {"notify"} and callable(Connection.close)


def test_builtin_backends_keep_no_retired_contract_method_and_declare_their_abilities():
    from kvxfer.backends.cuda_ipc import CudaIpcBackend
    from kvxfer.backends.ucx import UcxBackend

    abilities = {
        LocalBackend: {ServesPeers, MapsPeerMemory},
        MockBackend: {ServesPeers, MapsPeerMemory},
        CudaIpcBackend: {PreparesPlans, MapsPeerMemory},
        UcxBackend: {ServesPeers},
    }
    for backend, expected in abilities.items():
        retired = {"poll", "cancel", "idle_wait", "send_notification", "disconnect"}
        assert not retired & set(dir(backend)), backend
        found = {ability for ability in (PreparesPlans, ServesPeers, MapsPeerMemory) if issubclass(backend, ability)}
        assert found == expected, backend


def test_a_backend_of_only_the_contract_moves_bytes_notifies_and_disconnects():
    source_backend, destination_backend = Minimal(), Minimal()
    assert not any(hasattr(destination_backend, name) for name in RETIRED)
    source_agent, destination_agent, source, destination, region, peer, plan = _pair(
        source_backend, destination_backend
    )
    with source_agent, destination_agent:
        handle = destination_agent.read(plan, notify=b"req-1")
        assert handle.wait(5).state is TransferState.DONE
        assert np.array_equal(destination.reshape(-1, 512), source.reshape(-1, 512)[::-1])
        assert [n.payload for n in source_agent.notifications(timeout=1)] == [b"req-1"]
        destination_agent.notify(peer, b"standalone")  # through the peer's Connection
        assert source_agent.notifications(timeout=1) == [Notification("dst", b"standalone")]
        connection = destination_backend.connections[0]
        assert peer.connections == [connection] and connection.closed == 0
        destination_agent.disconnect(peer)
        assert connection.closed == 1
        destination_agent.deregister(region)
        assert region.index not in destination_backend.registered


def test_the_handle_polls_waits_and_cancels_through_the_request():
    source_agent, destination_agent, _source, destination, _region, _peer, plan = _pair(Minimal(), Minimal(hold=True))
    with source_agent, destination_agent:
        handle = destination_agent.read(plan)
        request = destination_agent.peers["src"].backends[0].requests[-1]
        with pytest.raises(TransferTimeoutError):
            handle.wait(0.05)
        assert request.waits > 0 and handle.poll() is TransferState.PENDING
        handle.cancel()
        assert request.cancels == 1 and request.state is TransferState.CANCELLED
        assert isinstance(handle.error, TransferCancelledError) and not destination.any()

        expiring = destination_agent.read(plan, timeout=0.05)  # its deadline cancels the request
        with pytest.raises(TransferTimeoutError, match="missed its deadline"):
            expiring.wait(5)
        assert destination_agent.peers["src"].backends[0].requests[-1].cancels == 1


def test_prepare_runs_only_for_a_backend_that_prepares_plans():
    backend = Preparing()
    source_agent, destination_agent, *_rest, plan = _pair(Minimal(), backend)
    with source_agent, destination_agent:
        assert backend.prepared == [len(plan)]
        subset = plan.select([0, 1], [0, 1])
        assert backend.prepared == [len(plan), len(subset)]
        destination_agent.read(subset).wait(5)


def test_deregister_waits_for_a_backend_that_serves_peers():
    backend = Serving()
    source_agent, destination_agent, _source, _destination, region, _peer, _plan = _pair(Minimal(), backend)
    with source_agent, destination_agent:
        backend.in_use.set()
        with pytest.raises(RegistrationError, match="in use"):
            destination_agent.deregister(region)
        assert region.index in backend.registered
        timer = threading.Timer(0.05, backend.in_use.clear)
        timer.start()
        destination_agent.deregister(region, timeout=5.0)
        timer.join()
        assert region.index not in backend.registered and region not in destination_agent.regions


def test_reconnecting_disconnecting_and_closing_close_each_connection_once():
    source_backend, destination_backend = Minimal(), Minimal()
    source_agent, destination_agent, _source, _destination, _region, old_peer, _plan = _pair(
        source_backend, destination_backend
    )
    with source_agent:
        with destination_agent:
            first = destination_backend.connections[0]
            destination_agent.connect(source_agent.metadata())
            assert first.closed == 1 and len(destination_backend.connections) == 2
            destination_agent.disconnect(old_peer)  # the stale Peer again: the new connection stays open
            assert [c.closed for c in destination_backend.connections] == [1, 0]
            assert destination_agent.peers["src"].connected
        assert [c.closed for c in destination_backend.connections] == [1, 1]
