"""What the router does with its workers' replies: registrations, tokens, finished prefills and errors.

A part of :class:`~kvxfer.serve.router.Router` (its base class), kept apart so that each file stays small; the
attributes and methods declared here are the router's.
"""

from __future__ import annotations

import logging
import time

from ..errors import UsageError
from .metrics import RouterMetrics
from .openai_schema import ApiError
from .protocol import Abort, Decode, Error, Message, Prefilled, Register, Tokens
from .router_flight import Flight, TokensEvent
from .router_workers import WorkerEntry, WorkerRegistry

logger = logging.getLogger("kvxfer.serve")


class WorkerReplies:
    """Handlers of the messages workers send (called on the router's event loop)."""

    registry: WorkerRegistry
    flights: dict[str, Flight]
    metrics: RouterMetrics

    def _send(self, name: str, message: Message) -> bool:
        raise UsageError("WorkerReplies is the base of Router, not used alone")

    def _worker_lost(self, entry: WorkerEntry, keep_registered: bool = False) -> None:
        raise UsageError("WorkerReplies is the base of Router, not used alone")

    def _broadcast_peers(self) -> None:
        raise UsageError("WorkerReplies is the base of Router, not used alone")

    def _dispatch_prefills(self) -> None:
        raise UsageError("WorkerReplies is the base of Router, not used alone")

    def _fail(self, flight: Flight, error: ApiError, cause: str) -> None:
        raise UsageError("WorkerReplies is the base of Router, not used alone")

    def _finish(self, flight: Flight, abort_cause: str | None) -> None:
        raise UsageError("WorkerReplies is the base of Router, not used alone")

    def _on_register(self, sender: str, message: Register) -> None:
        if message.name != sender:
            logger.warning("router: worker registered as %r from identity %r: refused", message.name, sender)
            return
        old = self.registry.workers.get(sender)
        if old is not None:  # re-registration (a restarted worker): whatever it held is gone
            self._worker_lost(old, keep_registered=True)
        entry = self.registry.register(message)
        if isinstance(entry, str):
            logger.warning("router: %s", entry)
            return
        logger.info(
            "router: worker %s (%s, %s, %d blocks) registered",
            message.name,
            message.role,
            message.device,
            message.num_blocks,
        )
        self._broadcast_peers()
        self._dispatch_prefills()

    def _on_tokens(self, sender: str, message: Tokens) -> None:
        self.registry.touch(sender)
        flight = self.flights.get(message.rid)
        if flight is None or flight.decode != sender:
            return  # late tokens of a finished or aborted request
        now = time.perf_counter()
        timing = None
        if message.token_ids:
            if flight.first_token_at is None:
                flight.first_token_at = now
                entry = self.registry.workers.get(sender)
                if entry is not None:
                    entry.clear_pending(flight.rid)
                timing = flight.breakdown(message.timing, now)
                self.metrics.observe_ttft(
                    now - flight.arrival, {k: v for k, v in timing.items() if isinstance(v, float)}
                )
                if flight.prefill is not None and timing["kv_bytes"]:
                    self.metrics.kv_bytes.inc(float(timing["kv_bytes"]))
                    self.metrics.kv_seconds.observe(float(timing["transfer_s"]))
            elif flight.last_token_at is not None:
                self.metrics.itl.observe((now - flight.last_token_at) / len(message.token_ids))
            flight.last_token_at = now
            flight.num_generated += len(message.token_ids)
            if flight.num_generated > flight.sampling.max_tokens:  # bounds the request's event queue too
                self._fail(
                    flight,
                    ApiError(
                        502,
                        f"worker {sender!r} sent {flight.num_generated} tokens for "
                        f"max_tokens={flight.sampling.max_tokens}",
                        code="worker_protocol",
                        kind="server_error",
                    ),
                    "failure",
                )
                return
            self.metrics.generation_tokens.inc(len(message.token_ids))
        if message.finish == "error":
            self._fail(
                flight,
                ApiError(500, f"worker {sender!r} failed the request", code="worker_error", kind="server_error"),
                "failure",
            )
            return
        flight.events.put_nowait(TokensEvent(message.token_ids, message.finish, timing))
        if message.finish is not None:
            flight.sent_to.discard(sender)
            self._finish(flight, None)

    def _on_prefilled(self, sender: str, message: Prefilled) -> None:
        self.registry.touch(sender)
        flight = self.flights.get(message.rid)
        worker = self.registry.workers.get(sender)
        if worker is not None:
            worker.in_flight_prefills.discard(message.rid)
            worker.clear_pending(message.rid)
        if flight is None or flight.prefill != sender or flight.phase != "prefilling":  # ended, or requeued
            self._send(sender, Abort(message.rid))  # release its lease now, not when it lapses
            return
        flight.prefill_timing = dict(message.timing or {})
        flight.phase = "decoding"
        flight.sent_to.add(flight.decode)
        if not self._send(
            flight.decode,
            Decode(
                flight.rid, flight.prompt, flight.sampling, message.kv_ready, message.first_token, flight.deadline_s
            ),
        ):
            self._fail(
                flight,
                ApiError(
                    503,
                    f"decode worker {flight.decode!r} is unreachable",
                    code="worker_unreachable",
                    kind="service_unavailable",
                ),
                "failure",
            )
        self._dispatch_prefills()

    def _on_error(self, sender: str, message: Error) -> None:
        self.registry.touch(sender)
        worker = self.registry.workers.get(sender)
        if worker is not None:
            worker.in_flight_prefills.discard(message.rid)
            worker.clear_pending(message.rid)
        flight = self.flights.get(message.rid)
        if flight is None or sender not in (flight.decode, flight.prefill):
            return
        flight.sent_to.discard(sender)
        status = {"bad_request": 400, "overloaded": 503, "draining": 503, "deadline": 504}.get(message.code, 500)
        leg = "prefill" if sender == flight.prefill and flight.phase == "prefilling" else "decode"
        self._fail(
            flight,
            ApiError(
                status,
                f"{leg} worker {sender!r}: {message.code}: {message.message}",
                code=message.code,
                kind="server_error" if status >= 500 else "invalid_request_error",
            ),
            "failure",
        )
        self._dispatch_prefills()
