"""Same-process copies: host memory by memmove, CUDA memory by cupy copies; one worker thread per agent.

Peers must live in this process (two agents of one program, or an agent with itself). The worker copies in
chunks and checks for cancellation between chunks under the request's lock, so once ``cancel()`` returns no
further byte of the transfer lands. A peer's regions stay pinned while a transfer uses them.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BackendError, PeerDisconnectedError, PeerError
from ..handle import Notification, TransferState
from ..memory import MemoryKind
from .base import Backend, BackendCaps, Op, Request

if TYPE_CHECKING:
    from ..memory import Region
    from ..peer import Peer
    from ..plan import TransferPlan

# Same-process agents find each other's backends here by agent uid (weak: a closed agent simply disappears).
_LIVE: "weakref.WeakValueDictionary[str, LocalBackend]" = weakref.WeakValueDictionary()

# Bound the work done between cancellation checks: cancel() waits at most for one chunk.
_CHUNK_PAIRS = 1024
_CHUNK_NBYTES = 16 << 20


class LocalRequest(Request):
    """A queued same-process copy."""

    def __init__(self, nbytes: int, sources: np.ndarray, destinations: np.ndarray, sizes: np.ndarray,
                 on_device: bool, target: "LocalBackend", remote_regions: tuple[int, ...], notify: bytes | None,
                 fault: Any = None) -> None:
        super().__init__(nbytes)
        self.lock = threading.Lock()
        self.cancelled = False
        # Set without the lock so the worker yields it: threading locks are not fair, and a worker re-taking the
        # lock chunk after chunk would starve cancel() until the whole copy is done.
        self.cancel_requested = False
        self.sources, self.destinations, self.sizes = sources, destinations, sizes
        self.on_device = on_device
        self.target = target
        self.remote_regions = remote_regions
        self.notify = notify
        self.fault = fault
        self.released = False
        self.keepalive: list[Any] = []  # the regions of both sides: their memory outlives a forced deregister


class LocalBackend(Backend):
    """Copies between regions of agents in this process."""

    caps = BackendCaps(name="local", wire="local", memory_kinds=frozenset({MemoryKind.HOST, MemoryKind.CUDA}),
                       scope="process", can_cancel=True, preference=100)

    def __init__(self) -> None:
        super().__init__()
        self._regions: dict[int, Region] = {}
        self._pins: Counter[int] = Counter()
        self._pins_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[LocalRequest | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._closed = False

    def attach(self, context: Any) -> None:
        super().attach(context)
        _LIVE[context.agent_uid] = self

    # ---- regions and peers -------------------------------------------------------------------------------------

    def register(self, region: "Region") -> bytes:
        self._regions[region.index] = region
        return b""

    def deregister(self, region: "Region") -> None:
        self._regions.pop(region.index, None)

    def busy(self, region: "Region") -> bool:
        return self._pins[region.index] > 0

    def connect(self, peer: "Peer") -> None:
        self._target(peer)

    def _target(self, peer: "Peer") -> "LocalBackend":
        target = _LIVE.get(peer.meta.uid)
        if target is None or target._closed:
            raise PeerDisconnectedError(f"peer {peer.name!r} is not a live agent of this process", peer.name)
        return target

    def _pin(self, indices: tuple[int, ...]) -> None:
        with self._pins_lock:
            missing = [i for i in indices if i not in self._regions]
            if missing:
                raise PeerError(f"peer region index {missing[0]} is no longer registered", self.context.agent_name)
            self._pins.update(indices)

    def _unpin(self, indices: tuple[int, ...]) -> None:
        with self._pins_lock:
            self._pins.subtract(indices)

    # ---- transfers ---------------------------------------------------------------------------------------------

    def post(self, op: Op, plan: "TransferPlan", notify: bytes | None, fault: Any = None) -> LocalRequest:
        target = self._target(plan.peer)
        remote_regions = tuple(int(r) for r in np.unique(plan.remote.region))
        target._pin(remote_regions)
        local, remote = plan.local, plan.remote
        sources, destinations = (remote.addr, local.addr) if op is Op.READ else (local.addr, remote.addr)
        on_device = bool((local.device >= 0).any() or (remote.device >= 0).any())
        request = LocalRequest(plan.nbytes, sources, destinations, local.nbytes, on_device, target, remote_regions,
                               notify, fault)
        request.keepalive = [target._regions.get(i) for i in remote_regions] + list(plan.local_regions_objects())
        self._start_worker()
        self._jobs.put(request)
        return request

    def poll(self, request: Request) -> TransferState:
        return request.state

    def cancel(self, request: Request) -> None:
        assert isinstance(request, LocalRequest)
        request.cancel_requested = True
        with request.lock:
            request.cancelled = True
            if request.state is TransferState.PENDING:
                request.state = TransferState.CANCELLED
        self._release(request)

    def send_notification(self, peer: "Peer", payload: bytes) -> None:
        self._target(peer).context.deliver(Notification(self.context.agent_name, payload))

    def _release(self, request: LocalRequest) -> None:
        with request.lock:
            if request.released:
                return
            request.released = True
        request.target._unpin(request.remote_regions)

    # ---- the worker --------------------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name=f"kvxfer-local-{self.context.agent_name}",
                                            daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            request = self._jobs.get()
            if request is None:
                return
            try:
                self._run(request)
            except Exception as error:  # a failed copy fails its transfer, never the worker
                with request.lock:
                    if request.state is TransferState.PENDING:
                        request.error = BackendError(f"local copy failed: {error}", backend=self.caps.name)
                        request.error.__cause__ = error
                        request.state = TransferState.FAILED
            self._release(request)

    def _run(self, request: LocalRequest) -> None:
        if not self._apply_fault_before(request):
            return
        copy = _device_copier(request) if request.on_device else _host_copy
        sources, destinations, sizes = request.sources, request.destinations, request.sizes
        for start, stop in _chunks(sizes):
            if request.cancel_requested:
                return
            with request.lock:
                if request.cancelled:
                    return
                copy(sources[start:stop], destinations[start:stop], sizes[start:stop])
        self._apply_fault_after(request)
        with request.lock:
            if request.cancelled:
                return
            request.state = TransferState.DONE
        if request.notify is not None:
            request.target.context.deliver(Notification(self.context.agent_name, request.notify))

    def _apply_fault_before(self, request: LocalRequest) -> bool:
        """Hook for the mock backend: False means the request must not move bytes."""
        return True

    def _apply_fault_after(self, request: LocalRequest) -> None:
        """Hook for the mock backend, run after the bytes moved and before completion."""

    def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=self.context.timeouts.close if self.context else 5.0)


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
    for source, destination, size in zip(sources.tolist(), destinations.tolist(), sizes.tolist()):
        memmove(destination, source, size)


def _device_copier(request: LocalRequest) -> Any:
    from ..devices import cupy_module

    cupy = cupy_module()
    stream = cupy.cuda.Stream(non_blocking=True)
    copy_default = 4  # cudaMemcpyDefault: direction inferred from unified addresses

    def copy(sources: np.ndarray, destinations: np.ndarray, sizes: np.ndarray) -> None:
        for source, destination, size in zip(sources.tolist(), destinations.tolist(), sizes.tolist()):
            cupy.cuda.runtime.memcpyAsync(destination, source, size, copy_default, stream.ptr)
        stream.synchronize()

    return copy

