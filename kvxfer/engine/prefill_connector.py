"""PrefillConnector: computes prompts, holds their blocks under leases for the decode ranks (pull mode), or
writes them into a decode group's blocks while the layers finish (push mode), and frees blocks once every decode
rank is done with them."""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..agent import Agent
from ..errors import ConfigError, KvxferError, TransferTimeoutError
from ..pipe import KVPipe, LayerStream, checksum
from ..pipe.lease import Lease, Leases
from ..pipe.ranks import rank_pairs
from .connector import Connector, routes_of
from .messages import KVReady, KVWanted, RankInfo, lease_key_for
from .model import LayerCallback
from .prefill import PrefillEngine
from .request import Request


@dataclass
class _Held:
    request_id: str
    pending: int  # leases or pushes that still need the blocks on this rank
    expired: int = 0
    lease_keys: tuple[bytes, ...] = ()
    aborted: bool = False


@dataclass(frozen=True)
class PushResult:
    """The outcome of :meth:`PrefillConnector.push` on this rank. ``tail_s``: seconds from the end of the
    prefill compute to the end of the transfer (the part of the transfer that did not overlap compute)."""

    request_id: str
    first_token: int
    ok: bool
    error: str | None
    num_tokens: int
    prefill_s: float
    tail_s: float


class PrefillConnector(Connector):
    """The prefill side of one engine rank (every rank of the TP group makes the same calls).

    ``lease_ttl``: seconds the blocks of a request stay held without a heartbeat from its decode ranks.
    ``strategy``: the KVPipe strategy of pushes. ``timeout``: seconds a push may take. ``verify``: pull mode
    sends checksums of each request's blocks in its KVReady, for a decode connector with ``verify`` to check what
    it pulled (costs one pass over the blocks and a small gather over the TP group per request; push mode is not
    verified and refuses to run with it).
    """

    role = "prefill"

    def __init__(
        self,
        engine: PrefillEngine,
        agent: Agent,
        *,
        lease_ttl: float = 10.0,
        region: str = "kv",
        strategy: str = "auto",
        timeout: float = 60.0,
        verify: bool = False,
    ) -> None:
        if not lease_ttl > 0 or not timeout > 0:
            raise ConfigError(f"PrefillConnector: lease_ttl and timeout must be > 0, got {lease_ttl}, {timeout}")
        super().__init__(engine, agent, region)
        self.lease_ttl, self.strategy, self.timeout, self.verify = lease_ttl, strategy, timeout, bool(verify)
        self._leases = Leases.of(agent)
        self._held: dict[str, _Held] = {}
        self._serial = 0
        self._pipes: dict[str, KVPipe] = {}
        self.num_released = 0  # leases ended by the decode side
        self.num_expired = 0  # leases that ran out (blocks freed without a release)

    def connect(self, decode: Sequence[RankInfo | bytes]) -> str:
        """Connect to a decode group (its ranks' :meth:`DecodeConnector.info`, rank order); returns its name."""
        return self._connect_group(decode, "decode")

    @property
    def held_request_ids(self) -> list[str]:
        """Requests whose blocks this connector still holds (freed by :meth:`poll` once every rank is done)."""
        with self._lock:
            return list(self._held)

    # ---- pull mode ---------------------------------------------------------------------------------------------

    def prefill(self, request: Request, decode: str, on_layer_done: LayerCallback | None = None) -> KVReady:
        """Compute ``request`` and hold its blocks for the decode group ``decode`` (one lease per decode rank that
        reads from this rank). Returns the message for the decode ranks (send it any way you like)."""
        return self.prefill_batch([request], [decode], on_layer_done)[0]

    def prefill_batch(
        self, requests: Sequence[Request], decode: Sequence[str], on_layer_done: LayerCallback | None = None
    ) -> list[KVReady]:
        """:meth:`prefill` for several requests in shared forward passes (PrefillEngine.prefill_batch: all or
        nothing, OutOfBlocksError admits none); ``decode[i]`` is the decode group of ``requests[i]``."""
        if len(decode) != len(requests):
            raise ConfigError(
                f"PrefillConnector.prefill_batch: one decode group per request, got {len(decode)} "
                f"for {len(requests)} requests"
            )
        groups = [self.group(name) for name in decode]
        results = self.engine.prefill_batch(list(requests), on_layer_done)
        readies = []
        for request, group, result in zip(requests, groups, results, strict=True):
            self._serial += 1
            base = f"{request.request_id}#{self._serial}".encode()
            sums = self._checksums(result.block_ids, len(request.prompt_token_ids)) if self.verify else None
            readers = sorted(
                {
                    d
                    for p, d, _ in rank_pairs(self.tp.size, len(group), self.spec.total_kv_heads or 1)
                    if p == self.tp.rank
                }
            )
            keys = tuple(lease_key_for(base, rank) for rank in readers)
            with self._lock:
                self._held[request.request_id] = _Held(request.request_id, len(readers), lease_keys=keys)
            for rank, key in zip(readers, keys, strict=True):
                self._leases.grant(
                    key,
                    group[rank].agent_name,
                    result.block_ids,
                    self.lease_ttl,
                    on_end=functools.partial(self._lease_ended, request.request_id),
                )
            readies.append(
                KVReady(
                    request=request,
                    first_token=result.first_token,
                    first_token_time=result.first_token_time,
                    block_ids=result.block_ids,
                    prefill_agents=self.group_agents,
                    lease_key=base,
                    lease_ttl=self.lease_ttl,
                    num_cached_tokens=result.num_cached_tokens,
                    num_computed_tokens=result.num_computed_tokens,
                    checksums=sums,
                )
            )
        return readies

    def abort(self, request_id: str) -> bool:
        """Give up a held request: its leases end at the lease keeper's next tick (a decode rank still pulling, or
        pulling later, sees them expired) and then :meth:`poll` frees its blocks. False when ``request_id`` is not
        held. Every rank of the TP group makes the same call."""
        with self._lock:
            held = self._held.get(request_id)
            if held is None:
                return False
            held.aborted = True
        self._expire(held)
        return True

    def _expire(self, held: _Held) -> None:
        """Make the keeper end the request's leases at its next tick (a renewal in between would push the expiry
        back, so :meth:`poll` repeats this while the request is held)."""
        granted = self._leases.granted
        for key in held.lease_keys:
            lease = granted.get(key)
            if lease is not None:
                lease.expires_at = 0.0

    def _checksums(self, block_ids: Sequence[int], num_tokens: int) -> tuple[bytes, ...]:
        """Every rank's checksums of its heads of the request's blocks, in rank order (collective over TP)."""
        region = next(r for r in self.agent.regions if r.name == self.region_name)
        mine = checksum.compute(region, self.spec, list(block_ids), num_tokens=num_tokens).encode()
        if self.tp.size == 1:
            return (mine,)
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.tp.size
        dist.all_gather_object(gathered, mine, group=self.tp.group)
        return tuple(gathered)

    def _lease_ended(self, request_id: str, lease: Lease, reason: str) -> None:
        """Called by the lease keeper's thread: count the lease off; the blocks are freed in :meth:`poll`."""
        with self._lock:
            held = self._held.get(request_id)
            if held is not None:
                held.pending -= 1
                held.expired += reason == "expired"
            if reason == "expired":
                self.num_expired += 1
            else:
                self.num_released += 1
        if reason == "expired":  # the decode side may not hold the lease yet: tell its connector directly
            self._send(lease.peer, "expired", lease.key)

    # ---- push mode ---------------------------------------------------------------------------------------------

    def push(self, wanted: KVWanted | bytes, *, stream_layers: bool = True) -> PushResult:
        """Compute ``wanted.request`` and write its prompt tokens ``wanted.start_token`` onwards into the decode
        group's blocks, layer by layer as they finish when ``stream_layers``. Then tell the decode ranks (with the
        first token). A failed transfer is reported in the result (and to the decode ranks), not raised."""
        wanted = KVWanted.decode(wanted) if isinstance(wanted, (bytes, bytearray)) else wanted
        if self.verify:
            raise ConfigError("PrefillConnector(verify=True): verify covers pull mode only; push is not verified")
        name = wanted.decode_agents[0]
        group = self.group(name)  # decode ranks that replicate a head each get their copy (KVPipe.write_routes)
        request, start, size = wanted.request, wanted.start_token, self.spec.block_size
        if start % size:
            raise ConfigError(f"KVWanted.start_token must be a multiple of the prefill block size {size}, got {start}")
        pipe = self._pipe(name)
        num_tokens = len(request.prompt_token_ids) - start
        state: dict[str, Any] = {}

        def allocated(request_id: str, block_ids: tuple[int, ...], num_cached: int) -> None:
            handle = pipe.push(
                block_ids[start // size :],
                wanted.block_ids,
                num_tokens=num_tokens,
                stream_layers=True,
                timeout=self.timeout,
            )
            assert isinstance(handle, LayerStream)  # what a push with stream_layers returns
            state["handle"], state["feeder"] = handle, _LayerFeeder(handle, self.engine.cache.device)

        began = time.perf_counter()
        try:
            result = self.engine.prefill(
                request,
                (lambda layer: state["feeder"](layer)) if stream_layers else None,
                on_allocated=allocated if stream_layers else None,
            )
        except BaseException:
            if "handle" in state:
                state["feeder"].finish(self.timeout)
                state["handle"].cancel()
            self._tell(group, "push-failed", request.request_id, -1, 0.0)
            raise
        computed = time.perf_counter()
        error: KvxferError | None = None
        if stream_layers:
            handle = state["handle"]
            state["feeder"].finish(self.timeout)
            error = state["feeder"].error
        else:
            try:
                handle = pipe.push(
                    result.block_ids[start // size :], wanted.block_ids, num_tokens=num_tokens, timeout=self.timeout
                )
            except KvxferError as failure:
                handle, error = None, failure
        try:
            if handle is not None and error is None:
                handle.wait(self.timeout)
        except KvxferError as failure:
            error = failure
        if handle is not None and error is not None:
            handle.cancel()
            error = handle.error or error  # the transfer's own failure says more than "already failed"
        finished = time.perf_counter()
        with self._lock:
            self._held[request.request_id] = _Held(request.request_id, 0)
        self._tell(
            group,
            "pushed" if error is None else "push-failed",
            request.request_id,
            result.first_token,
            result.first_token_time,
        )
        return PushResult(
            request.request_id,
            result.first_token,
            error is None,
            None if error is None else f"{type(error).__name__}: {error}",
            num_tokens,
            computed - began,
            finished - computed,
        )

    def _tell(self, group: list[RankInfo], verb: str, request_id: str, token: int, token_time: float) -> None:
        """A note to the decode ranks this rank pushes to, every replica included (each decode rank counts one
        note per prefill rank it expects)."""
        for rank in sorted(routes_of(self.spec, [info.spec for info in group], every_replica=True)):
            self._send(group[rank].agent_name, verb, request_id, token, token_time)

    def _pipe(self, name: str) -> KVPipe:
        pipe = self._pipes.get(name)
        if pipe is None:
            group = self.group(name)
            pipe = KVPipe(
                self.agent,
                self.spec,
                [i.agent_name for i in group],
                [i.spec for i in group],
                local_region=self.region_name,
                strategy=self.strategy,
            )
            self._pipes[name] = pipe
        return pipe

    # ---- freeing -----------------------------------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Free the blocks of requests every rank is done with (all leases released or expired, pushes ended);
        returns their ids. Collective over the TP group."""
        return self._free_ended(give_up=False)[0]

    def drain(self, timeout: float = 30.0) -> bool:
        """:meth:`poll` until no request is held or ``timeout`` s passed (on any rank); True when none is held.
        Collective over the TP group."""
        deadline = time.monotonic() + timeout
        while True:
            _, stop = self._free_ended(give_up=time.monotonic() > deadline)
            with self._lock:
                if not self._held or stop:
                    return not self._held
            time.sleep(2e-3)

    def _free_ended(self, give_up: bool) -> tuple[list[str], bool]:
        with self._lock:
            items = list(self._held.values())
            flags = [int(held.pending <= 0) for held in items]  # an aborted request too: once its leases ended
        for held in items:
            if held.aborted and held.pending > 0:
                self._expire(held)
        agreed = self._agree([*flags, int(give_up)])
        freed = []
        for held, count in zip(items, agreed, strict=False):
            if count == self.tp.size:
                self.engine.release(held.request_id)
                with self._lock:
                    del self._held[held.request_id]
                freed.append(held.request_id)
        return freed, agreed[-1] > 0

    def close(self) -> None:
        """Close the push pipes (held blocks stay held: :meth:`drain` first)."""
        for pipe in self._pipes.values():
            pipe.close()
        self._pipes.clear()


class _LayerFeeder:
    """Marks layers ready on a streaming push. On a GPU only once the layer's K/V writes completed: the pipe
    copies on its own stream, so a thread waits on an event recorded after each layer (compute keeps going)."""

    def __init__(self, handle: LayerStream, device: torch.device) -> None:
        self.handle = handle
        self.error: KvxferError | None = None
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._queue: queue.SimpleQueue[tuple[int, torch.cuda.Event] | None] = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="kvxfer-layer-feeder", daemon=True)
            self._thread.start()

    def __call__(self, layer: int) -> None:
        if not self.cuda:
            self._ready(layer)
            return
        event = torch.cuda.Event()
        event.record()
        self._queue.put((layer, event))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            layer, event = item
            event.synchronize()
            self._ready(layer)

    def _ready(self, layer: int) -> None:
        if self.error is not None:
            return
        try:
            # StreamingPush.ready posts the layer's transfers before it notices a failed request, so a failed
            # push must not be fed any more layers (those writes would land in a cancelled reservation).
            if self.handle.poll().final:
                self.error = self.handle.error or KvxferError("the push ended before every layer was ready")
                return
            self.handle.ready(layer)
        except KvxferError as error:
            self.error = error

    def finish(self, timeout: float) -> None:
        """Wait until every queued layer was handed to the pipe."""
        if self.cuda:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive() and self.error is None:
                self.error = TransferTimeoutError(f"layers not computed within {timeout} s")
