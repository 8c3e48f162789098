"""The router core: admits requests (policy), queues remote prefills, dispatches both legs, streams tokens back.

Everything runs on the asyncio loop of the HTTP server, the control link included (it reads and writes its zmq
socket on the loop: :mod:`kvxfer.serve.control_loop`), so the router's state is touched by one thread and needs no
locks. A sweeper task
drops silent workers (their prefills are requeued once, then failed), fails requests past their total deadline,
and refreshes the gauges.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING

from ..errors import QueueFullError, RequeueLimitError
from . import policy
from .control_loop import LoopRouterLink
from .metrics import RouterMetrics
from .openai_schema import ApiError
from .policy_config import PolicyConfig
from .prefix_index import PrefixIndex, block_hashes
from .protocol import (
    Abort,
    AnyMessage,
    Error,
    Generate,
    Load,
    Message,
    Peers,
    Prefill,
    Prefilled,
    Register,
    Sampling,
    Shutdown,
    Tokens,
)
from .queue import PrefillQueue
from .router_flight import Flight
from .router_placement import kv_bytes_per_token, link_rates, placement, rejection, worker_state
from .router_replies import WorkerReplies
from .router_workers import HEARTBEAT_TIMEOUT_S, WorkerEntry, WorkerRegistry

if TYPE_CHECKING:
    from .discovery_link import RouterDiscoveryLink

logger = logging.getLogger("kvxfer.serve")
SWEEP_S = 0.1


class Router(WorkerReplies):
    """Routes requests of one model to its registered workers (see the module docstring)."""

    def __init__(
        self,
        model: str,
        control: str = "tcp://127.0.0.1:0",
        config: PolicyConfig | None = None,
        metrics: RouterMetrics | None = None,
        request_timeout_s: float = 300.0,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        aliases: frozenset[str] = frozenset(),
        vocab_size: int = 0,
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.control = control
        self.config = config or PolicyConfig()
        self.metrics = metrics or RouterMetrics()
        self.request_timeout_s = request_timeout_s
        self.registry = WorkerRegistry(frozenset({model}) | aliases, heartbeat_timeout_s)
        self.queue: PrefillQueue[Flight] = PrefillQueue(self.config.max_prefill_queue_size)
        self.prefix_index = PrefixIndex()
        self.flights: dict[str, Flight] = {}
        self.draining = False
        self.link: LoopRouterLink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._id_prefix = os.urandom(4).hex()
        self._peers_version = -1
        self.discovery: RouterDiscoveryLink | None = None  # set by the launcher with --discovery etcd://...

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> str:
        """Bind the control socket and start the sweeper; returns the control address workers connect to."""
        self._loop = asyncio.get_running_loop()
        if self.vocab_size:  # block_hashes builds its table of token texts on first use: not on a request's path
            block_hashes([self.vocab_size - 1] * self.config.block_size, self.config.block_size)
        self.link = LoopRouterLink(self.control, self._on_link_message, self._loop)
        self._sweeper = self._loop.create_task(self._sweep())
        return self.link.address

    async def close(self, drain_s: float = 0.0) -> None:
        """Stop admitting, wait up to ``drain_s`` for requests in flight, tell workers to shut down, close."""
        self.draining = True
        give_up = time.monotonic() + drain_s
        while self.flights and time.monotonic() < give_up:
            await asyncio.sleep(0.05)
        for flight in list(self.flights.values()):
            self._fail(
                flight,
                ApiError(503, "the server is shutting down", code="shutting_down", kind="service_unavailable"),
                "failure",
            )
        for entry in list(self.registry.workers.values()):
            self._send(entry.name, Shutdown(drain_s=1.0))
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.link is not None:
            self.link.close()
            self.link = None

    def ready(self, min_decode: int = 1, min_prefill: int = 0) -> bool:
        """True when enough workers registered (decode counts decode and agg workers)."""
        return (
            len(self.registry.by_role("decode", "agg")) >= min_decode and self.registry.count("prefill") >= min_prefill
        )

    # -- requests ---------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        sampling: Sampling,
        priority: str = "normal",
        prefill_mode: str = "auto",
        timeout_s: float | None = None,
    ) -> Flight:
        """Admit and dispatch one request, or raise ApiError (429 overload with Retry-After, 503 no worker /
        queue full / draining)."""
        arrival = time.perf_counter()
        if self.draining:
            raise ApiError(
                503,
                "the server is draining and admits no new requests",
                code="draining",
                kind="service_unavailable",
                retry_after_s=1.0,
            )
        block_size = self.registry.block_size() or self.config.block_size
        hashes = tuple(block_hashes(prompt, block_size))
        workers = [
            worker_state(w) for w in self.registry.workers.values() if prefill_mode != "remote" or w.role != "agg"
        ]  # forced remote: KV goes to a decode worker
        cached = {w.name: self.prefix_index.matched_blocks(w.name, hashes) for w in workers}
        rid = f"{self._id_prefix}-{next(self._ids)}"
        request = policy.RouteRequest(
            rid,
            len(prompt),
            hashes,
            priority,  # type: ignore[arg-type]
            kv_bytes_per_token(self.registry),
        )
        decision = policy.route(
            self.config, request, workers, cached, link_rates(self.registry), len(self.queue), self.queue.queued_tokens
        )
        if not decision.admitted or decision.decode is None:
            self.metrics.rejections.labels(decision.rejection or "no_worker").inc()
            raise rejection(decision)
        prefill, reason = placement(
            self.config, self.registry, decision, prefill_mode, workers, len(prompt), len(self.queue)
        )
        flight = Flight(
            rid,
            tuple(prompt),
            sampling,
            priority,
            decision.decode,
            prefill,
            hashes,  # type: ignore
            time.time() + (timeout_s or self.request_timeout_s),
            arrival=arrival,
            predicted_cached_tokens=decision.cached_tokens,
            predicted_ttft_s=decision.predicted_ttft_s,
        )
        if prefill is not None:
            try:
                self.queue.put(flight, request.priority, len(prompt))
            except QueueFullError as error:
                self.metrics.rejections.labels("queue_full").inc()
                raise ApiError(
                    503,
                    f"prefill queue full: {error}",
                    code="queue_full",
                    kind="service_unavailable",
                    retry_after_s=self.config.retry_after_min_s,
                ) from error
            flight.queued_at = arrival
        self.flights[rid] = flight
        self.registry.workers[flight.decode].requests.add(rid)
        self.prefix_index.record(flight.decode, hashes)
        self.metrics.decisions.labels("remote" if prefill else "local", reason).inc()
        self.metrics.prompt_tokens.inc(len(prompt))
        if prefill is None:
            flight.phase = "decoding"
            self.registry.workers[flight.decode].add_pending(rid, len(prompt) - decision.cached_tokens)
            self._dispatch_first(flight, flight.decode, Generate(rid, flight.prompt, sampling, flight.deadline_s))
        else:
            self._dispatch_prefills()
        return flight

    def worker_gone(self, name: str) -> None:
        """Discovery says ``name``'s record is gone (lease expired): drop it like a worker that missed heartbeats."""
        entry = self.registry.workers.get(name)
        if entry is not None:
            level = logging.WARNING if entry.requests else logging.INFO  # a clean stop deregisters with nothing left
            logger.log(
                level,
                "router: worker %s (%s) dropped: its discovery record is gone (lease expired or "
                "deregistered), %d requests in flight",
                name,
                entry.role,
                len(entry.requests),
            )
            self._worker_lost(entry)

    def abort(self, rid: str, cause: str) -> None:
        """End a request early (client gone, stop string matched): both legs get an ``abort``."""
        flight = self.flights.get(rid)
        if flight is not None:
            self._finish(flight, cause)

    # -- dispatch -------------------------------------------------------------------------------------------------

    def _send(self, name: str, message: Message) -> bool:
        return self.link is not None and self.link.send(name.encode(), message)

    def _dispatch_first(self, flight: Flight, worker: str, message: Message) -> None:
        if flight.dispatched_at is None:
            flight.dispatched_at = time.perf_counter()
            self.metrics.router_overhead.observe(flight.dispatched_at - flight.arrival)
        flight.sent_to.add(worker)
        if not self._send(worker, message):
            self._fail(
                flight,
                ApiError(
                    503, f"worker {worker!r} is unreachable", code="worker_unreachable", kind="service_unavailable"
                ),
                "failure",
            )

    def _dispatch_prefills(self) -> None:
        """Hand queued prefills to prefill workers with capacity (the one with fewest queued tokens first); when no
        prefill worker is left at all, their decode workers prefill them locally."""
        while len(self.queue):
            if not self.registry.count("prefill"):
                self._prefill_locally(self.queue.pop())
                continue
            ready = [w for w in self.registry.by_role("prefill") if w.prefill_capacity() > 0]
            if not ready:
                return
            flight: Flight | None = self.queue.pop()
            if flight is None:
                return
            if flight.rid not in self.flights:
                continue
            named = self.registry.workers.get(flight.prefill or "")
            worker = (
                named
                if named in ready
                else min(
                    ready,
                    key=lambda w: (w.load.queued_prefill_tokens if w.load else 0, len(w.in_flight_prefills), w.name),
                )
            )
            flight.prefill, flight.phase = worker.name, "prefilling"
            now = time.perf_counter()
            flight.queue_wait_s += now - (flight.queued_at or now)
            worker.in_flight_prefills.add(flight.rid)
            worker.add_pending(flight.rid, flight.num_prompt_tokens)
            worker.requests.add(flight.rid)
            self.prefix_index.record(worker.name, flight.block_hashes)
            self._dispatch_first(
                flight,
                worker.name,
                Prefill(flight.rid, flight.prompt, flight.sampling, flight.decode, flight.deadline_s),
            )

    def _prefill_locally(self, flight: Flight | None) -> None:
        """A queued request whose prefill pool is gone: its decode worker prefills it (``generate``)."""
        if flight is None or flight.rid not in self.flights:
            return
        decode = self.registry.workers.get(flight.decode)
        if decode is None:
            self._fail(
                flight,
                ApiError(
                    503, f"decode worker {flight.decode!r} is gone", code="worker_lost", kind="service_unavailable"
                ),
                "failure",
            )
            return
        now = time.perf_counter()
        flight.queue_wait_s += now - (flight.queued_at or now)
        flight.prefill, flight.phase = None, "decoding"
        self.metrics.decisions.labels("local", "no_prefill_worker").inc()
        decode.add_pending(flight.rid, flight.num_prompt_tokens)
        self._dispatch_first(
            flight, decode.name, Generate(flight.rid, flight.prompt, flight.sampling, flight.deadline_s)
        )

    # -- messages from workers (on the loop: the link reads its socket there) ---------------------------------------

    def _on_link_message(self, identity: bytes, message: AnyMessage) -> None:
        try:
            self._handle(identity.decode("utf-8", "replace"), message)
        except Exception:  # one bad message must not stop the router; logged with its traceback
            logger.exception("router: handling %s from %r failed", type(message).__name__, identity)

    def _handle(self, sender: str, message: AnyMessage) -> None:
        if isinstance(message, Tokens):
            self._on_tokens(sender, message)
        elif isinstance(message, Load):
            if not self.registry.update(sender, message):
                # dropped by its discovery lease while its link stayed up, and registered in etcd again?
                again = self.discovery.registration(sender) if self.discovery is not None else None
                if again is not None:
                    self._on_register(sender, again)
                    self.registry.update(sender, message)
                else:
                    logger.debug("router: load from unregistered worker %r", sender)
        elif isinstance(message, Prefilled):
            self._on_prefilled(sender, message)
        elif isinstance(message, Error):
            self._on_error(sender, message)
        elif isinstance(message, Register):
            self._on_register(sender, message)

    # -- endings ------------------------------------------------------------------------------------------------

    def _fail(self, flight: Flight, error: ApiError, cause: str) -> None:
        flight.events.put_nowait(error)
        self._finish(flight, cause)

    def _finish(self, flight: Flight, abort_cause: str | None) -> None:
        """Forget ``flight``; with ``abort_cause``, every worker still holding it gets an ``abort``."""
        if self.flights.pop(flight.rid, None) is None:
            return
        self.queue.release(flight.rid)
        flight.phase = "done"
        if abort_cause is not None:
            self.metrics.aborts.labels(abort_cause).inc()
            for name in flight.sent_to:
                self._send(name, Abort(flight.rid))
        for leg in (flight.decode, flight.prefill):
            worker = self.registry.workers.get(leg or "")
            if worker is not None:
                worker.requests.discard(flight.rid)
                worker.in_flight_prefills.discard(flight.rid)
                worker.clear_pending(flight.rid)
        self._dispatch_prefills()

    def _worker_lost(self, entry: WorkerEntry, keep_registered: bool = False) -> None:
        """A worker died (or restarted): requeue its unfinished prefills once, fail the rest of its requests."""
        self.prefix_index.forget(entry.name)
        if not keep_registered:
            self.metrics.worker_losses.labels(entry.role).inc()
            self.registry.remove(entry.name)
            for gauge in (self.metrics.free_blocks, self.metrics.active_blocks):
                try:
                    gauge.remove(entry.name, entry.role)
                except KeyError:  # never reported
                    pass
        for rid in list(entry.requests):
            flight = self.flights.get(rid)
            if flight is None:
                continue
            if not keep_registered:  # a restarted worker that registered again still gets the abort
                flight.sent_to.discard(entry.name)
            if flight.prefill == entry.name and flight.phase == "prefilling":
                try:
                    self.queue.requeue(flight, flight.priority, flight.num_prompt_tokens)  # type: ignore[arg-type]
                except (RequeueLimitError, QueueFullError) as error:
                    self._fail(
                        flight,
                        ApiError(
                            503,
                            f"prefill worker {entry.name!r} died and the request was requeued once already: {error}",
                            code="prefill_worker_lost",
                            kind="service_unavailable",
                        ),
                        "failure",
                    )
                    continue
                self.metrics.requeues.inc()
                flight.phase, flight.requeued, flight.queued_at = "queued", True, time.perf_counter()
                if keep_registered:  # registered again: whatever it still runs of this prefill is not wanted
                    self._send(entry.name, Abort(flight.rid))
            else:
                self._fail(
                    flight,
                    ApiError(
                        503,
                        f"worker {entry.name!r} ({entry.role}) died during the request",
                        code="worker_lost",
                        kind="service_unavailable",
                    ),
                    "failure",
                )
        self._broadcast_peers()
        self._dispatch_prefills()

    def _broadcast_peers(self) -> None:
        if self._peers_version == self.registry.version:
            return
        self._peers_version = self.registry.version
        peers = Peers(self.registry.peers())
        for name in self.registry.workers:
            self._send(name, peers)

    # -- the sweeper ------------------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                self.sweep_once()
            except Exception:  # the sweeper must outlive one bad pass; logged with its traceback
                logger.exception("router: sweep failed")

    def sweep_once(self) -> None:
        """Drop silent workers, fail requests past their deadline, refresh the gauges."""
        for entry in self.registry.expire():
            logger.warning(
                "router: worker %s (%s) lost: no heartbeat for %.1f s",
                entry.name,
                entry.role,
                self.registry.heartbeat_timeout_s,
            )
            self._worker_lost(entry)
        now = time.time()
        for flight in [f for f in self.flights.values() if f.deadline_s < now]:
            self._fail(
                flight,
                ApiError(
                    504,
                    f"request {flight.rid} ran past its deadline (phase {flight.phase})",
                    code="deadline_exceeded",
                    kind="server_error",
                ),
                "deadline",
            )
        self._dispatch_prefills()
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """Set the gauges (queue depth, pools, workers' blocks) from the current state."""
        m = self.metrics
        for priority, depth in self.queue.by_priority().items():
            m.queue_depth.labels(priority).set(depth)
        m.queue_tokens.set(self.queue.queued_tokens)
        m.in_flight.set(len(self.flights))
        for role in ("prefill", "decode", "agg"):
            m.pool.labels(role).set(self.registry.count(role))
        for entry in self.registry.workers.values():
            m.free_blocks.labels(entry.name, entry.role).set(entry.free_blocks)
            m.active_blocks.labels(entry.name, entry.role).set(entry.active_blocks)
