"""The scheduling loop of a prefill worker: a bounded local queue, prompts prefilled in batches, blocks held under
leases for the decode worker's pull.

Each iteration frees the blocks of requests whose leases ended (the decode side's pull released them, or they
lapsed), then takes queued requests up to ``max_batch`` requests and ``max_batch_tokens`` prompt tokens, computes
them in shared forward passes (PrefillConnector.prefill_batch) and answers ``prefilled`` with each KVReady.
``abort`` removes a queued request, or ends a held one's leases (a pull in flight or a later one fails) and frees
its blocks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from ..engine import OutOfBlocksError, PrefillConnector, Request
from ..errors import KvxferError
from . import protocol
from .protocol import Error, Load, Prefilled, Tokens
from .worker_decode import sampling_params
from .worker_loop import Loop, Rate, Send

logger = logging.getLogger("kvxfer.serve")


@dataclass
class _Queued:
    request: Request
    decode: str  # the decode worker's name
    received: float  # time.time()
    deadline: float


class PrefillLoop(Loop):
    """Prefill worker loop over one PrefillConnector (TP 1)."""

    peer_role = "decode"

    def __init__(
        self,
        name: str,
        send: Send,
        connector: PrefillConnector,
        *,
        max_queue: int = 256,
        max_batch: int = 16,
        max_batch_tokens: int = 4096,
    ) -> None:
        super().__init__(name, send)
        self.connector = connector
        self.max_queue, self.max_batch, self.max_batch_tokens = max_queue, max_batch, max_batch_tokens
        self._queue: deque[_Queued] = deque()
        self._deadlines: dict[str, float] = {}  # held requests: blocks are abandoned past the deadline
        self.max_batch_now = max_batch  # 1 after a batch did not fit in the free blocks
        self.rate = Rate()
        self.num_prefilled = 0

    def accept(self, message: protocol.Generate | protocol.Prefill | protocol.Decode) -> None:
        rid = message.rid
        if not isinstance(message, protocol.Prefill):
            self.send(Error(rid, "bad_request", f"prefill worker {self.name} takes only 'prefill' requests"))
            return
        if any(q.request.request_id == rid for q in self._queue) or rid in self.connector.held_request_ids:
            self.send(Error(rid, "bad_request", f"request id {rid!r} is already on worker {self.name}"))
            return
        if len(self._queue) >= self.max_queue:
            self.send(Error(rid, "overloaded", f"prefill worker {self.name}: queue of {self.max_queue} full"))
            return
        try:
            request = Request(rid, message.prompt_token_ids, sampling_params(message.sampling))
            self.connector.engine.runner.check_fits(request)
        except KvxferError as error:
            self.send(Error(rid, "bad_request", str(error)))
            return
        self._queue.append(_Queued(request, message.decode, time.time(), message.deadline_s))

    def _iteration(self) -> bool:
        for rid in self.connector.poll():
            self._deadlines.pop(rid, None)
        now = self.now
        for queued in [q for q in self._queue if q.deadline <= now]:
            self._queue.remove(queued)
            self.send(Error(queued.request.request_id, "deadline", f"deadline passed in {self.name}'s queue"))
        for rid in [rid for rid, deadline in self._deadlines.items() if deadline <= now]:
            self.connector.abort(rid)  # nobody will pull it any more
            del self._deadlines[rid]
        batch = self._take()
        if not batch:
            return False
        began = time.time()
        try:
            readies = self.connector.prefill_batch(
                [q.request for q in batch], [self.peer_groups[q.decode] for q in batch]
            )
        except OutOfBlocksError:
            if len(batch) > 1:  # all or nothing: try the head alone next time
                self._queue.extendleft(reversed(batch[1:]))
                self._queue.appendleft(batch[0])
                self.max_batch_now = 1
            else:
                self._queue.appendleft(batch[0])
            return False  # wait for leases to end
        self.max_batch_now = self.max_batch
        elapsed = time.time() - began
        self.rate.record(sum(r.num_computed_tokens for r in readies), elapsed)
        for queued, ready in zip(batch, readies, strict=True):
            self._deadlines[queued.request.request_id] = queued.deadline
            timing = {
                "queue_s": max(began - queued.received, 0.0),
                "prefill_s": elapsed,
                "cached_tokens": float(ready.num_cached_tokens),
            }
            self.send(Prefilled(queued.request.request_id, ready.encode(), ready.first_token, timing))
            self.num_prefilled += 1
        return True

    def _take(self) -> list[_Queued]:
        batch: list[_Queued] = []
        tokens = 0
        limit = min(self.max_batch, self.max_batch_now)
        while self._queue and len(batch) < limit:
            queued = self._queue[0]
            size = len(queued.request.prompt_token_ids)
            if batch and tokens + size > self.max_batch_tokens:
                break
            self._queue.popleft()
            if queued.decode not in self.peer_groups and self._unconnected:
                self.retry_peers()
            if queued.decode not in self.peer_groups:
                self.send(
                    Error(
                        queued.request.request_id,
                        "unknown_peer",
                        f"prefill worker {self.name} is not connected to decode worker {queued.decode!r}"
                        + (f" ({self.connect_errors[queued.decode]})" if queued.decode in self.connect_errors else ""),
                    )
                )
                continue
            batch.append(queued)
            tokens += size
        return batch

    def abort(self, rid: str, reason: str) -> None:
        for queued in self._queue:
            if queued.request.request_id == rid:
                self._queue.remove(queued)
                self.emit(Tokens(rid, (), "abort"))
                return
        if self.connector.abort(rid):
            self._deadlines.pop(rid, None)
            self.emit(Tokens(rid, (), "abort"))

    def abort_all(self, reason: str) -> None:
        for queued in list(self._queue):
            self.abort(queued.request.request_id, reason)
        for rid in self.connector.held_request_ids:
            self.connector.abort(rid)
        self.connector.drain(timeout=2.0)

    def has_work(self) -> bool:
        return bool(self._queue or self.connector.held_request_ids)

    def polling(self) -> bool:
        return bool(self._deadlines)

    def connect(self, rank_info: list[bytes]) -> str:
        return self.connector.connect(rank_info)

    def snapshot(self) -> Load:
        engine = self.connector.engine
        free = engine.num_free_blocks
        return Load(
            free_blocks=free,
            active_blocks=engine.runner.blocks.num_blocks - free,
            running=len(self._deadlines),
            waiting=len(self._queue),
            queued_prefill_tokens=sum(len(q.request.prompt_token_ids) for q in self._queue),
            prefill_tokens_per_s=self.rate.value,
            decode_tokens_per_s=0.0,
            links={},
        )
