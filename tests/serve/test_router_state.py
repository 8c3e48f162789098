"""The router's request state machine in one process, messages injected and sends recorded (no sockets): the
remote-prefill walk, requeue-once failover, late messages, aborts of both legs, deadlines."""

from __future__ import annotations

import time

import pytest

from kvxfer.serve.openai_schema import ApiError
from kvxfer.serve.protocol import (
    Abort,
    Decode,
    Error,
    Generate,
    Message,
    Prefill,
    Prefilled,
    Register,
    Sampling,
    Tokens,
)
from kvxfer.serve.router import Router
from kvxfer.serve.router_flight import TokensEvent

pytestmark = pytest.mark.timeout(30)


class RecordingLink:
    """Stands in for RouterLink: records (worker, message) instead of sending."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []

    def send(self, identity: bytes, message: Message) -> bool:
        self.sent.append((identity.decode(), message))
        return True

    def of(self, kind: type) -> list[tuple[str, Message]]:
        return [(name, m) for name, m in self.sent if isinstance(m, kind)]


def router_with(*workers: tuple[str, str]) -> tuple[Router, RecordingLink]:
    router = Router("tiny-random")
    link = RecordingLink()
    router.link = link  # type: ignore[assignment]
    for name, role in workers:
        router._handle(name, Register(name, role, "tiny-random", 16, 1024, 64, (b"rank",), 4, "cpu"))
    link.sent.clear()
    return router, link


PROMPT = list(range(100))


def test_remote_prefill_walk_prefill_then_decode_then_tokens() -> None:
    router, link = router_with(("prefill-0", "prefill"), ("decode-0", "decode"))
    flight = router.submit(PROMPT, Sampling(max_tokens=2), prefill_mode="remote")
    assert [(n, type(m)) for n, m in link.sent] == [("prefill-0", Prefill)]
    router._handle("prefill-0", Prefilled(flight.rid, b"ready", 7, {"prefill_s": 0.5, "queue_s": 0.1}))
    ((name, decode),) = link.of(Decode)
    assert name == "decode-0" and decode.first_token == 7 and decode.kv_ready == b"ready"
    router._handle("decode-0", Tokens(flight.rid, (7,), None, {"transfer_s": 0.2, "kv_bytes": 640.0}))
    router._handle("decode-0", Tokens(flight.rid, (8,), "length"))
    first, last = flight.events.get_nowait(), flight.events.get_nowait()
    assert isinstance(first, TokensEvent) and first.timing is not None
    assert first.timing["prefill_s"] == 0.5 and first.timing["kv_bytes"] == 640 and first.timing["disaggregated"]
    assert isinstance(last, TokensEvent) and last.finish == "length"
    assert not router.flights and not link.of(Abort)  # a normal end aborts nobody


def test_a_lost_prefill_worker_is_requeued_once_then_the_request_fails() -> None:
    router, link = router_with(("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode"))
    flight = router.submit(PROMPT, Sampling(max_tokens=2), prefill_mode="remote")
    first = link.of(Prefill)[0][0]
    router._worker_lost(router.registry.workers[first])
    second = link.of(Prefill)[1][0]
    assert second != first and router.metrics.requeues._value.get() == 1
    router._worker_lost(router.registry.workers[second])
    error = flight.events.get_nowait()
    assert isinstance(error, ApiError) and error.status == 503 and error.code == "prefill_worker_lost"
    assert not router.flights


def test_a_late_prefilled_of_a_requeued_request_is_aborted_not_decoded() -> None:
    router, link = router_with(("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode"))
    flight = router.submit(PROMPT, Sampling(max_tokens=2), prefill_mode="remote")
    first = link.of(Prefill)[0][0]
    router._on_register(first, router.registry.workers[first].info)  # restarted: its work is failed over
    assert (first, Abort(flight.rid)) in link.sent
    assert flight.rid in router.flights and flight.phase == "prefilling" and flight.requeued
    current = flight.prefill
    link.sent.clear()
    if current != first:
        router._handle(first, Prefilled(flight.rid, b"stale", 1))
        assert link.sent == [(first, Abort(flight.rid))]  # its lease released, no decode started
    router._handle(current or "", Prefilled(flight.rid, b"fresh", 2))
    assert [m.kv_ready for _, m in link.of(Decode)] == [b"fresh"]


def test_a_client_abort_reaches_both_legs_and_a_decode_error_fails_the_request() -> None:
    router, link = router_with(("prefill-0", "prefill"), ("decode-0", "decode"))
    flight = router.submit(PROMPT, Sampling(max_tokens=8), prefill_mode="remote")
    router._handle("prefill-0", Prefilled(flight.rid, b"ready", 7))
    router.abort(flight.rid, "disconnect")
    assert sorted(n for n, _ in link.of(Abort)) == ["decode-0", "prefill-0"]
    other = router.submit(PROMPT, Sampling(max_tokens=8), prefill_mode="remote")
    router._handle("prefill-0", Prefilled(other.rid, b"ready", 7))
    link.sent.clear()
    router._handle("decode-0", Error(other.rid, "transfer", "the pull failed"))
    error = other.events.get_nowait()
    assert isinstance(error, ApiError) and error.code == "transfer" and error.status == 500
    assert link.of(Abort) == [("prefill-0", Abort(other.rid))]  # the other leg lets its lease go


def test_a_request_past_its_deadline_fails_with_504_and_aborts_its_worker() -> None:
    router, link = router_with(("agg-0", "agg"))
    flight = router.submit(PROMPT, Sampling(max_tokens=8), timeout_s=0.01)
    assert link.of(Generate)[0][0] == "agg-0"
    time.sleep(0.02)
    router.sweep_once()
    error = flight.events.get_nowait()
    assert isinstance(error, ApiError) and error.status == 504
    assert link.of(Abort) == [("agg-0", Abort(flight.rid))]


def test_more_tokens_than_max_tokens_fail_the_request() -> None:
    router, _link = router_with(("agg-0", "agg"))
    flight = router.submit(PROMPT, Sampling(max_tokens=2))
    router._handle("agg-0", Tokens(flight.rid, (1, 2, 3), None))
    error = flight.events.get_nowait()
    assert isinstance(error, ApiError) and error.code == "worker_protocol"
