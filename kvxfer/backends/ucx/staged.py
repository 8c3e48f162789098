"""Staged transfers: small host fragments over UCX, packed into a few large active messages.

A put per 4 KiB fragment costs a software-emulated round of the tcp transport (0.6 GB/s measured) or a system
call over cma; one message per few MiB costs one. WRITE: gather the chunk's local spans into a buffer behind
its remote descriptors, send it as one SCATTER message (UCX uses rendezvous, i.e. zero-copy, for large ones); the
target checks every descriptor against its registered regions, scatters, and answers ACK. READ: send the remote
descriptors as GATHER; the target gathers and answers DATA; we scatter into local memory. Up to
``KVXFER_UCX_STAGE_INFLIGHT`` chunks are in flight per transfer.

This is also the path to a peer whose memory may not be reached one-sidedly (``link.one_sided_ok`` false: a peer
across hosts without RDMA, or one that set ``KVXFER_UCX_ONE_SIDED=off``), for fragments of any size: fragments
longer than a chunk are cut into chunk-sized spans (:class:`Spans`), and a chunk of one span goes without copies:
SCATTER_SPAN / GATHER_SPAN carry its descriptor in the message header, the target checks it before receiving,
and the rendezvous payload lands straight in the target's span (WRITE) or in ours (the DATA answer of a READ).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import KvxferError
from ..base import Op
from .binding import UCS_OK, UserSpan
from .gather import gather, scatter
from .link import Link
from .services import Services
from .transfer import UcxRequest
from .wire import MAX_CHUNK_FRAGMENTS, Header, Kind, descs_nbytes, pack_descs, pack_span

if TYPE_CHECKING:
    from ...plan import TransferPlan


class Spans:
    """A plan's fragment pairs with fragments longer than a chunk cut into chunk-sized pieces (uint64 addresses
    and sizes, int32 region indices); the plan's own arrays when none is."""

    def __init__(self, plan: TransferPlan, piece: int) -> None:
        local, remote = plan.local, plan.remote
        sizes = local.nbytes.astype(np.uint64)
        self.local_addr, self.remote_addr, self.nbytes = local.addr, remote.addr, sizes
        self.local_region, self.remote_region = local.region, remote.region
        if len(sizes) and int(sizes.max()) > piece:
            counts = (sizes + np.uint64(piece - 1)) // np.uint64(piece)
            owner = np.repeat(np.arange(len(sizes)), counts.astype(np.int64))
            first = np.cumsum(counts) - counts
            skip = (np.arange(len(owner), dtype=np.uint64) - first[owner].astype(np.uint64)) * np.uint64(piece)
            self.local_addr = local.addr.astype(np.uint64)[owner] + skip
            self.remote_addr = remote.addr.astype(np.uint64)[owner] + skip
            self.nbytes = np.minimum(sizes[owner] - skip, np.uint64(piece))
            self.local_region, self.remote_region = local.region[owner], remote.region[owner]


def chunk_bounds(nbytes: np.ndarray, chunk_nbytes: int) -> list[tuple[int, int]]:
    """[start, stop) fragment ranges of about ``chunk_nbytes`` bytes (at least one fragment) each."""
    ends = np.cumsum(nbytes, dtype=np.uint64)
    bounds, start, n = [], 0, len(nbytes)
    while start < n:
        before = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, before + chunk_nbytes, side="right"))
        stop = min(max(stop, start + 1), start + MAX_CHUNK_FRAGMENTS, n)
        bounds.append((start, stop))
        start = stop
    return bounds


