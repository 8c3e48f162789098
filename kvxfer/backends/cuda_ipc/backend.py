"""CUDA IPC backend: GPU<->GPU between processes of one host, at NVLink speed for fragmented KV.

A plan's peer pointers are mapped into this process once (legacy IPC handles or VMM fds); a transfer is then
either ONE kernel launch that copies every fragment through the mapped pointers (reading or writing the peer's
GPU over NVLink) or, for a few large runs, copy-engine copies. Completion is a CUDA event. The notification
leaves with the launch, carrying an interprocess event the peer waits on before delivering it (events.py), so it
is seen only once the data is in place, without the completion and a socket round on the critical path
(``KVXFER_CUDA_IPC_EARLY_NOTIFY=0``: sent after completion instead). A progress thread completes transfers even
when nobody polls.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from ... import environment
from ...errors import BackendError, ConfigError, KvxferError, PeerDisconnectedError, TransferError
from ...handle import Notification, TransferState
from ...memory import MemoryKind
from ..base import Backend, BackendCaps, BackendContext, Connection, Op, Request, Scope
from . import driver
from .events import EventRing, OpenedEvents
from .mailbox import Mailbox
from .sharing import Export, Imports, export_region

if TYPE_CHECKING:
    from ...memory import Region
    from ...peer import Peer
    from ...plan import TransferPlan

logger = logging.getLogger("kvxfer")
STRATEGIES = ("auto", "kernel", "copy")
# "auto" uses the copy engines only for a handful of big runs (they leave the SMs to the model); else the kernel.
_COPY_ENGINE_MAX_PAIRS = 16
_COPY_ENGINE_MIN_NBYTES = 4 << 20
_SEQUENCE = itertools.count()


class IpcRequest(Request):
    """One launched transfer: its completion event and what to do when it fires."""

    def __init__(
        self, backend: CudaIpcBackend, nbytes: int, event: Any, peer_uid: str, notify: bytes | None, strategy: str
    ) -> None:
        super().__init__(nbytes)
        self.backend = backend
        self.event, self.peer_uid, self.notify, self.strategy = event, peer_uid, notify, strategy
        self.lock = threading.Lock()
        self.finished = threading.Event()  # set once final: waiters block on it instead of sleeping
        self.sequence = next(_SEQUENCE)
        self.noted = False  # the notification already went out with the copy's event (events.py)

    def poll(self) -> TransferState:
        if self.state is TransferState.PENDING and self.event.done:
            self.backend.complete(self)
        return self.state

    def cancel(self) -> None:
        self.event.synchronize()  # a launched copy cannot be recalled: wait until it touches nothing more
        if self.noted:
            self.backend.send_done(self)  # it landed: a peer holding its notification may deliver it
        with self.lock:
            if self.state is TransferState.PENDING:
                self.state = TransferState.CANCELLED
        self.finished.set()
        self.backend.forget(self)

    def wait(self, seconds: float) -> None:
        self.finished.wait(seconds)


class IpcConnection(Connection):
    """A peer on this host: its mailbox connection (none for an agent of this process) and imported memory."""

    def __init__(self, backend: CudaIpcBackend, peer: Peer) -> None:
        self.backend, self.peer = backend, peer

    def notify(self, payload: bytes) -> None:
        self.backend.notify_peer(self.peer, payload)

    def close(self) -> None:
        self.backend.forget_peer(self.peer)


class _PlanState:
    """A plan translated for this process: local device, pointer pairs and cached device tables per op."""

    def __init__(self, device: int, local: np.ndarray, remote: np.ndarray, sizes: np.ndarray, strategy: str):
        self.device, self.local, self.remote, self.sizes, self.strategy = device, local, remote, sizes, strategy
        self.tables: dict[Op, Any] = {}


class CudaIpcBackend(Backend):
    """Same-host GPU<->GPU transfers across processes (``strategy``: "auto", "kernel" or "copy")."""

    caps = BackendCaps(
        name="cuda_ipc",
        wire="cuda_ipc",
        memory_kinds=frozenset({MemoryKind.CUDA}),
        scope=Scope.HOST,
        can_cancel=True,
        preference=50,
    )

    def __init__(self, strategy: str = "auto", early_notify: bool | None = None) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        if early_notify is None:
            setting = environment.read("KVXFER_CUDA_IPC_EARLY_NOTIFY", "1")
            if setting not in ("0", "1"):
                raise ConfigError(f"KVXFER_CUDA_IPC_EARLY_NOTIFY must be 0 or 1, got {setting!r}")
            early_notify = setting == "1"
        self.early_notify = early_notify
        self._rings: dict[int, EventRing] = {}
        self._opened = OpenedEvents(self._home_device)
        self._home: int | None = None
        self._exports: dict[int, Export] = {}
        self._imports = Imports()
        self._peers: dict[str, tuple[Peer, str, bytes]] = {}  # uid -> (peer, mailbox address, secret)
        self._lost: dict[str, str] = {}  # uid -> why
        self._plans: weakref.WeakKeyDictionary[TransferPlan, _PlanState] = weakref.WeakKeyDictionary()
        self._streams: dict[int, Any] = {}
        self._pending: set[IpcRequest] = set()
        self._wake = threading.Condition()
        self._closed = False
        self._mailbox: Mailbox | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not sys.platform.startswith("linux"):
            return "CUDA IPC needs Linux"
        try:
            from ...devices import cupy_module

            cupy_module()
            driver.cu()
        except KvxferError as error:
            return str(error)
        return None

    def attach(self, context: BackendContext) -> None:
        super().attach(context)
        self._mailbox = Mailbox(context.agent_uid, self._on_note, self._on_lost, self._fds_of, self._await_event)
        threading.Thread(target=self._progress, name=f"kvxfer-ipc-{context.agent_name}", daemon=True).start()

    def info(self) -> bytes:
        assert self._mailbox is not None
        info: bytes = msgpack.packb([self._mailbox.address.encode(), self._mailbox.secret], use_bin_type=True)
        return info

    # ---- regions -----------------------------------------------------------------------------------------------

    def register(self, region: Region) -> bytes:
        export = export_region(region.addr, region.nbytes, region.device)
        if self._home is None:
            self._home = region.device
        self._exports[region.index] = export
        return export.key

    def deregister(self, region: Region) -> None:
        export = self._exports.pop(region.index, None)
        if export is not None:
            export.close()

    def _fds_of(self, region_index: int) -> tuple[list[int], list[int]]:
        export = self._exports.get(region_index)
        if export is None or not export.fds:
            return [], []
        return export.fds, export.sizes

    # ---- peers -------------------------------------------------------------------------------------------------

    def connect(self, peer: Peer) -> IpcConnection:
        assert self._mailbox is not None and self.context is not None
        try:
            address, secret = msgpack.unpackb(peer.meta.backends[self.caps.wire], raw=False)
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as error:
            raise PeerDisconnectedError(f"cuda_ipc: bad backend info from {peer.name!r}: {error}", peer.name) from None
        if peer.meta.uid != self.context.agent_uid:
            self._mailbox.open(
                peer.meta.uid,
                peer.name,
                address.decode(),
                secret,
                (self.context.agent_uid, self.context.agent_name),
                self.context.timeouts.connect,
            )
        self._peers[peer.meta.uid] = (peer, address.decode(), secret)
        self._lost.pop(peer.meta.uid, None)
        return IpcConnection(self, peer)

    def forget_peer(self, peer: Peer) -> None:
        """Closing ``peer``'s connection: complete its transfers in flight, close its imports and mailbox."""
        assert self._mailbox is not None
        self._drain(peer.meta.uid)
        self._imports.close_peer(peer.meta.uid)
        self._mailbox.close_peer(peer.meta.uid)
        self._peers.pop(peer.meta.uid, None)

    def _drain(self, peer_uid: str) -> None:
        for request in [r for r in list(self._pending) if r.peer_uid == peer_uid]:
            request.event.synchronize()
            self.complete(request)

    def _home_device(self) -> int:
        return 0 if self._home is None else self._home

    def _await_event(self, handle: bytes, alive: Callable[[], bool]) -> bool | None:
        """True: the copy completed; False: it never will (the sender died); None: cannot tell from here."""
        assert self.context is not None
        try:
            return self._opened.wait(handle, alive, self.context.timeouts.transfer)
        except Exception as error:  # noqa: BLE001 a handle that will not open (any CUDA/cupy error): wait for "done"
            logger.warning(
                "cuda_ipc: a peer's copy event cannot be waited on here (%s); notifications from it wait "
                "for the copy's completion message",
                error,
            )
            return None

    def _on_note(self, peer_name: str, payload: bytes) -> None:
        assert self.context is not None
        self.context.deliver(Notification(peer_name, payload))

    def _on_lost(self, peer_uid: str, peer_name: str, reason: str) -> None:
        assert self.context is not None
        self._lost[peer_uid] = reason
        self.context.peer_lost(peer_name, PeerDisconnectedError(f"peer {peer_name!r}: {reason}", peer_name))

    # ---- plans and transfers -----------------------------------------------------------------------------------

    def prepare(self, plan: TransferPlan) -> None:
        self._state(plan)

    def plan_state(self, plan: TransferPlan) -> _PlanState:
        """What :meth:`prepare` built for ``plan`` (its strategy, tables, device): for benchmarks and tests."""
        return self._plans[plan]

    def map_remote(self, peer: Peer, region_index: int, device: int) -> int | None:
        assert self.context is not None
        meta = next((r for r in peer.meta.regions if r.index == region_index), None)
        if meta is None or device < 0:
            return None
        if peer.meta.pid == self.context.pid:
            return meta.addr
        _, address, secret = self._peers[peer.meta.uid]
        mailbox, context = self._mailbox, self.context
        assert mailbox is not None

        def fetch(index: int) -> tuple[list[int], Any]:
            return mailbox.fetch_fds(address, secret, context.agent_uid, index, context.timeouts.connect)

        return self._imports.local_base(peer.meta.uid, region_index, device, meta.keys[self.caps.wire], fetch)

    def _state(self, plan: TransferPlan) -> _PlanState:
        state = self._plans.get(plan)
        if state is not None:
            return state
        devices = np.unique(plan.local.device)
        if len(devices) != 1:
            raise ConfigError(f"cuda_ipc: a plan's local side must be on one GPU, it spans devices {list(devices)}")
        device = int(devices[0])
        shift = np.zeros(len(plan.remote), dtype=np.uint64)
        for index in plan.remote_regions:  # same process: map_remote returns the peer's own pointer (no import)
            meta = next(r for r in plan.peer.meta.regions if r.index == index)
            base = self.map_remote(plan.peer, index, device)
            assert base is not None  # the region is the peer's and the device a real one
            shift[plan.remote.region == index] = np.uint64((base - meta.addr) % 2**64)
        remote = plan.remote.addr + shift  # wraps modulo 2**64 like the pointer arithmetic it stands for
        strategy = self.strategy
        if strategy == "auto":
            big = len(plan) <= _COPY_ENGINE_MAX_PAIRS and plan.nbytes / len(plan) >= _COPY_ENGINE_MIN_NBYTES
            strategy = "copy" if big else "kernel"
        state = _PlanState(device, plan.local.addr, remote, plan.local.nbytes, strategy)
        self._plans[plan] = state
        return state

    def _stream(self, device: int) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            from ...devices import cupy_module

            with cupy_module().cuda.Device(device):
                stream = self._streams[device] = cupy_module().cuda.Stream(non_blocking=True)
        return stream

    def post(self, op: Op, plan: TransferPlan, notify: bytes | None) -> IpcRequest:
        from ...devices import cupy_module
        from ...kernels import batch_copy

        if plan.peer.meta.uid in self._lost:
            raise PeerDisconnectedError(
                f"peer {plan.peer.name!r} is gone: {self._lost[plan.peer.meta.uid]}", plan.peer.name
            )
        assert self.context is not None
        state = self._state(plan)
        cupy = cupy_module()
        sources, destinations = (state.remote, state.local) if op is Op.READ else (state.local, state.remote)
        stream = self._stream(state.device)
        with cupy.cuda.Device(state.device):
            if state.strategy == "kernel":
                table = state.tables.get(op)
                if table is None:
                    table = state.tables[op] = batch_copy.to_device(
                        batch_copy.split_pieces(sources, destinations, state.sizes), state.device
                    )
                batch_copy.launch(table, state.device, stream)
            else:
                self._copy_engine(cupy, sources.tolist(), destinations.tolist(), state.sizes.tolist(), stream.ptr)
            early = notify is not None and self.early_notify and plan.peer.meta.uid != self.context.agent_uid
            if early:
                ring = self._rings.get(state.device)
                if ring is None:
                    ring = self._rings[state.device] = EventRing(state.device)
                event, handle = ring.take()
            else:
                event = cupy.cuda.Event(block=False, disable_timing=True, interprocess=False)
            event.record(stream)
        request = IpcRequest(self, plan.nbytes, event, plan.peer.meta.uid, notify, state.strategy)
        if early:
            try:  # the peer delivers it once the event completes; meanwhile the copy runs
                assert self._mailbox is not None and notify is not None
                self._mailbox.send_note_after(plan.peer.meta.uid, handle, notify, request.sequence)
                request.noted = True
            except PeerDisconnectedError:
                pass  # completion sends it the usual way, or fails the transfer saying why
        with self._wake:
            self._pending.add(request)
            self._wake.notify()
        return request

    @staticmethod
    def _copy_engine(
        cupy: ModuleType, sources: list[int], destinations: list[int], sizes: list[int], stream: int
    ) -> None:
        """Copy-engine copies: one cuMemcpyBatchAsync where the driver has it, else one memcpyAsync per run."""
        if driver.memcpy_batch(destinations, sources, sizes, stream):
            return
        copy_default = 4  # cudaMemcpyDefault: direction from the unified addresses
        for source, destination, size in zip(sources, destinations, sizes, strict=True):
            cupy.cuda.runtime.memcpyAsync(destination, source, size, copy_default, stream)

    def complete(self, request: IpcRequest) -> None:
        """Make ``request``, whose event fired, final: send its notification (or the completion message of one
        that left early), then DONE; FAILED when the peer went away. First caller wins."""
        with request.lock:
            if request.state is not TransferState.PENDING:
                return
            lost = self._lost.get(request.peer_uid)
            try:
                if lost is not None:
                    raise PeerDisconnectedError(f"the peer went away during the transfer: {lost}")
                if request.notify is not None and not request.noted and self._mailbox is not None:
                    self._mailbox.send_note(request.peer_uid, request.notify)
                elif request.noted and self._mailbox is not None:
                    self.send_done(request)
                request.state = TransferState.DONE
            except KvxferError as error:  # the transfer failed because of it: say so as a TransferError
                request.error = TransferError(f"cuda_ipc transfer failed: {error}", backend=self.caps.name)
                request.error.__cause__ = error
                request.state = TransferState.FAILED
        request.finished.set()
        self._pending.discard(request)

    def send_done(self, request: IpcRequest, landed: bool = True) -> None:
        """Completion message for a notification that already left (for a peer that cannot wait on our events);
        a few bytes, off the critical path. The notification itself went out: a peer gone by now changes nothing."""
        assert self._mailbox is not None
        try:
            self._mailbox.send_done(request.peer_uid, request.sequence, landed)
        except PeerDisconnectedError:
            pass

    def forget(self, request: IpcRequest) -> None:
        """Stop tracking ``request`` (final) in the progress thread's set."""
        self._pending.discard(request)

    def notify_peer(self, peer: Peer, payload: bytes) -> None:
        """A standalone notification to ``peer`` (its connection's ``notify``)."""
        assert self._mailbox is not None and self.context is not None
        if peer.meta.uid == self.context.agent_uid:
            self.context.deliver(Notification(self.context.agent_name, payload))
            return
        self._mailbox.send_note(peer.meta.uid, payload)

    def _progress(self) -> None:
        # Block on the oldest transfer's event (the driver wakes us as soon as it fires, without the GIL), then
        # complete it at once: the notification leaves microseconds after the data is in place.
        while not self._closed:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait(0.5)
                request = min(self._pending, key=lambda r: r.sequence, default=None)
            if request is None:
                continue
            try:
                request.event.synchronize()
                self.complete(request)
            except Exception as error:  # noqa: BLE001 a CUDA error ends that transfer, not the thread
                if request.noted:
                    self.send_done(request, landed=False)
                with request.lock:
                    if request.state is TransferState.PENDING:
                        request.error = BackendError(f"cuda_ipc: {error}", backend=self.caps.name)
                        request.state = TransferState.FAILED
                request.finished.set()
                self._pending.discard(request)

    def close(self) -> None:
        for request in list(self._pending):
            request.event.synchronize()
            self.complete(request)
        self._closed = True
        with self._wake:
            self._wake.notify_all()
        for uid in list(self._peers):
            self._imports.close_peer(uid)
        for export in self._exports.values():
            export.close()
        if self._mailbox is not None:
            self._mailbox.close()
        self._opened.close()
