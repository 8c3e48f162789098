"""A link: everything the UCX backend holds for one connected peer (endpoint, remote keys, error mode, the
cross-memory path and the liveness watch).

Error mode (both sides compute the same answer from symmetric facts, as UCX requires): ``peer`` if either side's
policy says so; else ``none`` if either says so; else (auto) ``none`` on one host — UCX then picks shared memory,
cma and cuda_ipc — and ``peer`` across hosts. In ``none`` mode UCX reports failures late or never, so liveness of a
same-host peer comes from us: a pidfd of its process (readable the moment it exits), cross-memory calls failing with
ESRCH, and every transfer's deadline.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import HandshakeError, PeerDisconnectedError, UcxStatusError
from .binding import Endpoint, Worker
from .cma import CrossMemory
from .exports import ExportView
from .ledger import Tracked
from .regions import fragment_handles
from .wire import WorkerInfo

if TYPE_CHECKING:
    from ...peer import Peer

_SHARED_MEMORY = {"sysv", "posix", "cma", "xpmem", "knem", "cuda_ipc", "rocm_ipc", "self"}
# Transports whose remote keys the hardware checks (an RDMA memory key covers exactly the registered range).
# Everything else (tcp's software RMA, cma, shared memory, cuda_ipc: the whole allocation) lets a put land
# wherever the initiator says.
RDMA_TRANSPORTS = {"rc_verbs", "rc_mlx5", "dc_mlx5", "ud_verbs", "ud_mlx5", "rc_x", "dc_x", "srd"}
_log = logging.getLogger("kvxfer.ucx")
_SERIALS = itertools.count(1)


def error_mode(local_policy: str, remote_policy: str, same_host: bool) -> str:
    """ "peer" or "none" for an endpoint between two backends with these policies (symmetric in the two)."""
    policies = {local_policy, remote_policy}
    if "peer" in policies:
        return "peer"
    if "none" in policies:
        return "none"
    return "none" if same_host else "peer"


class Link:
    """One connected peer. Methods that touch UCX are called under the worker lock."""

    def __init__(
        self,
        peer: Peer,
        info: WorkerInfo,
        worker: Worker,
        local_policy: str,
        same_host: bool,
        cma: CrossMemory | None,
        on_error: Callable[[Link, int], None],
    ) -> None:
        # Nothing from the metadata reaches libucp unless it matches the digest the peer put in its UCX info.
        info.verify(
            [(region.index, region.keys["ucx"]) for region in peer.meta.regions if region.keys.get("ucx")], peer.name
        )
        self.serial = next(_SERIALS)  # unique per link in this process (caches key on it, never on the link)
        self.name = peer.name
        self.uid = peer.meta.uid
        self.peer = peer
        self.same_host = same_host
        self.mode = error_mode(local_policy, info.error_policy, same_host)
        self.lost: PeerDisconnectedError | None = None
        self.requests: set[Tracked] = set()
        self.pid = peer.meta.pid
        self.pidfd: int | None = None
        self.cma_reason: str | None = "peer is on another host" if not same_host else None
        if same_host:
            # pidfd first, probe second: if the probe then reads our token, the pidfd is the peer's process
            # (a pid recycled in between would fail the probe).
            self._watch_process()
            self.cma_reason = (
                cma.probe(self.pid, info.probe_addr, info.token)
                if cma is not None
                else "cross-memory attach unavailable"
            )
        self.process_verified = self.cma_reason is None and same_host
        if not self.process_verified:
            self.close_watch()
        # One-sided host paths on software transports: only to a peer that allows them, proven to be a process of
        # our uid on this host (the probe), and checked against its export table before each post (exports.py).
        self.peer_allows_one_sided = info.one_sided
        self.exports: ExportView | None = None
        if self.process_verified and info.one_sided and info.exports_addr and cma is not None:
            self.exports = ExportView(cma, self.pid, info.exports_addr, peer.name)
        try:
            self.ep = Endpoint(
                worker, info.address, self.mode == "peer", f"{peer.name}"[:31], lambda status: on_error(self, status)
            )
        except UcxStatusError:
            self.close_watch()
            raise
        self.rkeys: dict[int, Any] = {}
        self.slot_rkeys: dict[bytes, Any] = {}  # the peer's GPU staging slots, by packed key (device_staged.py)
        try:
            for region in peer.meta.regions:
                packed = region.keys.get("ucx")
                if packed:
                    self.rkeys[region.index] = self.ep.unpack_rkey(packed)
        except UcxStatusError as error:
            self.close_keys()
            raise HandshakeError(f"peer {peer.name!r}: a UCX remote key does not unpack: {error}", peer.name) from error
        self.transports = self.ep.transports()

    def rkey_list(self, regions: np.ndarray) -> list[Any]:
        """The unpacked rkey of each remote fragment's region (int32[n] indices into the peer's regions)."""
        return fragment_handles(regions, lambda i: self.rkeys[i], f"peer {self.name!r}")

    @property
    def cma_ok(self) -> bool:
        """True when host-memory transfers may go through cross-memory attach."""
        return self.exports is not None and self.cma_enabled

    @property
    def one_sided_ok(self) -> bool:
        """True when UCX puts/gets may go to the peer's memory without the peer checking them: its transports check
        remote keys in hardware (RDMA), or it is a same-uid process on this host that allows it (exports.py)."""
        return self.exports is not None or self.rma_bounded

    @property
    def rma_bounded(self) -> bool:
        """True when every UCX lane to the peer is an RDMA transport (hardware-checked remote keys)."""
        return bool(self.transports) and all(tl in RDMA_TRANSPORTS for tl, _ in self.transports)

    cma_enabled = True  # the backend turns it off with KVXFER_UCX_CMA=off (the probe still proves liveness)

    def _watch_process(self) -> None:
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError) as error:  # Python < 3.9 or kernel < 5.3: polled with kill(pid, 0)
            _log.debug("ucx: no pidfd for peer %s (pid %d): %s", self.name, self.pid, error)

    def process_alive(self) -> bool:
        """Polling fallback when there is no pidfd (only trusted when the probe proved the pid is the peer's)."""
        if not self.process_verified:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def process_gone(self) -> bool:
        """True if the peer's (verified) process has exited; one non-blocking system call."""
        if self.pidfd is not None:
            return bool(select.select([self.pidfd], [], [], 0)[0])
        return not self.process_alive()

    def describe(self) -> str:
        """One line for the log: error mode, data path and UCX lanes."""
        lanes = ",".join(f"{tl}/{dev}" for tl, dev in self.transports) or "?"
        data = "cma (batched process_vm_readv/writev)" if self.cma_ok else "ucx"
        check = (
            "export table"
            if self.exports is not None
            else "rdma keys"
            if self.rma_bounded
            else "target-checked messages only"
        )
        return f"error mode {self.mode}, host data path {data}, one-sided: {check}, ucx lanes [{lanes}]"

    def on_tcp_only(self) -> bool:
        """True when this same-host link's UCX lanes are tcp with no shared-memory transport."""
        names = {tl for tl, _ in self.transports}
        return "tcp" in names and not names & _SHARED_MEMORY

    def close_keys(self) -> None:
        """Destroy the unpacked remote keys (before the endpoint closes)."""
        for rkey in [*self.rkeys.values(), *self.slot_rkeys.values()]:
            self.ep.destroy_rkey(rkey)
        self.rkeys.clear()
        self.slot_rkeys.clear()

    def close_watch(self) -> None:
        """Close the pidfd."""
        if self.pidfd is not None:
            try:
                os.close(self.pidfd)
            except OSError:
                pass
            self.pidfd = None
