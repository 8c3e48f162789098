"""UcxBackend: one-sided READ/WRITE with peers on this host or others, host and CUDA memory, through UCP.

A facade: the Backend contract over parts it builds when an agent attaches it (services.py lists them and their
layers). One UCP context and worker per backend (i.e. per agent). The worker is used under one lock by the
caller's thread (post, poll) and the progress thread (everything else). Data paths per transfer (paths.py):
cross-memory attach for same-host host memory, staged messages for small host fragments otherwise, GPU slots for
small device fragments (one kernel + one get/put per chunk), one put/get per fragment for the rest.
docs/backends.md explains the choices and their measurements.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from ...errors import PeerDisconnectedError, UsageError
from ...memory import MemoryKind
from ..base import Backend, BackendCaps, BackendContext, Op, Scope
from .binding import Context, Worker, load_library, ucx_available
from .cma import CrossMemory, copy_threads
from .config import UcxConfig
from .connection import UcxConnection
from .device_serve import DeviceServer
from .device_slots import SlotPools
from .ledger import Ledger
from .links import Links
from .outbox import Outbox
from .paths import DataPath, choose, new_request
from .pool import BufferPool
from .progress import ProgressThread
from .regions import LocalRegions
from .replies import Replies
from .responder import Responder
from .services import Services
from .transfer import UcxRequest
from .waker import Waker
from .wire import WorkerInfo, keys_digest

if TYPE_CHECKING:
    from ...memory import Region
    from ...peer import Peer
    from ...plan import TransferPlan

_log = logging.getLogger("kvxfer.ucx")


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
        self._services: Services | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return ucx_available()

    @property
    def services(self) -> Services:
        """The backend's parts (services.py), for inspection; UsageError before an agent attached it."""
        if self._services is None:
            raise UsageError("the ucx backend is used before an agent attached it")
        return self._services

    # ---- lifetime ----------------------------------------------------------------------------------------------

    def attach(self, context: BackendContext) -> None:
        super().attach(context)
        config = self.config
        library = load_library(config)
        ucp = Context(library, context.agent_name)
        staging = BufferPool(config.stage_chunk, 4 * config.stage_inflight)
        worker = Worker(library, ucp.handle, context.agent_name, staging)
        cma = CrossMemory(library, threads=config.cma_threads or copy_threads(), inline=config.cma_inline)
        outbox = Outbox()
        regions = LocalRegions(ucp, export=config.one_sided != "off")
        slots = SlotPools(ucp, 4 * config.stage_chunk, config.stage_inflight)  # a slot: 4 staged host chunks
        replies = Replies(worker, staging)
        self._services = services = Services(
            context=context,
            config=config,
            library=library,
            ucp=ucp,
            worker=worker,
            cma=cma,
            staging=staging,
            regions=regions,
            slots=slots,
            ledger=Ledger(),
            links=Links(worker, config, cma, context, outbox),
            device_server=DeviceServer(worker, regions, slots, context.timeouts, replies),
            outbox=outbox,
            waker=Waker(),
        )
        self._responder = Responder(services, replies)
        worker.receive_with(self._responder)
        self._token = np.frombuffer(os.urandom(16), dtype=np.uint8).copy()
        self._progress = ProgressThread(services, f"kvxfer-ucx-{context.agent_name}")
        self._progress.start()
        _log.info(
            "ucx: libucp %s from %s (%s); error policy %s, cma %s",
            library.version_string,
            library.path,
            library.source,
            config.error_mode,
            config.cma,
        )

    def info(self) -> bytes:
        services = self.services
        address = services.worker.address
        return WorkerInfo(
            address,
            self.config.error_mode,
            self._token.ctypes.data,
            self._token.tobytes(),
            one_sided=self.config.one_sided != "off",
            exports_addr=services.regions.exports.address,
            digest=keys_digest(address, services.regions.packed_keys()),
        ).encode()

    def close(self) -> None:
        services = self._services
        if services is None or services.closed:
            return
        services.closed = True
        timeouts = services.timeouts
        self._progress.stop(timeouts.close)
        worker, links = services.worker, services.links
        with worker.lock:
            for request in list(services.ledger.active.values()):
                request.halt()
                request.fail("the backend was closed")
            services.device_server.close()
            links.close_all()
            give_up = time.monotonic() + timeouts.close
            while links.reap() and time.monotonic() < give_up:
                worker.progress()
            links.forget_closing()
            services.regions.close()
            services.slots.close()
            worker.close()
        services.outbox.flush()
        services.ucp.close()
        services.cma.close()

    # ---- regions -----------------------------------------------------------------------------------------------

    def register(self, region: Region) -> bytes:
        services = self.services
        with services.worker.lock:
            return services.regions.add(region)

    def deregister(self, region: Region) -> None:
        services = self.services
        with services.worker.lock:
            services.regions.remove(region)

    def busy(self, region: Region) -> bool:
        """True while a UCX send reads from, or a receive lands in, ``region`` directly (deregister waits: the
        :class:`~kvxfer.backends.base.ServesPeers` ability)."""
        worker = self.services.worker
        with worker.lock:
            return worker.touches(region.addr, region.nbytes)

    # ---- peers -------------------------------------------------------------------------------------------------

    def connect(self, peer: Peer) -> UcxConnection:
        services = self.services
        services.links.connect(peer)
        return UcxConnection(services, peer)

    def transports(self, peer: Peer) -> list[tuple[str, str]]:
        """(transport, device) per UCX lane to ``peer``, e.g. [("sysv", "memory"), ("cma", "memory")]."""
        return list(self.services.links.get(peer).transports)

    def data_path(self, plan: TransferPlan) -> str:
        """How a post of ``plan`` moves its bytes: "cma", "staged" or "direct" (paths.py)."""
        return self._path(plan).value

    def _path(self, plan: TransferPlan) -> DataPath:
        services = self.services
        return choose(plan, services.links.get(plan.peer), self.config, services.slots.slot_nbytes)

    # ---- transfers ---------------------------------------------------------------------------------------------

    def post(self, op: Op, plan: TransferPlan, notify: bytes | None) -> UcxRequest:
        services = self.services
        link = services.links.get(plan.peer)
        path = self._path(plan)
        if path is not DataPath.STAGED:
            services.links.check_one_sided(link, plan)
        request = new_request(services, link, op, plan, notify, path)
        with services.worker.lock:
            # The progress thread may have lost the link (or close() run) since links.get(): a request added to a
            # lost link would never be halted, and would send on its closed endpoint.
            if link.lost is not None or services.closed:
                raise PeerDisconnectedError(f"ucx: {link.lost or 'the backend is closed'}", link.name)
            services.ledger.add(request)
            link.requests.add(request)
        request.start()
        return request
