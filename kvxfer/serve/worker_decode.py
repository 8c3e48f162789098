"""The scheduling loop of a decode or aggregated worker: continuous batching over a DecodeEngine.

``generate`` requests are prefilled here (chunked, batched by the engine) and decoded; ``decode`` requests (decode
role only) reserve blocks, pull the prompt's K/V from the prefill worker through the DecodeConnector's KVPipe, and
start decoding from the prefill's first token. After every engine step the new tokens of every request that
progressed leave in one frame. Deadlines and aborts free the request's blocks (reservation, pull or sequence).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ..engine import (
    Admission,
    DecodeConnector,
    DecodeEngine,
    KVReady,
    OutOfBlocksError,
    Request,
    RequestOutput,
    SamplingParams,
)
from ..errors import KvxferError
from . import protocol
from .protocol import Error, Load, Tokens
from .worker_loop import LinkRates, Loop, Rate, Send

logger = logging.getLogger("kvxfer.serve")

MAX_DEFERRED = 1024  # decode requests waiting for free blocks before their pull can start


def sampling_params(sampling: protocol.Sampling) -> SamplingParams:
    """The engine's SamplingParams for a protocol Sampling."""
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        ignore_eos=sampling.ignore_eos,
        stop_token_ids=sampling.stop_token_ids,
        min_tokens=min(sampling.min_tokens, sampling.max_tokens),
    )


@dataclass
class _Active:
    rid: str
    received: float  # time.time()
    deadline: float  # time.time()
    remote: bool
    sent: int = 0  # output tokens already sent
    first_scheduled: float | None = None
    pulling: bool = False
    transfer_ended: float = 0.0  # time.time() when the pull ended (remote)
    timing: dict[str, float] = field(default_factory=dict)


