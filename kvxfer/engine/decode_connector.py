"""DecodeConnector: reserves blocks for remotely prefilled requests, fills the part its prefix cache lacks through
KVPipe (pull, or a prefill's push), and admits the request, or cancels the reservation when the transfer fails."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..agent import Agent
from ..errors import ConfigError, KvxferError, TransferError
from ..handle import TransferState
from ..pipe import KVPipe
from ..pipe.checksum import Checksums
from ..pipe.handle import PipeHandle
from ..pipe.lease import Leases
from .connector import MAX_REMEMBERED, Connector, group_specs, routes_of
from .decode import DecodeEngine, Reservation
from .messages import KVReady, KVWanted, RankInfo
from .request import Request


@dataclass(frozen=True)
class Admission:
    """How a received request ended here. ``admitted``: it is decoding (else its reservation was cancelled and
    ``error`` says why). ``num_cached_tokens``: prompt tokens this engine's prefix cache already had;
    ``num_transferred_tokens``: prompt tokens moved (from ``start_token``, the cached length rounded down to
    both block sizes); ``transfer_s``: seconds from the pull's start (push: the reservation) to its end."""

    request_id: str
    admitted: bool
    error: str | None
    num_cached_tokens: int
    start_token: int
    num_transferred_tokens: int
    transfer_s: float


@dataclass
class _Pending:
    request: Request
    reservation: Reservation
    scratch: list[int]  # blocks that only align the transferred range; freed at the end
    start: int
    began: float
    deadline: float
    first_token: int | None = None
    handle: PipeHandle | None = None  # pull mode
    lease_key: bytes | None = None
    sources: set[str] = field(default_factory=set)  # push mode: prefill agents whose note is awaited
    error: str | None = None
    ended: float | None = None

    @property
    def local_block_ids(self) -> list[int]:
        return self.scratch + list(self.reservation.fill_block_ids)


