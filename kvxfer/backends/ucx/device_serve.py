"""Staged transfers of small CUDA fragments: the target's half (device_staged.py is the requester's).

A DSCATTER or DGATHER message names our device spans (checked against our registered CUDA regions before anything
moves) and the requester's slot. We take one of our serving slots, then: DSCATTER: answer GRANT with our slot;
the requester puts its chunk there, flushes and sends DCOMMIT; we scatter and answer ACK. (A get of the
requester's slot would save that round trip, but UCX 1.22's get between two processes on one GPU runs at
~0.7 GB/s against ~100+ GB/s for a put: measured, H100 2026-12-06.) DGATHER: gather into our slot, one put into
the requester's slot, endpoint flush (the bytes are then visible there), DATA. Our put goes over an endpoint of
ours to the requester's worker (address and error mode from the message; one per requester, kept): one-sided
operations on the reply endpoint UCX hands an active message crashed UCX 1.22 inside progress with CUDA memory.
Answers go on the reply endpoint. Messages wait in order for a free slot. Runs under the worker lock, outside UCX
callbacks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .binding import UCS_INPROGRESS, UCS_OK, Endpoint, Worker
from .device_slots import SlotPools, SlotRole
from .regions import LocalRegions
from .replies import Replies
from .wire import Header, Kind, Stage, unpack_descs

if TYPE_CHECKING:
    from ...handle import Timeouts
    from .device_slots import DeviceSlots

_log = logging.getLogger("kvxfer.ucx")
#: Seconds past a transfer's deadline after which a granted, uncommitted slot is taken back.
GRANT_GRACE = 1.0


@dataclass
class _Job:
    header: Header
    reply_ep: int
    addr: np.ndarray
    nbytes: np.ndarray
    device: int
    stage: Stage
    total: int
    pool: DeviceSlots | None = None
    slot: int = 0
    request: int = 0
    granted_at: float = field(default=0.0)


class DeviceServer:
    """Serves the device staged chunks peers send us."""

    def __init__(
        self, worker: Worker, regions: LocalRegions, slots: SlotPools, timeouts: Timeouts, replies: Replies
    ) -> None:
        self._worker, self._library = worker, worker.library
        self._regions, self._slots, self._timeouts, self._replies = regions, slots, timeouts, replies
        self._queue: deque[_Job] = deque()
        self._granted: dict[tuple[bytes, int, int], _Job] = {}  # (requester address, transfer, chunk) -> job
        self._running: list[_Job] = []
        self._eps: dict[tuple[bytes, bool], Endpoint] = {}
        self._rkeys: dict[tuple[bytes, bool, bytes], Any] = {}

    @property
    def busy(self) -> bool:
        """True while chunks wait or move."""
        return bool(self._queue or self._running)

    def commit(self, header: Header, data: Any, reply_ep: int) -> None:
        """DCOMMIT: the requester's chunk is in the slot we granted: scatter it, answer ACK (ValueError: refused)."""
        payload = np.frombuffer(data, dtype=np.uint8)
        stage = Stage.unpack(payload)
        job = self._granted.pop((stage.address, header.transfer, header.chunk), None)
        if job is None:
            raise ValueError(f"no slot was granted to chunk {header.chunk} of transfer {header.transfer}")
        job.reply_ep = reply_ep
        self._worker.defer(lambda: self._end(job, None))

    def accept(self, header: Header, data: Any, reply_ep: int) -> None:
        """Check a DSCATTER/DGATHER message and queue it (ValueError: refused; the caller answers FAIL)."""
        addr, nbytes, region, rest = unpack_descs(np.frombuffer(data, dtype=np.uint8), header.count)
        stage = Stage.unpack(rest)
        device = self._regions.check_device_spans(addr, nbytes, region)
        total = int(nbytes.sum(dtype=np.uint64))
        slot_nbytes = self._slots.slot_nbytes
        if total > slot_nbytes:
            raise ValueError(f"a staged chunk of {total} bytes exceeds the {slot_nbytes}-byte slots")
        if not reply_ep:
            raise ValueError("the sender gave no reply endpoint")
        self._queue.append(_Job(header, reply_ep, addr, nbytes, device, stage, total))
        self._worker.defer(self.pump)

    def pump(self) -> None:
        """Start queued chunks while serving slots are free."""
        while self._queue:
            job = self._queue[0]
            pool = self._slots.get(SlotRole.SERVE, job.device)
            slot = pool.take()
            if slot is None:
                return
            self._queue.popleft()
            job.pool, job.slot = pool, slot
            try:
                self._start(job)
            except Exception as error:  # noqa: BLE001 UCX or CUDA (cupy's own types): answer FAIL, keep serving
                self._end(job, f"{type(error).__name__}: {error}")

    def _start(self, job: _Job) -> None:
        assert job.pool is not None
        stage = job.stage
        if job.header.kind is Kind.DSCATTER:  # the requester puts into our slot (see the module docstring)
            job.granted_at = time.monotonic()
            self._granted[(stage.address, job.header.transfer, job.header.chunk)] = job
            grant = Stage(job.slot, job.pool.packed_rkey(job.slot), stage.peer_mode, self._worker.address)
            self._replies.reply(
                job.reply_ep, Header(Kind.GRANT, job.header.transfer, job.header.chunk), grant.pack().copy()
            )
            return
        ep = self._endpoint(stage)
        rkey = self._rkey(stage, ep)
        job.pool.gather(job.slot, job.addr, job.nbytes)
        # completion is observed by the flush after it
        ep.rma(True, [job.slot], [stage.slot], [job.total], [rkey], [job.pool.memh(job.slot)])
        job.request = ep.flush()
        if job.request:
            self._running.append(job)
        else:
            self._end(job, None)

    def _endpoint(self, stage: Stage) -> Endpoint:
        key = (stage.address, stage.peer_mode)
        ep = self._eps.get(key)
        if ep is None or ep.failed_status is not None:
            if ep is not None:
                self._forget(key, ep)
            ep = self._eps[key] = Endpoint(
                self._worker, stage.address, stage.peer_mode, "kvxfer-stage", lambda _status: None
            )
        return ep

    def _rkey(self, stage: Stage, ep: Endpoint) -> Any:
        key = (stage.address, stage.peer_mode, stage.rkey)
        rkey = self._rkeys.get(key)
        if rkey is None:
            rkey = self._rkeys[key] = ep.unpack_rkey(stage.rkey)
        return rkey

    def _forget(self, key: tuple[bytes, bool], ep: Endpoint) -> None:
        """Drop a failed endpoint and its keys (jobs still on it end with their requests' errors)."""
        for rkey_key in [k for k in self._rkeys if k[:2] == key]:
            ep.destroy_rkey(self._rkeys.pop(rkey_key))
        self._eps.pop(key, None)
        self._close_ep(ep)

    def _close_ep(self, ep: Endpoint) -> None:
        request = ep.close(force=ep.peer_mode)
        if request:
            self._library.free_request(request)  # UCX finishes closing on its own

    def expire_grants(self, older_than: float) -> int:
        """Take back slots granted more than ``older_than`` seconds ago and never committed (the requester died or
        gave up: its transfer's deadline has passed, so it issues no put any more); returns how many."""
        now = time.monotonic()
        stale = [key for key, job in self._granted.items() if now - job.granted_at > older_than]
        for key in stale:
            job = self._granted.pop(key)
            assert job.pool is not None
            job.pool.give(job.slot)
            _log.warning(
                "ucx: took back the staging slot granted to chunk %d of transfer %d: never committed",
                job.header.chunk,
                job.header.transfer,
            )
        if stale:
            self.pump()
        return len(stale)

    def poll(self) -> int:
        """Complete the chunks whose put or flush finished, take back stale grants; returns how many."""
        if self._granted:
            expired = self.expire_grants(self._timeouts.transfer + GRANT_GRACE)
        else:
            expired = 0
        if not self._running:
            return expired
        library = self._library
        still, done = [], 0
        for job in self._running:
            status = library.request_status(job.request)
            if status == UCS_INPROGRESS:
                still.append(job)
                continue
            done += 1
            self._end(job, None if status == UCS_OK else library.status_text(status))
        self._running = still
        if done:
            self.pump()
        return done + expired

    def _end(self, job: _Job, error: str | None) -> None:
        pool, header = job.pool, job.header
        assert pool is not None
        if error is None and header.kind is Kind.DSCATTER:
            try:
                pool.scatter(job.slot, job.addr, job.nbytes)
            except Exception as failure:  # noqa: BLE001 a CUDA error (cupy's own types): answer FAIL
                error = f"scatter failed: {failure}"
        pool.give(job.slot)
        if self._queue:  # a chunk waiting for a slot can have this one
            self._worker.defer(self.pump)
        if error is None:
            answer = Kind.ACK if header.kind is Kind.DSCATTER else Kind.DATA
            self._replies.reply(job.reply_ep, Header(answer, header.transfer, header.chunk))
        else:
            _log.warning("ucx: serving staged chunk %d of transfer %d failed: %s", header.chunk, header.transfer, error)
            self._replies.refuse(header, job.reply_ep, error)

    def close(self) -> None:
        """Release unpacked keys (before the worker goes). Chunks still queued or running are dropped."""
        library = self._library
        for job in self._running:
            library.free_request(job.request)
        self._queue.clear()
        self._granted.clear()
        self._running = []
        for rkey in self._rkeys.values():
            library.destroy_rkey(rkey)
        self._rkeys.clear()
        for ep in self._eps.values():
            self._close_ep(ep)
        self._eps.clear()