class StagedTransfer(UcxRequest):
    """Chunks of packed fragments, answered one by one by the target."""

    strategy = "staged"

    def __init__(self, services: Services, link: Link, op: Op, plan: TransferPlan, notify: bytes | None) -> None:
        super().__init__(services, link, op, plan, notify)
        self.spans = Spans(plan, self.chunk_nbytes())
        self.bounds = chunk_bounds(self.spans.nbytes, self.chunk_nbytes())
        self.next_chunk = 0
        self.answered = np.zeros(len(self.bounds), dtype=bool)
        self.in_flight = 0

    def chunk_nbytes(self) -> int:
        """Bytes per chunk (host: one staged message)."""
        return self.services.config.stage_chunk

    def start(self) -> None:
        with self.services.worker.lock:
            self.services.ledger.expect_replies(self)
            self.advance()
        self.services.wake()

    def advance(self) -> None:
        limit = self.services.config.stage_inflight
        while (
            not self.state.final and not self.stopped and self.in_flight < limit and self.next_chunk < len(self.bounds)
        ):
            chunk = self.next_chunk
            self.next_chunk += 1
            self.in_flight += 1
            try:
                self._send_chunk(chunk)
            except (KvxferError, ValueError) as error:
                self.fail(f"chunk {chunk}: {error}", error)

    def _send_chunk(self, chunk: int) -> None:
        start, stop = self.bounds[chunk]
        spans = self.spans
        count = stop - start
        if count == 1:  # one span (large fragments): no gather, no scatter; the target checks it and receives
            self._send_span(chunk, start)  # straight into it (WRITE), or we receive its bytes into ours (READ)
            return
        header_nbytes = descs_nbytes(count)
        if self.op is Op.WRITE:
            data_nbytes = int(spans.nbytes[start:stop].sum(dtype=np.uint64))
            buffer = self.services.staging.take(header_nbytes + data_nbytes)
            gather(
                buffer[header_nbytes:],
                spans.local_addr[start:stop],
                spans.nbytes[start:stop],
                spans.local_region[start:stop],
                self.services.regions.host_view,
            )
            kind = Kind.SCATTER
        else:
            buffer = np.empty(header_nbytes, dtype=np.uint8)
            kind = Kind.GATHER
        pack_descs(buffer, spans.remote_addr[start:stop], spans.nbytes[start:stop], spans.remote_region[start:stop])
        header = Header(kind, self.id, chunk, count).encode()
        self.services.worker.send(
            self.link.ep.handle,
            header,
            buffer.ctypes.data,
            buffer.size,
            keepalive=buffer,
            reply=True,
            on_done=lambda status: self._sent(buffer, status),
        )

    def _send_span(self, chunk: int, index: int) -> None:
        spans = self.spans
        nbytes = int(spans.nbytes[index])
        tail = pack_span(int(spans.remote_addr[index]), nbytes, int(spans.remote_region[index]))
        if self.op is Op.WRITE:
            addr = int(spans.local_addr[index])
            base, view = self.services.regions.host_view(int(spans.local_region[index]))
            if not (base <= addr and addr + nbytes <= base + view.size):
                raise ValueError(f"local span {addr:#x} +{nbytes} lies outside its region")
            header = Header(Kind.SCATTER_SPAN, self.id, chunk, 1, tail).encode()
            self.services.worker.send(
                self.link.ep.handle,
                header,
                addr,
                nbytes,
                keepalive=UserSpan((addr, nbytes)),
                reply=True,
                on_done=lambda status: self._sent(None, status),
            )
        else:
            header = Header(Kind.GATHER_SPAN, self.id, chunk, 1, tail).encode()
            self.services.worker.send(
                self.link.ep.handle, header, reply=True, on_done=lambda status: self._sent(None, status)
            )

    def placement(self, header: Header, length: int) -> int:
        """Where the DATA answer of a one-span chunk may land directly: that local span (0: a pooled buffer)."""
        chunk = header.chunk
        if (
            header.kind is not Kind.DATA
            or self.state.final
            or self.stopped
            or not 0 <= chunk < self.next_chunk
            or self.answered[chunk]
        ):
            return 0
        start, stop = self.bounds[chunk]
        if stop - start != 1 or length != int(self.spans.nbytes[start]):
            return 0
        return int(self.spans.local_addr[start])

    def _sent(self, buffer: np.ndarray | None, status: int) -> None:
        if self.op is Op.WRITE and buffer is not None:
            self.services.staging.give(buffer)
        if status != UCS_OK and not self.state.final:
            self.fail(f"sending a chunk failed: {self.services.library.status_text(status)}")

    def on_reply(self, header: Header, data: Any) -> None:
        """ACK / DATA / FAIL for one chunk (inside a UCX callback: ``data`` is only valid during the call)."""
        if self.state.final or self.stopped or not 0 <= header.chunk < self.next_chunk or self.answered[header.chunk]:
            return
        if header.kind is Kind.FAIL:
            reason = bytes(data).decode(errors="replace")[:500]
            self.fail(f"the peer refused chunk {header.chunk}: {reason}")
            return
        if header.kind is Kind.DATA and data is not None:  # None: it landed in place (placement)
            start, stop = self.bounds[header.chunk]
            spans = self.spans
            payload = np.frombuffer(data, dtype=np.uint8)
            expected = int(spans.nbytes[start:stop].sum(dtype=np.uint64))
            if payload.size != expected:
                self.fail(f"chunk {header.chunk}: peer sent {payload.size} bytes, expected {expected}")
                return
            scatter(
                payload,
                spans.local_addr[start:stop],
                spans.nbytes[start:stop],
                spans.local_region[start:stop],
                self.services.regions.host_view,
            )
        self.in_flight -= 1
        self.answered[header.chunk] = True
        if self.answered.all():
            self.data_done()
        else:
            self.services.worker.defer(self.advance)