class DecodeConnector(Connector):
    """The decode side of one engine rank (every rank of the TP group makes the same calls in the same order).

    ``strategy``: the KVPipe strategy of pulls. ``timeout``: seconds a transfer may take (push: from the
    reservation until the prefill's note). ``verify``: check every pull against the checksums the prefill sent
    in its KVReady (a :class:`PrefillConnector` with ``verify``); a mismatch, or a KVReady without checksums,
    fails the request (TransferError). Push mode is not verified and refuses to run with it.
    """

    role = "decode"

    def __init__(
        self,
        engine: DecodeEngine,
        agent: Agent,
        *,
        region: str = "kv",
        strategy: str = "auto",
        timeout: float = 60.0,
        verify: bool = False,
    ) -> None:
        if not timeout > 0:
            raise ConfigError(f"DecodeConnector: timeout must be > 0, got {timeout}")
        super().__init__(engine, agent, region)
        self.strategy, self.timeout, self.verify = strategy, timeout, bool(verify)
        self._pipes: dict[str, KVPipe] = {}
        self._pending: dict[str, _Pending] = {}
        self._expired: OrderedDict[bytes, None] = OrderedDict()
        self._notes: OrderedDict[str, dict[str, tuple[str, int, float]]] = OrderedDict()

    def connect(self, prefill: Sequence[RankInfo | bytes]) -> str:
        """Connect to a prefill group (its ranks' :meth:`PrefillConnector.info`, rank order); returns its name."""
        name = self._connect_group(prefill, "prefill")
        if name not in self._pipes:
            group = self.group(name)
            self._pipes[name] = KVPipe(
                self.agent,
                self.spec,
                [i.agent_name for i in group],
                [i.spec for i in group],
                local_region=self.region_name,
                strategy=self.strategy,
            )
        return name

    def pipe(self, prefill: str) -> KVPipe:
        """The pipe that pulls from prefill group ``prefill``."""
        self.group(prefill)
        return self._pipes[prefill]

    @property
    def pending_request_ids(self) -> list[str]:
        """Requests received or reserved and not yet admitted or cancelled."""
        return list(self._pending)

    # ---- pull mode ---------------------------------------------------------------------------------------------

    def receive(self, message: KVReady | bytes) -> Reservation:
        """Reserve blocks for a prefilled request and start pulling the prompt tokens this engine's prefix cache
        lacks. OutOfBlocksError (nothing reserved) when the cache is full: try again later. The request is
        admitted or cancelled by :meth:`poll` / :meth:`wait`."""
        ready = KVReady.decode(message) if isinstance(message, (bytes, bytearray)) else message
        name = ready.prefill_agents[0]
        group, pipe = self.group(name), self.pipe(name)
        size = group[0].spec.block_size
        if len(ready.block_ids) != -(-len(ready.request.prompt_token_ids) // size):
            raise ConfigError(
                f"KVReady {ready.request.request_id!r}: {len(ready.block_ids)} prefill blocks for "
                f"{len(ready.request.prompt_token_ids)} tokens in blocks of {size}"
            )
        pending = self._reserve(ready.request, size)
        pending.first_token, pending.lease_key = ready.first_token, ready.lease_for(self.tp.rank)
        self._pending[ready.request.request_id] = pending
        with self._lock:
            expired = pending.lease_key in self._expired
        if expired:
            pending.error = "the prefill's lease expired before the pull started"
            return pending.reservation
        try:
            expected = self._expected(ready, pending.start, size) if self.verify else None
            pending.handle = pipe.pull(
                pending.local_block_ids,
                ready.block_ids[pending.start // size :],
                num_tokens=len(ready.request.prompt_token_ids) - pending.start,
                lease=pending.lease_key,
                renew_every=ready.lease_ttl / 4,
                timeout=self.timeout,
                expected=expected,
            )
        except KvxferError as error:
            pending.error = f"{type(error).__name__}: {error}"
            leases = Leases.of(self.agent)  # tell the prefill ranks now rather than let the lease run out
            leases.hold(pending.lease_key, [r.peer.name for r in pipe.routes], self.timeout)
            leases.drop(pending.lease_key, release=True)
        return pending.reservation

    @staticmethod
    def _expected(ready: KVReady, start: int, size: int) -> dict[str, Checksums]:
        """The prefill ranks' checksums of the tokens pulled (``start`` onwards, a multiple of their block size
        ``size``): the units before ``start`` are dropped."""
        if ready.checksums is None:
            raise TransferError(
                f"KVReady {ready.request.request_id!r} carries no checksums and this decode "
                "connector verifies (give the PrefillConnector verify=True)"
            )
        expected = {}
        for agent, data in zip(ready.prefill_agents, ready.checksums, strict=True):
            sums = Checksums.decode(data)
            if sums.unit_tokens != size or sums.num_tokens != len(ready.request.prompt_token_ids):
                raise TransferError(
                    f"KVReady {ready.request.request_id!r}: checksums of {agent} cover "
                    f"{sums.num_tokens} tokens in units of {sums.unit_tokens}, expected "
                    f"{len(ready.request.prompt_token_ids)} in units of {size}"
                )
            expected[agent] = Checksums(sums.values[start // size :], size, sums.first_head, sums.num_tokens - start)
        return expected

    # ---- push mode ---------------------------------------------------------------------------------------------

    def reserve_push(self, request: Request, prefill: str) -> KVWanted:
        """Reserve blocks for ``request`` and say where prefill group ``prefill`` should write (send the message
        to every prefill rank; each calls :meth:`PrefillConnector.push`)."""
        if self.verify:
            raise ConfigError("DecodeConnector(verify=True): verify covers pull mode only; push is not verified")
        group = self.group(prefill)
        pending = self._reserve(request, group[0].spec.block_size)
        mine = group_specs(self.spec, self.tp.size)
        pending.sources = {
            info.agent_name for info in group if self.tp.rank in routes_of(info.spec, mine, every_replica=True)
        }
        self._pending[request.request_id] = pending
        return KVWanted(request, tuple(pending.local_block_ids), pending.start, self.group_agents)

    def _reserve(self, request: Request, remote_block_size: int) -> _Pending:
        """Reserve, then round the cached length down to both block sizes: tokens from there on move, the ones
        already cached land in scratch blocks (cached blocks may be shared: they are never written)."""
        reservation = self.engine.reserve(request)
        cached, size = reservation.num_cached_tokens, reservation.block_size
        start = cached - cached % math.lcm(size, remote_block_size)
        try:
            scratch = self.engine.runner.blocks.allocate((cached - start) // size) if cached > start else []
        except KvxferError:
            self.engine.cancel_reservation(request.request_id)
            raise
        now = time.monotonic()
        return _Pending(request, reservation, scratch, start, now, now + self.timeout)

    # ---- completion --------------------------------------------------------------------------------------------

    def poll(self) -> list[Admission]:
        """Admit the requests whose transfer finished on every rank, cancel those that failed on any. Collective
        over the TP group; returns what it resolved, in reception order."""
        return self._poll(give_up=False)[0]

    def wait(self, request_ids: Sequence[str] | None = None, timeout: float | None = None) -> list[Admission]:
        """:meth:`poll` until ``request_ids`` (default: every pending request) are resolved; those still pending
        after ``timeout`` (default: the connector's) on any rank are cancelled. Collective over the TP group."""
        wanted = set(self._pending if request_ids is None else request_ids)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        resolved: list[Admission] = []
        while wanted & set(self._pending):
            admissions, give_up = self._poll(give_up=time.monotonic() > deadline)
            resolved.extend(admissions)
            if give_up:
                for request_id in wanted & set(self._pending):
                    self._fail(self._pending[request_id], "timed out waiting for the transfer")
            elif not admissions:
                self._block(deadline)
        return resolved

    def _block(self, deadline: float) -> None:
        """Sleep until a pending pull may have progressed (its handle blocks on the copy), at most 1 ms."""
        handle = next(
            (p.handle for p in self._pending.values() if p.handle is not None and not p.handle.state.final), None
        )
        seconds = max(min(deadline - time.monotonic(), 1e-3), 0.0)
        if handle is None:
            time.sleep(min(seconds, 2e-4))
        else:
            handle.block(seconds)

    def _poll(self, give_up: bool) -> tuple[list[Admission], bool]:
        items = list(self._pending.values())
        codes = [self._state(p) for p in items]
        agreed = self._agree([int(c > 0) for c in codes] + [int(c == 2) for c in codes] + [int(give_up)])
        admissions = []
        for index, pending in enumerate(items):
            final, failed = agreed[index], agreed[len(items) + index]
            if failed and not codes[index]:  # another rank failed: stop this rank's part too
                self._fail(pending, "another rank of the decode group failed")
            elif final == self.tp.size:
                admissions.append(self._resolve(pending, failed == 0))
        return admissions, agreed[-1] > 0

    def _state(self, pending: _Pending) -> int:
        """0: in flight here, 1: done here, 2: failed here."""
        if pending.error is None and pending.handle is not None:
            state = pending.handle.poll()
            if not state.final:
                return 0
            if state is not TransferState.DONE:
                error = pending.handle.error
                pending.error = f"{type(error).__name__}: {error}"
            else:
                with self._lock:
                    if pending.lease_key in self._expired:
                        pending.error = "the prefill's lease expired during the pull"
        elif pending.error is None:  # push: wait for a note from every prefill rank that writes here
            with self._lock:
                notes = dict(self._notes.get(pending.request.request_id, {}))
            if any(verb != "pushed" for verb, _, _ in notes.values()):
                pending.error = "a prefill rank reported a failed push"
            elif pending.sources <= set(notes):
                pending.first_token = notes[min(pending.sources)][1]
            elif time.monotonic() > pending.deadline:
                pending.error = f"no push note from {sorted(pending.sources - set(notes))} within {self.timeout} s"
            else:
                return 0
        if pending.ended is None:
            pending.ended = time.monotonic()
        return 1 if pending.error is None else 2

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stop a pending request's transfer; the next :meth:`poll` resolves it as failed (``reason``) and frees its
        reservation. False when ``request_id`` is not pending. Every rank of the TP group makes the same call."""
        pending = self._pending.get(request_id)
        if pending is None:
            return False
        self._fail(pending, reason)
        return True

    def _fail(self, pending: _Pending, reason: str) -> None:
        if pending.error is None:
            pending.error = reason
        if pending.handle is not None:
            pending.handle.cancel()

    def _resolve(self, pending: _Pending, ok: bool) -> Admission:
        request_id = pending.request.request_id
        del self._pending[request_id]
        if pending.handle is not None:
            pending.handle.release()
        if pending.scratch:
            self.engine.runner.blocks.free(pending.scratch)
        if ok:
            assert pending.first_token is not None
            self.engine.admit(request_id, pending.first_token)
        else:
            self.engine.cancel_reservation(request_id)
        with self._lock:
            self._notes.pop(request_id, None)
            self._expired.pop(pending.lease_key, None)  # type: ignore[arg-type]
        error = None if ok else pending.error or "another rank of the decode group failed"
        transferred = len(pending.request.prompt_token_ids) - pending.start
        return Admission(
            request_id,
            ok,
            error,
            pending.reservation.num_cached_tokens,
            pending.start,
            transferred,
            (pending.ended or time.monotonic()) - pending.began,
        )

    # ---- notes -------------------------------------------------------------------------------------------------

    def _note(self, peer: str, verb: str, fields: list[Any]) -> None:
        with self._lock:
            if verb == "expired" and fields and isinstance(fields[0], bytes):
                self._expired[fields[0]] = None
                _trim(self._expired)
            elif verb in ("pushed", "push-failed") and len(fields) == 3 and isinstance(fields[0], str):
                self._notes.setdefault(fields[0], {})[peer] = (verb, int(fields[1]), float(fields[2]))
                _trim(self._notes)
            else:
                super()._note(peer, verb, fields)

    def close(self) -> None:
        """Close the pipes (pending requests stay pending: :meth:`wait` first)."""
        for pipe in self._pipes.values():
            pipe.close()
        self._pipes.clear()


def _trim(remembered: OrderedDict) -> None:
    while len(remembered) > MAX_REMEMBERED:
        remembered.popitem(last=False)
