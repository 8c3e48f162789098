"""UcxBackend: one-sided READ/WRITE with peers on this host or others, host and CUDA memory, through UCP.

One UCP context and worker per backend (i.e. per agent). The worker is used under one lock by the caller's
thread (post, poll) and the progress thread (everything else). Data paths per transfer: cross-memory attach for
same-host host memory, staged messages for small host fragments otherwise, GPU slots for small device fragments
(one kernel + one get/put per chunk), one put/get per fragment for the rest (see transfer.py). docs/backends.md
explains the choices and their measurements.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...devices import cuda_available
from ...errors import DescriptorError, PeerDisconnectedError, UsageError
from ...memory import MemoryKind
from ..base import Backend, BackendCaps, BackendContext, Op, Scope
from .cma import CmaError, CrossMemory, copy_threads, plan_batches
from .config import UcxConfig
from .connection import UcxConnection
from .context import Context
from .device_serve import DeviceServer
from .device_slots import DeviceSlots, check_device_spans
from .exports import ExportTable
from .library import load_library, ucx_available
from .link import Link
from .links import Links
from .pool import BufferPool
from .progress import ProgressThread
from .responder import Responder, pack_notification
from .transfer import UcxRequest, new_request
from .wire import Header, Kind, WorkerInfo, keys_digest
from .worker import Worker

if TYPE_CHECKING:
    from ...memory import Region
    from ...peer import Peer
    from ...plan import TransferPlan
    from .staged import StagedTransfer

_log = logging.getLogger("kvxfer.ucx")
STAGE_MIN_FRAGMENTS = 128


class UcxBackend(Backend):
    """UCP one-sided transfers (see the module docstring). ``config`` defaults to the KVXFER_UCX_* variables."""

    caps = BackendCaps(
        name="ucx",
        wire="ucx",
        memory_kinds=frozenset({MemoryKind.HOST, MemoryKind.CUDA}),
        scope=Scope.NETWORK,
        can_cancel=False,
        preference=10,
    )

    def __init__(self, config: UcxConfig | None = None) -> None:
        super().__init__()
        self.config = config or UcxConfig.from_env()
        self._memhs: dict[int, Any] = {}
        self._views: dict[int, tuple[int, np.ndarray]] = {}
        self._device_regions: dict[int, tuple[int, int, int]] = {}  # index -> (addr, nbytes, device)
        self._slots: dict[tuple[str, int], DeviceSlots] = {}
        self._abandoned: dict[tuple[int, int], tuple[DeviceSlots, int]] = {}
        self._active: dict[int, UcxRequest] = {}
        self._awaiting: dict[int, StagedTransfer] = {}
        self._outbox: deque[Callable[[], None]] = deque()
        self._batches: weakref.WeakKeyDictionary[TransferPlan, list] = weakref.WeakKeyDictionary()
        # plan -> (link serial, peer export-table generation) it was last checked against (exports.py); never the
        # link itself: a value that reaches its key (link -> lost error -> traceback -> plan) would pin both forever
        self._checked: weakref.WeakKeyDictionary[TransferPlan, tuple[int, int]] = weakref.WeakKeyDictionary()
        self.exports = ExportTable()
        self._ids = itertools.count(1)
        self._last_liveness = self._quiet_since = 0.0
        self._closed = False
        self.cuda_device: int | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return ucx_available()

    # ---- lifetime ----------------------------------------------------------------------------------------------

    def attach(self, context: BackendContext) -> None:
        super().attach(context)
        self.timeouts = context.timeouts
        self.library = load_library(self.config)
        self.ucp = Context(self.library, context.agent_name)
        self.responder = Responder(self)
        self.links = Links(self)
        self.device_server = DeviceServer(self)
        self.staging = BufferPool(self.config.stage_chunk, 4 * self.config.stage_inflight)
        self.worker = Worker(
            self.library,
            self.ucp.handle,
            context.agent_name,
            self.responder.on_message,
            self.staging,
            self.responder.too_large,
            self.responder.on_refused,
            self.responder.placement,
        )
        self.cma = CrossMemory(self.library, threads=self.config.cma_threads or copy_threads())
        self._token = np.frombuffer(os.urandom(16), dtype=np.uint8).copy()
        self.progress = ProgressThread(self, f"kvxfer-ucx-{context.agent_name}")
        self.progress.start()
        _log.info(
            "ucx: libucp %s from %s (%s); error policy %s, cma %s",
            self.library.version_string,
            self.library.path,
            self.library.source,
            self.config.error_mode,
            self.config.cma,
        )

    def attached_context(self) -> BackendContext:
        """The owning agent's context; UsageError before :meth:`attach`."""
        context = self.context
        if context is None:
            raise UsageError("the ucx backend is used before an agent attached it")
        return context

    def info(self) -> bytes:
        keys = [(index, memh.packed_rkey) for index, memh in list(self._memhs.items())]
        return WorkerInfo(
            self.worker.address,
            self.config.error_mode,
            self._token.ctypes.data,
            self._token.tobytes(),
            one_sided=self.config.one_sided != "off",
            exports_addr=self.exports.address,
            digest=keys_digest(self.worker.address, keys),
        ).encode()

    def close(self) -> None:
        if self._closed or self.context is None:
            return
        self._closed = True
        self.progress.stop(self.timeouts.close)
        with self.worker.lock:
            for request in list(self._active.values()):
                request.halt()
                request.fail("the backend was closed")
            self.device_server.close()
            self.links.close_all()
            give_up = time.monotonic() + self.timeouts.close
            while self.links.reap() and time.monotonic() < give_up:
                self.worker.progress()
            self.links.forget_closing()
            for memh in self._memhs.values():
                memh.close()
            self._memhs.clear()
            for pool in self._slots.values():
                pool.close()
            self._slots.clear()
            self.worker.close()
        self.flush_outbox()
        self.ucp.close()
        self.cma.close()

    # ---- regions -----------------------------------------------------------------------------------------------

    def register(self, region: Region) -> bytes:
        with self.worker.lock:
            memh = self.ucp.map(region.addr, region.nbytes, region.kind is MemoryKind.CUDA)
            self._memhs[region.index] = memh
            if self.config.one_sided != "off":
                self.exports.add(region.index, region.addr, region.nbytes)
            if region.kind is MemoryKind.HOST:
                self._views[region.index] = (region.addr, region.as_numpy())
            else:
                self._device_regions[region.index] = (region.addr, region.nbytes, region.device)
                if self.cuda_device is None:
                    self.cuda_device = region.device  # the progress thread makes this device current
        return memh.packed_rkey

    def deregister(self, region: Region) -> None:
        with self.worker.lock:
            self.exports.remove(region.index)
            self._views.pop(region.index, None)
            self._device_regions.pop(region.index, None)
            memh = self._memhs.pop(region.index, None)
            if memh is not None:
                memh.close()

    def host_view(self, index: int) -> tuple[int, np.ndarray]:
        """(base address, uint8 view) of our registered host region ``index``; KeyError if there is none."""
        return self._views[index]

    def check_device_spans(self, addr: np.ndarray, nbytes: np.ndarray, region: np.ndarray) -> int:
        """The device of spans that all lie in our registered CUDA regions of one device; ValueError if not."""
        return check_device_spans(addr, nbytes, region, self._device_regions)

    @property
    def device_slot_nbytes(self) -> int:
        """Bytes per GPU staging slot (4 staged host chunks)."""
        return 4 * self.config.stage_chunk

    def device_slots(self, role: str, device: int) -> DeviceSlots:
        """Our GPU slot pool for ``role`` ("ask": chunks we request; "serve": chunks peers request) on ``device``,
        allocated and registered on first use (under the worker lock)."""
        pool = self._slots.get((role, device))
        if pool is None:
            pool = self._slots[(role, device)] = DeviceSlots(
                self.ucp, device, self.device_slot_nbytes, self.config.stage_inflight
            )
        return pool

    def abandon_slot(self, transfer: int, chunk: int, pool: DeviceSlots, slot: int) -> None:
        """A finished transfer left ``slot`` with an unanswered chunk: written off until its answer comes."""
        pool.write_off(slot)
        self._abandoned[(transfer, chunk)] = (pool, slot)

    def memh_list(self, regions: np.ndarray) -> list:
        """The ucp_mem_h of each local fragment's region (int32[n] region indices)."""
        return self._per_fragment(regions, lambda i: self._memhs[i].handle, "local")

    def rkey_list(self, link: Link, regions: np.ndarray) -> list:
        """The unpacked rkey of each remote fragment's region (int32[n] indices into the peer's regions)."""
        return self._per_fragment(regions, lambda i: link.rkeys[i], f"peer {link.name!r}")

    @staticmethod
    def _per_fragment(regions: np.ndarray, lookup: Callable[[int], Any], owner: str) -> list:
        try:
            if bool((regions == regions[0]).all()):
                return [lookup(int(regions[0]))] * len(regions)
            return [lookup(i) for i in regions.tolist()]
        except KeyError as error:
            raise DescriptorError(f"{owner} region {error} has no UCX registration") from None

    # ---- peers -------------------------------------------------------------------------------------------------

    def connect(self, peer: Peer) -> UcxConnection:
        self.links.connect(peer)
        return UcxConnection(self, peer)

    def transports(self, peer: Peer) -> list[tuple[str, str]]:
        """(transport, device) per UCX lane to ``peer``, e.g. [("sysv", "memory"), ("cma", "memory")]."""
        return list(self.links.get(peer).transports)

    def data_path(self, plan: TransferPlan) -> str:
        """How a post of ``plan`` moves its bytes: "cma", "staged" or "direct" (see transfer.py). A peer whose
        memory may not be reached one-sidedly (link.one_sided_ok) gets staged messages only, which it checks."""
        link = self.links.get(plan.peer)
        if plan.on_device:
            if self._stage_on_device(plan):
                return "staged"
            if link.one_sided_ok:
                return "direct"
            reason = self._device_stage_refusal(plan)
            if reason is None:
                return "staged"
            raise DescriptorError(
                f"peer {link.name!r} accepts only target-checked (staged) transfers over its "
                f"transports, and this plan cannot be staged: {reason}"
            )
        if link.cma_ok:
            return "cma"
        if not link.one_sided_ok:
            if (plan.local.device >= 0).any() or (plan.remote.device >= 0).any():  # pragma: no cover (on_device)
                raise DescriptorError("mixed host/device plans need one-sided access")
            return "staged"
        small = plan.nbytes < self.config.stage_below * len(plan)
        # A staged transfer costs a round trip through the target (~0.3 ms here): worth it from ~100 fragments.
        return "staged" if small and len(plan) >= STAGE_MIN_FRAGMENTS else "direct"

    @staticmethod
    def _device_stage_refusal(plan: TransferPlan) -> str | None:
        """Why ``plan`` (CUDA memory) cannot go through GPU staging slots at all; None if it can."""
        local, remote = plan.local, plan.remote
        if (local.device < 0).any() or (remote.device < 0).any():
            return "it mixes host and CUDA memory"
        if (local.device != local.device[0]).any():
            return "its local fragments are on several devices"
        if not cuda_available():
            return "CUDA is not available here"
        return None

    def check_one_sided(self, link: Link, plan: TransferPlan) -> None:
        """Before a one-sided post (cma, direct) to a same-host peer: every remote span must lie in a region the
        peer exports now (its export table, read through a cross-memory call; exports.py). DescriptorError if not,
        PeerDisconnectedError if its process is gone."""
        view = link.exports
        if view is None:
            return  # RDMA: the hardware checks the remote keys
        try:
            generation = view.generation()
            if self._checked.get(plan) != (link.serial, generation):
                remote = plan.remote
                view.check(remote.addr, remote.nbytes, remote.region)
                self._checked[plan] = (link.serial, generation)
        except CmaError as error:
            if error.errno == errno.ESRCH:
                with self.worker.lock:
                    self.links.lose(link, f"its process (pid {link.pid}) is gone", error)
                self.flush_outbox()
                raise PeerDisconnectedError(f"ucx: peer {link.name!r} is gone", link.name) from error
            raise DescriptorError(f"cannot read peer {link.name!r}'s export table: {error}") from error

    def _stage_on_device(self, plan: TransferPlan) -> bool:
        local, remote = plan.local, plan.remote
        if len(plan) < STAGE_MIN_FRAGMENTS or plan.nbytes >= self.config.stage_below * len(plan):
            return False
        if (local.device < 0).any() or (remote.device < 0).any() or (local.device != local.device[0]).any():
            return False
        return int(local.nbytes.max()) <= self.device_slot_nbytes and cuda_available()

    def process_exited(self, link: Link) -> None:
        """A watched peer process exited (called by the progress thread)."""
        self.links.process_exited(link)

    # ---- transfers ---------------------------------------------------------------------------------------------

    def next_transfer_id(self) -> int:
        """A new transfer id (unique within this backend)."""
        return next(self._ids)

    def cma_batches(self, plan: TransferPlan) -> list:
        """The cross-memory batches of ``plan`` (computed once per plan: plans are posted many times)."""
        batches = self._batches.get(plan)
        if batches is None:
            batches = plan_batches(plan.local.addr, plan.remote.addr, plan.local.nbytes, inline=self.config.cma_inline)
            self._batches[plan] = batches
        return batches

    def post(self, op: Op, plan: TransferPlan, notify: bytes | None) -> UcxRequest:
        link = self.links.get(plan.peer)
        strategy = self.data_path(plan)
        if strategy != "staged":
            self.check_one_sided(link, plan)
        request = new_request(self, link, op, plan, notify, strategy)
        with self.worker.lock:
            # The progress thread may have lost the link (or close() run) since links.get(): a request added to a
            # lost link would never be halted, and would send on its closed endpoint.
            if link.lost is not None or self._closed:
                raise PeerDisconnectedError(f"ucx: {link.lost or 'the backend is closed'}", link.name)
            self._active[request.id] = request
            link.requests.add(request)
        request.start()
        return request

    def retire(self, request: UcxRequest) -> None:
        """Forget a final request (under the worker lock)."""
        self._active.pop(request.id, None)
        self._awaiting.pop(request.id, None)
        request.link.requests.discard(request)

    def expect_replies(self, request: StagedTransfer) -> None:
        """Route ACK/DATA/FAIL messages for ``request.id`` to it."""
        self._awaiting[request.id] = request

    def reply_placement(self, header: Header, length: int) -> int:
        """Where the DATA answer ``header`` (``length`` bytes) of one of our staged chunks may land directly: the
        chunk's one local span (0: a pooled buffer). Under the worker lock, inside a UCX callback."""
        request = self._awaiting.get(header.transfer)
        return request.placement(header, length) if request is not None else 0

    def busy(self, region: Region) -> bool:
        """True while a UCX send reads from, or a receive lands in, ``region`` directly (deregister waits: the
        :class:`~kvxfer.backends.base.ServesPeers` ability)."""
        with self.worker.lock:
            return self.worker.touches(region.addr, region.nbytes)

    def route_reply(self, header: Header, data: Any) -> None:
        """An answer to one of our staged chunks (under the worker lock)."""
        request = self._awaiting.get(header.transfer)
        if request is not None:
            request.on_reply(header, data)
            return
        abandoned = self._abandoned.pop((header.transfer, header.chunk), None)
        if abandoned is not None:  # a late answer: the peer touches that slot no more
            abandoned[0].recover(abandoned[1])

    # ---- notifications -----------------------------------------------------------------------------------------

    def send_notify(self, link: Link, payload: bytes, on_done: Callable[[int], None] | None) -> None:
        """Send a NOTIFY message carrying our agent name (under the worker lock)."""
        body = np.frombuffer(pack_notification(self.attached_context().agent_name, payload), dtype=np.uint8)
        self.worker.send(
            link.ep.handle, Header(Kind.NOTIFY).encode(), body.ctypes.data, body.size, keepalive=body, on_done=on_done
        )

    # ---- progress ----------------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Ask the progress thread for a round."""
        self.progress.wake()

    def post_outbox(self, work: Callable[[], None]) -> None:
        """Run ``work`` outside the worker lock, soon (agent callbacks may call back into us)."""
        self._outbox.append(work)

    def flush_outbox(self) -> None:
        """Run the queued outbox work (any thread, outside the worker lock)."""
        while self._outbox:
            try:
                work = self._outbox.popleft()
            except IndexError:
                return
            try:
                work()
            except Exception as error:  # noqa: BLE001 an agent callback failing must not stop progress; logged
                _log.exception("ucx: callback failed: %s", error)

    def progress_round(self) -> float | None:
        """One progress-thread round; how long it may then sleep (s), None: go on at once."""
        with self.worker.lock:
            if self._closed:
                return self.config.liveness_interval
            events = self.worker.progress() + self.device_server.poll()
            for request in list(self._active.values()):
                request.advance()
            now = time.monotonic()
            if now - self._last_liveness > self.config.liveness_interval:
                self._last_liveness = now
                self.links.check_processes()
            self.links.reap()
            if events or self._outbox or not self.worker.arm():
                self._quiet_since = now
                return None
            # rendezvous receives progress without events: spin a while, then nap
            if self.worker.receiving or self.device_server.busy:
                return None if now - self._quiet_since < 0.002 else 0.001
            return 0.005 if self._active or self.worker.busy else self.config.liveness_interval
