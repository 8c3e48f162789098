"""DecodeEngine: continuous batching over requests prefilled here or elsewhere.

A request enters one of two ways. ``add_request`` queues it for local (chunked) prefill: with only this path the
engine is the aggregated engine. ``reserve`` + ``admit`` take a request whose prompt K/V someone else computed: the
engine reserves blocks, the connector fills them (a KVPipe pull), then ``admit`` starts decoding from the prefill's
first token. Each step decodes one token for every running request and, in the same forward pass, prefills
(chunks of) waiting requests with the rest of a token budget (``mixed_steps``; without it a step either prefills or
decodes, prefill first). When blocks run out the newest running request is preempted and later recomputed; a
step that preempted admits no prefill.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ..errors import EngineTimeoutError, OutOfBlocksError, UsageError
from ..spec import KVCacheSpec
from .config import CacheConfig
from .kv_cache import KVCache
from .model import Model
from .request import FinishReason, Request, RequestOutput, Sequence
from .runner import ModelRunner


@dataclass(frozen=True)
class Reservation:
    """Blocks reserved for a request's prompt K/V (host ints, token order, as in PrefillResult.block_ids).

    The first ``num_cached_tokens // block_size`` blocks already hold the prompt's prefix (local prefix cache, maybe
    shared with other requests): do not write them. Fill ``block_ids[num_cached_tokens // block_size:]``.
    """

    request_id: str
    block_ids: tuple[int, ...]
    num_cached_tokens: int
    block_size: int

    @property
    def fill_block_ids(self) -> tuple[int, ...]:
        """The blocks a connector must fill (for prompt tokens ``num_cached_tokens`` onwards)."""
        return self.block_ids[self.num_cached_tokens // self.block_size :]


class DecodeEngine:
    """Decode (and optionally prefill) on one TP rank; in a TP group every rank makes the same calls.

    ``cache.tensor`` is the KV cache to register with an agent and ``spec`` describes it. ``max_batch_size`` caps
    running requests, ``max_num_batched_tokens`` the prompt tokens of one prefill step (longer prompts are chunked).
    ``cuda_graphs``: see :class:`ModelRunner` (None: CUDA graphs for decode steps on a GPU with one TP rank).
    ``mixed_steps``: decode and prefill in one step (default); False runs a prefill step whenever requests wait
    and fit, and decodes only in steps without prefill. Steps with prefill run eagerly (no graph).
    """

    def __init__(
        self,
        model: Model,
        cache_config: CacheConfig | None = None,
        *,
        max_batch_size: int = 64,
        max_num_batched_tokens: int = 4096,
        cuda_graphs: bool | None = None,
        mixed_steps: bool = True,
    ) -> None:
        self.runner = ModelRunner(model, cache_config or CacheConfig(), cuda_graphs=cuda_graphs)
        self.max_batch_size, self.max_num_batched_tokens = max_batch_size, max_num_batched_tokens
        self.mixed_steps = mixed_steps
        self._waiting: deque[Sequence] = deque()
        self._running: deque[Sequence] = deque()
        self._reserved: dict[str, Sequence] = {}
        self._done: list[RequestOutput] = []
        self.num_preemptions = 0
        self.num_decode_steps = 0
        self.num_decode_tokens = 0
        self.num_mixed_steps = 0  # steps that decoded and prefilled (also counted as decode steps)
        self.decode_s = 0.0  # wall time of steps that decoded (tokens/s = num_decode_tokens / decode_s)

    @property
    def spec(self) -> KVCacheSpec:
        """The KVCacheSpec of this rank's cache."""
        return self.runner.spec

    @property
    def cache(self) -> KVCache:
        return self.runner.cache

    @property
    def num_free_blocks(self) -> int:
        return self.runner.blocks.num_free

    @property
    def sequences(self) -> dict[str, Sequence]:
        """The requests in the engine by id: waiting, running and reserved (read them, do not change them)."""
        found = {seq.request_id: seq for seq in (*self._waiting, *self._running)}
        found.update(self._reserved)
        return found

    @property
    def num_waiting(self) -> int:
        """Requests queued for (local) prefill, preempted ones included."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests decoding."""
        return len(self._running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._done)

    def _ids(self) -> set[str]:
        return {s.request_id for s in (*self._waiting, *self._running)} | set(self._reserved)

    def _check_new(self, request: Request) -> None:
        if request.request_id in self._ids():
            raise UsageError(f"DecodeEngine: request id {request.request_id!r} is already in the engine")
        self.runner.check_fits(request)

    # ---- entry points ------------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request for local prefill, then decode."""
        self._check_new(request)
        self._waiting.append(Sequence(request))

    def reserve(self, request: Request) -> Reservation:
        """Reserve blocks for a request whose prompt K/V will be filled from outside (OutOfBlocksError if full)."""
        self._check_new(request)
        seq = Sequence(request)
        self.runner.allocate(seq)
        self._reserved[request.request_id] = seq
        return Reservation(request.request_id, tuple(seq.block_ids), seq.num_cached_tokens, self.runner.block_size)

    def admit(self, request_id: str, first_token: int, *, token_time: float | None = None) -> None:
        """Start decoding a reserved request whose blocks now hold its whole prompt's K/V.

        ``first_token`` is the token the prefill sampled; ``token_time`` (``time.time()``, default now) when it was
        known here. On a GPU the filled blocks must be visible on the engine's current stream.
        """
        seq = self._reserved.pop(request_id, None)
        if seq is None:
            raise UsageError(f"DecodeEngine.admit: request {request_id!r} has no reservation")
        seq.num_computed = seq.num_prompt_tokens
        self.runner.blocks.commit(seq.block_ids, seq.token_ids, seq.num_computed)
        seq.append(first_token, self.runner.model.config.eos_token_ids, self.runner.max_sequence_tokens)
        if token_time is not None:
            seq.token_times[-1] = token_time
        if seq.finish_reason is not None:
            self._finish(seq)
        else:
            self._running.append(seq)

    def cancel_reservation(self, request_id: str) -> None:
        """Give back a reservation whose fill failed (its blocks are not registered in the prefix cache)."""
        seq = self._reserved.pop(request_id, None)
        if seq is None:
            raise UsageError(f"DecodeEngine.cancel_reservation: request {request_id!r} has no reservation")
        self.runner.free(seq)

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a queued or running request now; its output so far is returned (finish reason ABORT)."""
        for queue in (self._waiting, self._running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    seq.finish_reason = FinishReason.ABORT
                    self.runner.free(seq)
                    return seq.output()
        raise UsageError(f"DecodeEngine.abort: request {request_id!r} is not queued or running")

    # ---- stepping ----------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled decode and prefill work (see the module docstring); finished
        outputs."""
        if self.mixed_steps:
            preemptions = self.num_preemptions
            decode = self._schedule_decode()
            budget = self.max_num_batched_tokens - len(decode)
            prefill = self._schedule_prefill(budget) if self.num_preemptions == preemptions else []
        else:
            prefill = self._schedule_prefill(self.max_num_batched_tokens)
            decode = [] if prefill else self._schedule_decode()
        work = decode + prefill
        if not work and self._waiting and not self._running and not self._reserved:
            raise OutOfBlocksError(
                f"DecodeEngine: {len(self._waiting)} waiting request(s) fit in no free blocks "
                f"({self.num_free_blocks} free)"
            )
        began = time.perf_counter()
        sampled = self.runner.step(work) if work else []
        if decode:
            self.num_decode_steps += 1
            self.num_mixed_steps += bool(prefill)
            self.num_decode_tokens += len(decode)
            self.decode_s += time.perf_counter() - began
        for index, ((seq, _), token) in enumerate(zip(work, sampled, strict=True)):
            if token is None:
                continue
            if index >= len(decode):  # a prefill that sampled its first token starts decoding
                self._waiting.remove(seq)
                self._running.append(seq)
            if seq.finish_reason is not None:
                self._running.remove(seq)
                self._finish(seq)
        done, self._done = self._done, []
        return done

    def _schedule_prefill(self, budget: int) -> list[tuple[Sequence, int]]:
        work: list[tuple[Sequence, int]] = []
        for seq in self._waiting:
            if budget <= 0 or len(self._running) + len(work) >= self.max_batch_size:
                break
            if not seq.block_ids:
                if not self.runner.can_allocate(seq):
                    break
                self.runner.allocate(seq)
            count = min(seq.num_tokens - seq.num_computed, budget)
            work.append((seq, count))
            budget -= count
        return work

    def _schedule_decode(self) -> list[tuple[Sequence, int]]:
        scheduled: list[Sequence] = []
        while self._running and len(scheduled) < self.max_batch_size:
            seq = self._running.popleft()
            while True:
                try:  # the last token's K/V goes to position num_tokens - 1
                    self.runner.blocks.append(seq.block_ids, seq.num_tokens)
                    scheduled.append(seq)
                    break
                except OutOfBlocksError:
                    victim = self._running.pop() if self._running else seq
                    self._preempt(victim)
                    if victim is seq:
                        break
        self._running.extendleft(reversed(scheduled))
        return [(seq, 1) for seq in scheduled]

    def _preempt(self, seq: Sequence) -> None:
        """Free a running request's blocks; it is recomputed (prompt and output so far) before decoding resumes."""
        self.runner.free(seq)
        self._waiting.appendleft(seq)
        self.num_preemptions += 1

    def _finish(self, seq: Sequence) -> None:
        self.runner.free(seq)
        self._done.append(seq.output())

    def run(self, timeout_s: float = 300.0) -> list[RequestOutput]:
        """Step until every queued and running request finished (reservations are not waited for)."""
        deadline = time.monotonic() + timeout_s
        outputs: list[RequestOutput] = []
        while self.has_unfinished:
            if time.monotonic() > deadline:
                raise EngineTimeoutError(
                    f"DecodeEngine.run: {len(self._waiting) + len(self._running)} request(s) "
                    f"unfinished after timeout_s={timeout_s}"
                )
            outputs.extend(self.step())
        return outputs

    def generate(self, requests: list[Request], timeout_s: float = 300.0) -> list[RequestOutput]:
        """Prefill and decode ``requests`` here (the aggregated path); outputs in the order of ``requests``."""
        for request in requests:
            self.add_request(request)
        by_id = {output.request_id: output for output in self.run(timeout_s)}
        return [by_id[request.request_id] for request in requests]
