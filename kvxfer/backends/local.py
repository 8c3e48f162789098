"""Same-process copies: host memory by memmove, CUDA memory by cupy copies; one worker thread per agent.

Peers must live in this process (two agents of one program, or an agent with itself). The worker copies in
chunks and checks for cancellation between chunks under the request's lock, so once ``cancel()`` returns no
further byte of the transfer lands. A peer's regions stay pinned while a transfer uses them.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BackendError, PeerDisconnectedError, PeerError, UsageError
from ..handle import Notification, TransferState
from ..memory import MemoryKind
from ..plan import RegionTable
from .base import Backend, BackendCaps, BackendContext, Connection, Op, Request, Scope

if TYPE_CHECKING:
    from ..descs import Descs
    from ..memory import Region
    from ..peer import Peer
    from ..plan import TransferPlan

# Same-process agents find each other's backends here by agent uid (weak: a closed agent simply disappears).
_LIVE: weakref.WeakValueDictionary[str, LocalBackend] = weakref.WeakValueDictionary()

# Bound the work done between cancellation checks: cancel() waits at most for one chunk.
_CHUNK_PAIRS = 1024
_CHUNK_NBYTES = 16 << 20


class LocalRequest(Request):
    """A queued same-process copy, split into chunks that the worker threads copy."""

    def __init__(
        self,
        plan: TransferPlan,
        sources: np.ndarray,
        destinations: np.ndarray,
        target: LocalBackend,
        notify: bytes | None,
        fault: Any = None,
    ) -> None:
        super().__init__(plan.nbytes)
        self.cond = threading.Condition()
        self.cancelled = False
        self.active = 0  # chunks being copied right now; cancel() waits for them
        self.chunks_left = 0
        self.sources, self.destinations, self.sizes = sources, destinations, plan.local.nbytes
        self.on_device = plan.on_device
        self.target = target
        self.remote_regions = plan.remote_regions
        self.notify = notify
        self.fault = fault
        self.released = False
        self.finished = threading.Event()  # set once final: waiters block on it instead of sleeping
        # Both sides' Region objects: their memory outlives a forced deregister while the copy runs.
        self.keepalive: list[Region | None] = [
            *(target.region(i) for i in plan.remote_regions),
            *plan.local_regions_objects(),
        ]

    def poll(self) -> TransferState:
        return self.state

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            while self.active:  # a chunk being copied finishes; none starts after this
                self.cond.wait()
            if self.state is TransferState.PENDING:
                self.state = TransferState.CANCELLED
        self.release()

    def wait(self, seconds: float) -> None:
        self.finished.wait(seconds)

    def release(self) -> None:
        """Once final: unpin the peer's regions and wake waiters (the first call does it)."""
        with self.cond:
            if self.released:
                return
            self.released = True
        self.target.unpin(self.remote_regions)
        self.finished.set()


class LocalConnection(Connection):
    """A peer in this process: nothing to open or close; its backend is looked up per message (it may close)."""

    def __init__(self, backend: LocalBackend, peer: Peer) -> None:
        self.backend, self.peer = backend, peer

    def notify(self, payload: bytes) -> None:
        sender = self.backend.attached_context.agent_name
        self.backend.target(self.peer).attached_context.deliver(Notification(sender, payload))