class DecodeLoop(Loop):
    """Decode (``connector`` given) or aggregated (``connector`` None) worker loop."""

    peer_role = "prefill"

    def __init__(
        self, name: str, send: Send, engine: DecodeEngine, connector: DecodeConnector | None, kv_bytes_per_token: int
    ) -> None:
        super().__init__(name, send)
        self.engine, self.connector, self.kv_bytes_per_token = engine, connector, kv_bytes_per_token
        self._active: dict[str, _Active] = {}
        self._deferred: deque[tuple[KVReady, _Active]] = deque()
        self._orphans: set[str] = set()  # aborted while pulling: abort again if the pull still admits them
        self._pull_sources: dict[str, str] = {}  # rid -> prefill group it pulls from
        self.links = LinkRates()
        self.prefill_rate = Rate()

    # ---- requests ----------------------------------------------------------------------------------------------

    def accept(self, message: protocol.Generate | protocol.Prefill | protocol.Decode) -> None:
        rid = message.rid
        if rid in self._active or rid in self._orphans:
            self.send(Error(rid, "bad_request", f"request id {rid!r} is already on worker {self.name}"))
            return
        try:
            request = Request(rid, message.prompt_token_ids, sampling_params(message.sampling))
            self.engine.runner.check_fits(request)
        except KvxferError as error:
            self.send(Error(rid, "bad_request", str(error)))
            return
        active = _Active(rid, time.time(), message.deadline_s, isinstance(message, protocol.Decode))
        if isinstance(message, protocol.Generate):
            self.engine.add_request(request)
            self._active[rid] = active
        elif isinstance(message, protocol.Decode) and self.connector is not None:
            self._receive(message, active)
        else:
            self.send(Error(rid, "bad_request", f"worker {self.name} does not take {message.TYPE!r} requests"))

    def _receive(self, message: protocol.Decode, active: _Active) -> None:
        try:
            ready = KVReady.decode(message.kv_ready)
        except KvxferError as error:
            self.send(Error(message.rid, "bad_request", f"kv_ready: {error}"))
            return
        if (
            ready.request.request_id != message.rid
            or ready.request.prompt_token_ids != message.prompt_token_ids
            or ready.first_token != message.first_token
        ):
            self.send(
                Error(message.rid, "bad_request", "kv_ready does not match the request's id, prompt or first token")
            )
            return
        if ready.prefill_agents[0] not in self.group_peers and self._unconnected:
            self.retry_peers()
        if ready.prefill_agents[0] not in self.group_peers:
            self.send(
                Error(
                    message.rid,
                    "unknown_peer",
                    f"worker {self.name} is not connected to the prefill "
                    f"group {ready.prefill_agents[0]!r} (no peers message?)",
                )
            )
            return
        if len(self._deferred) >= MAX_DEFERRED:
            self.send(Error(message.rid, "overloaded", f"worker {self.name}: {MAX_DEFERRED} pulls wait for blocks"))
            return
        self._active[message.rid] = active
        active.pulling = True
        self._deferred.append((ready, active))
        self._start_pulls()

    def _start_pulls(self) -> None:
        assert self.connector is not None
        while self._deferred:
            ready, active = self._deferred[0]
            try:
                self.connector.receive(ready)
            except OutOfBlocksError:
                return  # retried once blocks are free
            except KvxferError as error:
                self._deferred.popleft()
                self._fail(active.rid, "transfer", f"the pull could not start: {error}")
                continue
            self._deferred.popleft()
            self._pull_sources[active.rid] = ready.prefill_agents[0]
            active.timing["queue_s"] = time.time() - active.received

    # ---- the loop ----------------------------------------------------------------------------------------------

    def _iteration(self) -> bool:
        busy = False
        if self.connector is not None:
            if self._deferred:
                self._start_pulls()
            admissions = self.connector.poll()
            for admission in admissions:
                self._admitted(admission)
            if admissions:
                self.flush()  # the first tokens leave before the next (slow) engine step
                busy = True
        if self.engine.has_unfinished:
            self._step()
            busy = True
        self._check_deadlines()
        return busy

    def _step(self) -> None:
        began = time.time()
        computed = self.engine.runner.num_computed_tokens
        decode_tokens = self.engine.num_decode_tokens
        try:
            finished = self.engine.step()
        except OutOfBlocksError as error:  # a waiting request fits in no free block and nothing runs to free one
            victim = next(iter(rid for rid, seq in self.engine.sequences.items() if seq.num_computed == 0), None)
            if victim is None:
                raise
            self._fail(victim, "overloaded", str(error))
            return
        # A step may decode and prefill at once (mixed steps): its prompt tokens are charged the whole step.
        prefilled = self.engine.runner.num_computed_tokens - computed - (self.engine.num_decode_tokens - decode_tokens)
        if prefilled > 0:
            self.prefill_rate.record(prefilled, time.time() - began)
        outputs = {output.request_id: output for output in finished}
        for rid, seq in self.engine.sequences.items():
            active = self._active.get(rid)
            if active is None or active.pulling:
                continue
            if active.first_scheduled is None and seq.num_computed_tokens > 0:
                active.first_scheduled = began
            if len(seq.output_token_ids) > active.sent:
                self._emit(active, seq.output_token_ids, None, seq.token_times, seq.num_cached_tokens)
        for rid, output in outputs.items():
            active = self._active.pop(rid, None)
            if active is None:
                continue
            if active.first_scheduled is None:
                active.first_scheduled = began
            reason = output.finish_reason.value if output.finish_reason is not None else "stop"
            self._emit(active, output.output_token_ids, reason, output.token_times, output.num_cached_tokens)

    def _emit(
        self,
        active: _Active,
        output: tuple[int, ...] | list[int],
        finish: str | None,
        token_times: tuple[float, ...] | list[float],
        cached: int,
    ) -> None:
        timing = None
        if active.sent == 0 and output:
            if not active.remote:
                first = active.first_scheduled or active.received
                timing = {
                    "queue_s": max(first - active.received, 0.0),
                    "prefill_s": max(token_times[0] - first, 0.0),
                    "transfer_s": 0.0,
                    "kv_bytes": 0.0,
                    "first_step_s": 0.0,
                    "cached_tokens": float(cached),
                }
            else:
                timing = {**active.timing, "first_step_s": max(time.time() - active.transfer_ended, 0.0)}
        self.emit(Tokens(active.rid, tuple(output[active.sent :]), finish, timing))
        active.sent = len(output)

    def _admitted(self, admission: Admission) -> None:
        rid = admission.request_id
        active = self._active.get(rid)
        if rid in self._orphans:
            self._orphans.discard(rid)
            if admission.admitted:
                self._abort_engine(rid)
            return
        if active is None:
            return
        active.pulling = False
        if not admission.admitted:
            self._fail(rid, "transfer", admission.error or "the pull failed")
            return
        nbytes = admission.num_transferred_tokens * self.kv_bytes_per_token
        peer = self._prefill_of(rid)
        if peer is not None:
            self.links.record(peer, nbytes, admission.transfer_s)
        active.timing.update(
            transfer_s=admission.transfer_s,
            kv_bytes=float(nbytes),
            prefill_s=0.0,
            cached_tokens=float(admission.num_cached_tokens),
        )
        active.transfer_ended = time.time()
        seq = self.engine.sequences.get(rid)
        if seq is not None:  # else it finished at admission (one token): the next step returns its output
            active.first_scheduled = time.time()
            self._emit(active, seq.output_token_ids, None, seq.token_times, seq.num_cached_tokens)

    def _prefill_of(self, rid: str) -> str | None:
        return self._pull_sources.pop(rid, None)

    def _check_deadlines(self) -> None:
        now = self.now
        for rid in [rid for rid, active in self._active.items() if active.deadline <= now]:
            self._fail(rid, "deadline", f"the request's deadline passed on worker {self.name}")

    # ---- ending requests ---------------------------------------------------------------------------------------

    def abort(self, rid: str, reason: str) -> None:
        self._fail(rid, reason, "aborted")

    def _fail(self, rid: str, code: str, message: str) -> None:
        """End a request here: free what it holds, answer ``tokens`` finish "abort" (code "abort") or ``error``."""
        active = self._active.pop(rid, None)
        self._pull_sources.pop(rid, None)
        if active is None:
            return
        self._deferred = deque(item for item in self._deferred if item[1] is not active)
        output: RequestOutput | None = None
        if active.pulling and self.connector is not None and self.connector.cancel(rid, message):
            self._orphans.add(rid)
        elif not active.pulling:
            output = self._abort_engine(rid)
        if code == "abort":
            rest = () if output is None else tuple(output.output_token_ids[active.sent :])
            self.emit(Tokens(rid, rest, "abort"))
        else:
            self.send(Error(rid, code, message))

    def _abort_engine(self, rid: str) -> RequestOutput | None:
        try:
            return self.engine.abort(rid)
        except KvxferError:  # finished in the step that is being reported: nothing left to free
            return None

    def abort_all(self, reason: str) -> None:
        for rid in list(self._active):
            self._fail(rid, reason, "aborted")
        if self.connector is not None and self.connector.pending_request_ids:
            self.connector.wait(timeout=5.0)

    def has_work(self) -> bool:
        return bool(self._active)

    def polling(self) -> bool:
        return bool(self._deferred) or (self.connector is not None and bool(self.connector.pending_request_ids))

    def connect(self, rank_info: list[bytes]) -> str:
        if self.connector is None:
            raise KvxferError(f"worker {self.name} (agg) takes no peers")
        return self.connector.connect(rank_info)

    def snapshot(self) -> Load:
        engine = self.engine
        free = engine.num_free_blocks
        pulling = set(self.connector.pending_request_ids) if self.connector is not None else set()
        waiting = [
            seq
            for rid, seq in engine.sequences.items()
            if rid not in pulling and seq.num_computed < seq.num_prompt_tokens
        ]
        decode_rate = engine.num_decode_tokens / engine.decode_s if engine.decode_s > 0 else 0.0
        links = {self.group_peers.get(group, group): rate for group, rate in self.links.snapshot().items()}
        return Load(
            free_blocks=free,
            active_blocks=engine.runner.blocks.num_blocks - free,
            running=engine.num_running,
            waiting=engine.num_waiting + len(self._deferred),
            queued_prefill_tokens=sum(seq.num_prompt_tokens - seq.num_computed for seq in waiting),
            prefill_tokens_per_s=self.prefill_rate.value,
            decode_tokens_per_s=decode_rate,
            links=links,
        )
