"""The parts of one UCX backend, as its transfer classes, responder, device server and progress thread use them.

:class:`UcxBackend` (backend.py) builds one :class:`Services` when an agent attaches it and hands it down; nothing
below the backend holds the backend itself, so the backend is a facade over these parts and no module imports
backend.py. Layers, each importing only those under it:

    backend.py                      the facade: the Backend contract
    paths.py, progress.py           which path a plan takes; the progress thread
    transfer.py, staged.py, device_staged.py, responder.py
    services.py                     this bundle
    device_serve.py, replies.py     the target's side of GPU staged chunks; answers on reply endpoints
    links.py, link.py, regions.py, ledger.py, cma.py, exports.py, device_slots.py, gather.py, pool.py, outbox.py,
    waker.py, wire.py, config.py
    binding/                        cffi: the only code that touches ``ffi`` / ``lib``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..base import BackendContext
from .binding import Context, UcxLibrary, Worker
from .cma import CrossMemory
from .config import UcxConfig
from .device_serve import DeviceServer
from .device_slots import SlotPools
from .ledger import Ledger
from .link import Link
from .links import Links
from .outbox import Outbox
from .pool import BufferPool
from .regions import LocalRegions
from .waker import Waker
from .wire import Header, Kind, pack_notification

if TYPE_CHECKING:
    from ...handle import Timeouts


@dataclass(eq=False)
class Services:
    """One backend's parts (built by ``UcxBackend.attach``; ``closed`` set by its ``close``).

    ``worker.lock`` guards the worker and everything marked "under the worker lock" in the parts."""

    context: BackendContext  # the owning agent's: name, host, timeouts, limits, deliver / peer_lost callbacks
    config: UcxConfig
    library: UcxLibrary
    ucp: Context
    worker: Worker
    cma: CrossMemory
    staging: BufferPool  # host buffers of staged chunks and rendezvous receives
    regions: LocalRegions  # our registered regions
    slots: SlotPools  # GPU staging slots
    ledger: Ledger  # transfers in flight
    links: Links  # peers
    device_server: DeviceServer  # the target's side of GPU staged chunks
    outbox: Outbox  # agent callbacks, run outside the worker lock
    waker: Waker  # the progress thread's doorbell
    closed: bool = False

    @property
    def timeouts(self) -> Timeouts:
        """The agent's timeouts (``transfer``: a transfer's deadline; ``close``: how long close may wait)."""
        return self.context.timeouts

    def wake(self) -> None:
        """Ask the progress thread for a round (any thread)."""
        self.waker.wake()

    def notify(self, link: Link, payload: bytes, on_done: Callable[[int], None] | None) -> None:
        """Send a NOTIFY message carrying our agent name to ``link``'s peer (under the worker lock);
        ``on_done(status)`` once the send completed locally."""
        body = np.frombuffer(pack_notification(self.context.agent_name, payload), dtype=np.uint8)
        self.worker.send(
            link.ep.handle, Header(Kind.NOTIFY).encode(), body.ctypes.data, body.size, keepalive=body, on_done=on_done
        )