class LocalBackend(Backend):
    """Copies between regions of agents in this process, with a few worker threads."""

    caps = BackendCaps(
        name="local",
        wire="local",
        memory_kinds=frozenset({MemoryKind.HOST, MemoryKind.CUDA}),
        scope=Scope.PROCESS,
        can_cancel=True,
        preference=100,
    )

    def __init__(self, threads: int | None = None) -> None:
        super().__init__()
        self.threads = threads or min(4, os.cpu_count() or 1)
        self._regions: dict[int, Region] = {}
        self._pins: Counter[int] = Counter()
        self._pins_lock = threading.Lock()
        self._table: RegionTable | None = None  # spans of self._regions, rebuilt after a change
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._closed = False

    def attach(self, context: BackendContext) -> None:
        super().attach(context)
        _LIVE[context.agent_uid] = self

    @property
    def attached_context(self) -> BackendContext:
        """The owning agent's context; UsageError if no agent ever attached this backend."""
        if self.context is None:
            raise UsageError("the local backend was never attached to an agent")
        return self.context

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def region(self, index: int) -> Region | None:
        """This agent's region registered with the backend at ``index``, or None."""
        return self._regions.get(index)

    # ---- regions and peers -------------------------------------------------------------------------------------

    def register(self, region: Region) -> bytes:
        with self._pins_lock:
            self._regions[region.index] = region
            self._table = None
        return b""

    def deregister(self, region: Region) -> None:
        with self._pins_lock:
            self._regions.pop(region.index, None)
            self._table = None

    def busy(self, region: Region) -> bool:
        """True while a peer's transfer pins ``region`` (the :class:`~kvxfer.backends.base.ServesPeers` ability)."""
        return self._pins[region.index] > 0

    def connect(self, peer: Peer) -> LocalConnection:
        self.target(peer)
        return LocalConnection(self, peer)

    def target(self, peer: Peer) -> LocalBackend:
        """The backend of ``peer``, an agent of this process; PeerDisconnectedError when it is gone."""
        target = _LIVE.get(peer.meta.uid)
        if target is None or target.closed:
            raise PeerDisconnectedError(f"peer {peer.name!r} is not a live agent of this process", peer.name)
        return target

    def map_remote(self, peer: Peer, region_index: int, device: int) -> int | None:
        region = self.target(peer).region(region_index)
        if region is None:
            raise PeerError(f"peer {peer.name!r} has no region at index {region_index}", peer.name)
        return region.addr  # same process: the peer's pointers are ours

    def admit(self, descs: Descs, indices: tuple[int, ...]) -> None:
        """Pin this agent's regions ``indices`` for a peer's transfer, once every descriptor of ``descs`` lies
        inside a region this agent really registered: a peer's copy of our metadata is only a claim."""
        agent_name = self.attached_context.agent_name
        with self._pins_lock:
            missing = [i for i in indices if i not in self._regions]
            if missing:
                raise PeerError(f"peer region index {missing[0]} is no longer registered", agent_name)
            if self._table is None:
                regions = list(self._regions.values())
                self._table = RegionTable(
                    [r.index for r in regions], [r.addr for r in regions], [r.nbytes for r in regions]
                )
            self._table.check(descs, "remote_descs", f"agent {agent_name!r} as it registered them")
            self._pins.update(indices)

    def unpin(self, indices: tuple[int, ...]) -> None:
        """Release the pins :meth:`admit` took on ``indices``."""
        with self._pins_lock:
            self._pins.subtract(indices)

    # ---- transfers ---------------------------------------------------------------------------------------------

    def post(self, op: Op, plan: TransferPlan, notify: bytes | None, fault: Any = None) -> LocalRequest:
        target = self.target(plan.peer)
        target.admit(plan.remote, plan.remote_regions)
        local, remote = plan.local.addr, plan.remote.addr
        sources, destinations = (remote, local) if op is Op.READ else (local, remote)
        request = LocalRequest(plan, sources, destinations, target, notify, fault)
        if not self._workers:
            self._start_workers()
        self._jobs.put((request, -1, -1))
        return request

    def _fail(self, request: LocalRequest, error: Exception) -> None:
        with request.cond:
            if request.state is TransferState.PENDING:
                request.error = BackendError(f"local copy failed: {error}", backend=self.caps.name)
                request.error.__cause__ = error
                request.state = TransferState.FAILED
        request.release()

    # ---- the workers -------------------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        for i in range(self.threads):
            worker = threading.Thread(
                target=self._work, name=f"kvxfer-local-{self.attached_context.agent_name}-{i}", daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def _work(self) -> None:
        device = _DeviceCopier()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            request, start, stop = job
            try:
                if start < 0:
                    self._begin(request)
                else:
                    self._copy_chunk(request, start, stop, device)
            except Exception as error:  # noqa: BLE001 a failed copy fails its transfer (converted to BackendError), never the worker
                self._fail(request, error)

    def _begin(self, request: LocalRequest) -> None:
        if not self._apply_fault_before(request):
            if request.state.final:
                request.release()
            return
        bounds = _chunks(request.sizes)
        request.chunks_left = len(bounds)
        for start, stop in bounds:
            self._jobs.put((request, start, stop))

    def _copy_chunk(self, request: LocalRequest, start: int, stop: int, device: _DeviceCopier) -> None:
        with request.cond:
            if request.cancelled or request.state.final:
                return
            request.active += 1
        last = False
        try:
            copy = device if request.on_device else _host_copy
            copy(request.sources[start:stop], request.destinations[start:stop], request.sizes[start:stop])
            with request.cond:
                request.chunks_left -= 1
                last = request.chunks_left == 0
            if last:
                self._apply_fault_after(request)
        finally:
            with request.cond:
                request.active -= 1
                finished = last and request.state is TransferState.PENDING and not request.cancelled
                if finished:
                    request.state = TransferState.DONE
                request.cond.notify_all()
        if finished:
            request.release()
            if request.notify is not None:
                request.target.attached_context.deliver(Notification(self.attached_context.agent_name, request.notify))

    def _apply_fault_before(self, request: LocalRequest) -> bool:
        """Hook for the mock backend: False means the request must not move bytes."""
        return True

    def _apply_fault_after(self, request: LocalRequest) -> None:
        """Hook for the mock backend, run after the last bytes moved and before completion."""

    def close(self) -> None:
        self._closed = True
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=self.context.timeouts.close if self.context else 5.0)


def _chunks(sizes: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of at most _CHUNK_PAIRS pairs and about _CHUNK_NBYTES bytes each."""
    bounds, start, n = [], 0, len(sizes)
    cumulative = np.cumsum(sizes, dtype=np.uint64)
    while start < n:
        base = int(cumulative[start - 1]) if start else 0
        stop = int(np.searchsorted(cumulative, base + _CHUNK_NBYTES, side="right"))
        stop = min(max(stop, start + 1), start + _CHUNK_PAIRS, n)
        bounds.append((start, stop))
        start = stop
    return bounds


def _host_copy(sources: np.ndarray, destinations: np.ndarray, sizes: np.ndarray) -> None:
    memmove = ctypes.memmove
    for source, destination, size in zip(sources.tolist(), destinations.tolist(), sizes.tolist(), strict=True):
        memmove(destination, source, size)


class _DeviceCopier:
    """Copies with CUDA involved, on a stream of the calling worker thread (created on first use)."""

    def __init__(self) -> None:
        self._stream: Any = None

    def __call__(self, sources: np.ndarray, destinations: np.ndarray, sizes: np.ndarray) -> None:
        from ..devices import cupy_module

        cupy = cupy_module()
        if self._stream is None:
            self._stream = cupy.cuda.Stream(non_blocking=True)
        copy_default = 4  # cudaMemcpyDefault: direction inferred from unified addresses
        for source, destination, size in zip(sources.tolist(), destinations.tolist(), sizes.tolist(), strict=True):
            cupy.cuda.runtime.memcpyAsync(destination, source, size, copy_default, self._stream.ptr)
        self._stream.synchronize()
