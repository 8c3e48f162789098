"""Staged transfers of small CUDA fragments: the requester's half (device_serve.py is the target's).

WRITE: gather a chunk's local spans into one of our registered GPU slots (one kernel launch), send DSCATTER with
the remote descriptors; the target reserves a slot of its own and answers GRANT with it; we put our slot there
(one UCX put), flush, send DCOMMIT; the target scatters (one launch) and answers ACK. READ: send DGATHER; the
target gathers into its slot, puts it into ours with one put, flushes, answers DATA; we scatter. One UCX operation
per chunk instead of one per fragment. A slot stays ours until its chunk is answered; an abandoned chunk's slot is
written off (device_slots.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import KvxferError
from ...handle import TransferState
from ..base import Op
from .binding import UCS_INPROGRESS, UCS_OK
from .device_slots import DeviceSlots, SlotRole
from .link import Link
from .services import Services
from .staged import StagedTransfer
from .wire import Header, Kind, Stage, descs_nbytes, pack_descs

if TYPE_CHECKING:
    from ...plan import TransferPlan


class DeviceStagedTransfer(StagedTransfer):
    """Chunks of device fragments through GPU slots, answered one by one by the target."""

    def __init__(self, services: Services, link: Link, op: Op, plan: TransferPlan, notify: bytes | None) -> None:
        super().__init__(services, link, op, plan, notify)
        self.slots: dict[int, int] = {}  # chunk -> slot, while the chunk is unanswered
        self.pool: DeviceSlots | None = None
        self.flushes: dict[int, int] = {}  # chunk -> flush request after its put (WRITE)

    def chunk_nbytes(self) -> int:
        """Bytes per chunk: one GPU slot."""
        return self.services.slots.slot_nbytes

    def placement(self, header: Header, length: int) -> int:
        """Device chunks move by put into slots: DATA answers carry no payload to place."""
        return 0

    def start(self) -> None:
        services = self.services
        with services.worker.lock:
            try:  # allocated and registered on first use, under the worker lock like every registration
                self.pool = services.slots.get(SlotRole.ASK, int(self.plan.local.device[0]))
            except Exception as error:  # noqa: BLE001 CUDA or UCX registration failure: ends this transfer as failed
                self.fail(f"no GPU staging slots: {error}")
                return
            services.ledger.expect_replies(self)
            self.advance()
        services.wake()

    def advance(self) -> None:
        if self.flushes:
            self._poll_flushes()
        limit = self.services.config.stage_inflight
        while (
            self.pool is not None
            and not self.state.final
            and not self.stopped
            and self.in_flight < limit
            and self.next_chunk < len(self.bounds)
        ):
            slot = self.pool.take()
            if slot is None:
                return  # every slot is busy: a later round (an answer frees one) goes on
            chunk = self.next_chunk
            self.next_chunk += 1
            self.in_flight += 1
            self.slots[chunk] = slot
            try:
                self._send_device_chunk(chunk, slot)
            except (KvxferError, ValueError) as error:
                self.fail(f"chunk {chunk}: {error}", error)

    def _send_device_chunk(self, chunk: int, slot: int) -> None:
        assert self.pool is not None
        start, stop = self.bounds[chunk]
        spans = self.spans
        if self.op is Op.WRITE:
            self.pool.gather(slot, spans.local_addr[start:stop], spans.nbytes[start:stop])
        count = stop - start
        stage = Stage(slot, self.pool.packed_rkey(slot), self.link.mode == "peer", self.services.worker.address).pack()
        head_nbytes = descs_nbytes(count)
        payload = np.empty(head_nbytes + stage.size, dtype=np.uint8)
        pack_descs(payload, spans.remote_addr[start:stop], spans.nbytes[start:stop], spans.remote_region[start:stop])
        payload[head_nbytes:] = stage
        kind = Kind.DSCATTER if self.op is Op.WRITE else Kind.DGATHER
        header = Header(kind, self.id, chunk, count).encode()
        self.services.worker.send(
            self.link.ep.handle,
            header,
            payload.ctypes.data,
            payload.size,
            keepalive=payload,
            reply=True,
            on_done=self._sent_device,
        )

    def _sent_device(self, status: int) -> None:
        if status != UCS_OK and not self.state.final:
            self.fail(f"sending a chunk failed: {self.services.library.status_text(status)}")

    def _put_granted(self, chunk: int, grant: Stage) -> None:
        """GRANT came (deferred out of the UCX callback): put our slot into the target's, then flush."""
        if self.state.final or self.stopped or chunk not in self.slots:
            return
        assert self.pool is not None
        start, stop = self.bounds[chunk]
        nbytes = int(self.spans.nbytes[start:stop].sum(dtype=np.uint64))
        link, slot = self.link, self.slots[chunk]
        try:
            rkey = link.slot_rkeys.get(grant.rkey)
            if rkey is None:
                rkey = link.slot_rkeys[grant.rkey] = link.ep.unpack_rkey(grant.rkey)
            link.ep.rma(True, [slot], [grant.slot], [nbytes], [rkey], [self.pool.memh(slot)])  # the flush observes it
            flush = link.ep.flush()
        except KvxferError as error:
            self.fail(f"chunk {chunk}: {error}", error)
            return
        if flush:
            self.flushes[chunk] = flush
        else:
            self._commit(chunk)

    def _poll_flushes(self) -> None:
        for chunk, flush in list(self.flushes.items()):
            status = self.services.library.request_status(flush)
            if status == UCS_INPROGRESS:
                continue
            del self.flushes[chunk]
            ep_failed = self.link.ep.failed_status
            if status != UCS_OK or ep_failed is not None:
                failed = status if status != UCS_OK or ep_failed is None else ep_failed
                self.fail(f"chunk {chunk}: flush after the put failed: {self.services.library.status_text(failed)}")
                return
            self._commit(chunk)

    def _commit(self, chunk: int) -> None:
        start, stop = self.bounds[chunk]
        stage = Stage(self.slots[chunk], b"-", self.link.mode == "peer", self.services.worker.address).pack().copy()
        header = Header(Kind.DCOMMIT, self.id, chunk, stop - start).encode()
        try:
            self.services.worker.send(
                self.link.ep.handle,
                header,
                stage.ctypes.data,
                stage.size,
                keepalive=stage,
                reply=True,
                on_done=self._sent_device,
            )
        except KvxferError as error:
            self.fail(f"chunk {chunk}: sending DCOMMIT failed: {error}", error)

    def on_reply(self, header: Header, data: Any) -> None:
        chunk = header.chunk
        if not 0 <= chunk < self.next_chunk or self.answered[chunk] or chunk not in self.slots:
            return
        if header.kind is Kind.GRANT:  # inside a UCX callback: copy the grant, put from progress
            try:
                grant = Stage.unpack(np.frombuffer(data, dtype=np.uint8))
            except ValueError as error:
                self.fail(f"chunk {chunk}: bad GRANT: {error}")
                return
            self.services.worker.defer(lambda: self._put_granted(chunk, grant))
            return
        slot = self.slots.pop(chunk)
        assert self.pool is not None  # a chunk holds a slot only once the pool exists
        if header.kind is Kind.DATA and not self.state.final and not self.stopped:
            start, stop = self.bounds[chunk]
            spans = self.spans
            try:
                self.pool.scatter(slot, spans.local_addr[start:stop], spans.nbytes[start:stop])
            except Exception as error:  # noqa: BLE001 a CUDA error (cupy's own types) must still end the transfer
                self.pool.give(slot)
                self.fail(f"chunk {chunk}: scattering the staged bytes failed: {error}")
                return
        self.pool.give(slot)  # answered: the target touches it no more
        if self.state.final or self.stopped:
            return
        if header.kind is Kind.FAIL:
            reason = bytes(data).decode(errors="replace")[:500]
            self.fail(f"the peer refused chunk {chunk}: {reason}")
            return
        self.in_flight -= 1
        self.answered[chunk] = True
        if self.answered.all():
            self.data_done()
        else:
            self.services.worker.defer(self.advance)

    def finish(self, state: TransferState, error: KvxferError | None = None) -> None:
        if self.state.final:
            return
        super().finish(state, error)
        for flush in self.flushes.values():
            self.services.library.free_request(flush)
        self.flushes = {}
        for chunk, slot in self.slots.items():  # unanswered: late answers still release them
            assert self.pool is not None
            self.services.ledger.abandon_slot(self.id, chunk, self.pool, slot)
        self.slots = {}
