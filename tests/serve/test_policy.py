"""The policy's rules at and around every threshold, and route() composing them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.errors import ConfigError
from kvxfer.serve.policy import (
    DecodeChoice,
    LinkRate,
    PolicyConfig,
    RouteRequest,
    WorkerState,
    admit,
    cached_prompt_tokens,
    choose_decode,
    choose_prefill,
    decode_cost,
    predict_ttft,
    route,
    should_prefill_remotely,
    transfer_time,
)

CFG = PolicyConfig()


def worker(
    name: str,
    role: str = "decode",
    free: int = 1000,
    active: int = 0,
    queued: int = 0,
    rate: float = 1000.0,
    backlog: float = 0.0,
    alive: bool = True,
    block_size: int = 16,
) -> WorkerState:
    return WorkerState(name, role, block_size, free, active, queued, rate, backlog, alive)  # type: ignore[arg-type]


def request(tokens: int, priority: str = "normal", kv: int = 1000) -> RouteRequest:
    return RouteRequest("r", tokens, (), priority, kv)  # type: ignore[arg-type]


# --- conditional disaggregation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "cached", "expected"),
    [
        (256, 0, False),
        (257, 0, True),
        (300, 44, False),
        (300, 43, True),
        (0, 0, False),
    ],
)
def test_remote_only_beyond_max_local_prefill_length(prompt: int, cached: int, expected: bool) -> None:
    assert should_prefill_remotely(CFG, prompt, cached, 0, True) is expected


@pytest.mark.parametrize(("queue_size", "expected"), [(62, True), (63, True), (64, False), (65, False)])
def test_remote_only_while_queue_under_its_limit(queue_size: int, expected: bool) -> None:
    assert should_prefill_remotely(CFG, 1000, 0, queue_size, True) is expected


def test_remote_needs_a_live_prefill_worker() -> None:
    assert not should_prefill_remotely(CFG, 1000, 0, 0, False)
    assert not should_prefill_remotely(PolicyConfig(max_prefill_queue_size=0), 1000, 0, 0, True)


@pytest.mark.parametrize(
    ("prompt", "blocks", "expected"),
    [
        (100, 0, 0),
        (100, 3, 48),
        (100, 99, 96),
        (97, 99, 96),
        (96, 99, 80),
        (1, 5, 0),
        (0, 5, 0),
        (17, 1, 16),
    ],
)
def test_cached_tokens_whole_blocks_leaving_one_token(prompt: int, blocks: int, expected: int) -> None:
    assert cached_prompt_tokens(prompt, blocks, 16) == expected


# --- transfer and cost ----------------------------------------------------------------------------------------


def test_transfer_time_uses_measured_link_or_default() -> None:
    assert transfer_time(CFG, 0, 1000, None) == 0.0
    assert transfer_time(CFG, 100, 1000, LinkRate(1e6, 0.01)) == pytest.approx(0.01 + 0.1)
    cfg = PolicyConfig(default_link_bytes_per_s=2e5, default_link_latency_s=0.5)
    assert transfer_time(cfg, 100, 1000, None) == pytest.approx(0.5 + 0.5)
    assert transfer_time(cfg, 100, 1000, LinkRate(0.0, 0.0)) == pytest.approx(1.0)  # unmeasured -> default


def test_decode_cost_terms_and_weights() -> None:
    w = worker("d", free=75, active=25)
    assert decode_cost(CFG, w, 5, 10, 0.5) == pytest.approx(0.5 + 0.25 + 0.5)
    cfg = PolicyConfig(cache_weight=4.0, load_weight=0.0, transfer_weight=2.0, ttft_slo_s=2.0)
    assert decode_cost(cfg, w, 5, 10, 0.5) == pytest.approx(2.0 + 0.0 + 0.5)
    assert decode_cost(CFG, worker("e", free=0, active=0), 0, 0, 0.0) == 1.0  # no capacity counts as full load


# --- prefill choice -------------------------------------------------------------------------------------------


def test_prefill_choice_fewest_queued_tokens_skipping_dead_and_others() -> None:
    workers = [
        worker("p0", "prefill", queued=50),
        worker("p1", "prefill", queued=10),
        worker("p2", "prefill", queued=0, alive=False),
        worker("d0", queued=0),
    ]
    assert choose_prefill(workers).name == "p1"  # type: ignore[union-attr]
    tie = [worker("pb", "prefill", queued=5), worker("pa", "prefill", queued=5)]
    assert choose_prefill(tie).name == "pa"  # type: ignore[union-attr]
    assert choose_prefill([worker("p", "prefill", alive=False), worker("d")]) is None


# --- decode choice --------------------------------------------------------------------------------------------


def test_decode_choice_prefers_cached_prefix_then_load() -> None:
    workers = [worker("d0", active=0), worker("d1", active=100)]
    req = request(160)
    assert choose_decode(CFG, req, workers, {}, {}, None, 0).worker.name == "d0"  # type: ignore[union-attr]
    # d1 holds 9 of the 10 blocks (144 tokens cached): 0.1 + 100/1100 < 1.0 + 0
    choice = choose_decode(CFG, req, workers, {"d1": 9}, {}, None, 0)
    assert choice is not None and choice.worker.name == "d1" and choice.cached_tokens == 144


def test_decode_choice_skips_dead_full_and_prefill_workers() -> None:
    workers = [worker("a", alive=False), worker("b", free=6), worker("c", "prefill"), worker("d", free=7, active=90)]
    choice = choose_decode(CFG, request(100), workers, {}, {}, None, 0)
    assert choice is not None and choice.worker.name == "d"  # b has 6 free blocks, 100 tokens need 7
    assert choose_decode(CFG, request(100), workers[:3], {}, {}, None, 0) is None


def test_decode_choice_prices_the_link() -> None:
    prefill = worker("p", "prefill")
    workers = [worker("d0"), worker("d1")]
    slow, fast = LinkRate(1e6, 0.0), LinkRate(1e9, 0.0)
    links = {("p", "d0"): slow, ("p", "d1"): fast}
    choice = choose_decode(CFG, request(1000), workers, {}, links, prefill, 0)
    assert choice is not None and choice.worker.name == "d1" and choice.remote
    assert choice.transfer_s == pytest.approx(1000 * 1000 / 1e9)
    # the same links reversed flip the choice; without a prefill worker no transfer is priced and the name decides
    links = {("p", "d0"): fast, ("p", "d1"): slow}
    assert choose_decode(CFG, request(1000), workers, {}, links, prefill, 0).worker.name == "d0"  # type: ignore[union-attr]
    local = choose_decode(CFG, request(1000), workers, {}, links, None, 0)
    assert local is not None and local.worker.name == "d0" and not local.remote and local.transfer_s == 0.0


def test_decode_choice_tie_break_is_by_name_regardless_of_order() -> None:
    a, b, c = worker("d-a"), worker("d-b"), worker("d-c")
    for order in ([a, b, c], [c, b, a], [b, c, a]):
        assert choose_decode(CFG, request(50), order, {}, {}, None, 0).worker.name == "d-a"  # type: ignore[union-attr]


def test_agg_worker_always_prefills_locally() -> None:
    choice = choose_decode(CFG, request(5000), [worker("g", "agg")], {}, {}, worker("p", "prefill"), 0)
    assert choice is not None and not choice.remote


# --- TTFT prediction and admission ----------------------------------------------------------------------------


def test_predict_ttft_local_and_remote() -> None:
    decode = worker("d", queued=500, rate=1000.0, backlog=0.25)
    local = predict_ttft(CFG, request(1000), DecodeChoice(decode, 200, False, 0.0, 0.0), None)
    assert (local.queue_s, local.prefill_s, local.transfer_s, local.decode_backlog_s) == (0.5, 0.8, 0.0, 0.25)
    assert local.total_s == pytest.approx(1.55)
    prefill = worker("p", "prefill", queued=2000, rate=4000.0)
    remote = predict_ttft(
        CFG,
        request(1000),
        DecodeChoice(decode, 0, True, 0.1, 0.0),
        prefill,
        prefill_cached_tokens=200,
        queued_tokens=8000,
        pool_rate=8000.0,
    )
    assert remote.queue_s == pytest.approx(0.5 + 1.0)
    assert remote.prefill_s == pytest.approx(0.2)
    assert remote.total_s == pytest.approx(1.5 + 0.2 + 0.1 + 0.25)
    unmeasured = predict_ttft(CFG, request(1000), DecodeChoice(worker("u", rate=0.0), 0, False, 0.0, 0.0), None)
    assert unmeasured.prefill_s == pytest.approx(1000 / CFG.default_prefill_tokens_per_s)


@pytest.mark.parametrize(
    ("priority", "ttft", "admitted"),
    [
        ("low", 0.999, True),
        ("low", 1.0, True),
        ("low", 1.001, False),
        ("normal", 1.5, True),
        ("normal", 3.0, True),
        ("normal", 3.001, False),
        ("high", 1e6, True),
    ],
)
def test_admission_by_priority_around_the_slo(priority: str, ttft: float, admitted: bool) -> None:
    result = admit(CFG, priority, ttft)  # type: ignore[arg-type]
    assert result.admitted is admitted
    assert (result.retry_after_s is None) is admitted
    assert priority in result.reason and ("rejected" in result.reason) is (not admitted)


def test_retry_after_is_the_excess_clamped() -> None:
    assert admit(CFG, "low", 11.0).retry_after_s == pytest.approx(10.0)
    assert admit(CFG, "low", 1.2).retry_after_s == CFG.retry_after_min_s
    assert admit(CFG, "low", 1e4).retry_after_s == CFG.retry_after_max_s
    assert admit(CFG, "normal", 10.0).retry_after_s == pytest.approx(7.0)


def test_early_rejection_can_be_turned_off() -> None:
    assert admit(PolicyConfig(enable_early_rejection=False), "low", 1e6).admitted


# --- route ----------------------------------------------------------------------------------------------------


def cluster() -> list[WorkerState]:
    return [
        worker("p0", "prefill", queued=100, rate=10000.0),
        worker("p1", "prefill", queued=0, rate=10000.0),
        worker("d0", rate=2000.0),
        worker("d1", active=500, rate=2000.0),
    ]


def test_route_short_prompt_local() -> None:
    decision = route(CFG, request(200), cluster(), {}, {}, queue_size=0)
    assert decision.admitted and decision.decode == "d0" and decision.prefill is None
    assert not decision.disaggregated and decision.expected_transfer_s == 0.0
    assert "local prefill: 200 uncached tokens <= max_local_prefill_length 256" in decision.reason


def test_route_long_prompt_remote_with_transfer() -> None:
    links = {("p1", "d0"): LinkRate(1e8, 0.001)}
    decision = route(CFG, request(2000), cluster(), {}, links, queue_size=3)
    assert decision.admitted and decision.disaggregated
    assert (decision.decode, decision.prefill) == ("d0", "p1")
    assert decision.expected_transfer_s == pytest.approx(0.001 + 2000 * 1000 / 1e8)
    assert decision.estimate is not None and decision.estimate.transfer_s == decision.expected_transfer_s
    assert "remote prefill on p1" in decision.reason


def test_route_cached_prefix_keeps_prefill_local() -> None:
    # 2000 tokens, 1760 cached on d1: 240 uncached <= 256 -> d1 prefills locally despite its load
    decision = route(CFG, request(2000), cluster(), {"d1": 110}, {}, queue_size=0)
    assert (decision.decode, decision.prefill, decision.cached_tokens) == ("d1", None, 1760)


def test_route_full_queue_or_no_prefill_worker_is_local() -> None:
    full = route(CFG, request(2000), cluster(), {}, {}, queue_size=64)
    assert full.prefill is None and "prefill queue full (64 >= max_prefill_queue_size 64)" in full.reason
    decode_only = [w for w in cluster() if w.role != "prefill"]
    alone = route(CFG, request(2000), decode_only, {}, {}, queue_size=0)
    assert alone.prefill is None and "no live prefill worker" in alone.reason


def test_route_overload_rejects_low_early_and_admits_high() -> None:
    busy = [worker("d0", queued=100_000, rate=1000.0)]
    low = route(CFG, request(100, "low"), busy, {}, {}, queue_size=0)
    assert not low.admitted and low.rejection == "overload" and low.retry_after_s is not None
    assert low.predicted_ttft_s == pytest.approx(100.1)
    assert "low priority rejected early" in low.reason
    high = route(CFG, request(100, "high"), busy, {}, {}, queue_size=0)
    assert high.admitted and high.decode == "d0" and high.rejection is None


def test_route_no_worker() -> None:
    decision = route(CFG, request(100, "high"), [worker("d0", alive=False), worker("p", "prefill")], {}, {}, 0)
    assert not decision.admitted and decision.rejection == "no_worker" and decision.decode is None


def test_bad_requests_and_workers() -> None:
    with pytest.raises(ConfigError, match="priority"):
        request(10, "urgent")
    with pytest.raises(ConfigError, match="num_prompt_tokens"):
        RouteRequest("r", -1, ())
    with pytest.raises(ConfigError, match="role"):
        worker("x", "router")


worker_states = st.builds(
    WorkerState,
    name=st.sampled_from(["a", "b", "c", "d", "e", "f"]),
    role=st.sampled_from(["prefill", "decode", "agg"]),
    block_size=st.sampled_from([1, 16]),
    free_blocks=st.integers(0, 300),
    active_blocks=st.integers(0, 300),
    queued_prefill_tokens=st.integers(0, 10**6),
    prefill_tokens_per_s=st.floats(0, 1e6),
    decode_backlog_s=st.floats(0, 100),
    alive=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    workers=st.lists(worker_states, max_size=8),
    tokens=st.integers(0, 4000),
    priority=st.sampled_from(["high", "normal", "low"]),
    queue_size=st.integers(0, 100),
    cached=st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e", "f"]), st.integers(0, 300)),
)
def test_route_never_picks_a_dead_or_full_worker(
    workers: list[WorkerState], tokens: int, priority: str, queue_size: int, cached: dict[str, int]
) -> None:
    decision = route(CFG, request(tokens, priority), workers, cached, {}, queue_size)
    if decision.decode is None:
        assert not decision.admitted and decision.rejection == "no_worker"
        return
    chosen = [w for w in workers if w.name == decision.decode and w.role != "prefill" and w.alive]
    assert chosen, decision
    assert any(
        -(-(tokens - decision.cached_tokens) // w.block_size) <= w.free_blocks
        and decision.cached_tokens == cached_prompt_tokens(tokens, cached.get(w.name, 0), w.block_size)
        for w in chosen
    )
    if decision.prefill is not None:
        assert any(w.name == decision.prefill and w.role == "prefill" and w.alive for w in workers)
        assert decision.disaggregated and tokens - decision.cached_tokens > CFG.max_local_prefill_length
    if priority == "high":
        assert decision.admitted
