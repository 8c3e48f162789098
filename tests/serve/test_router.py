"""Routing of `kvxfer router` over null worker processes: disaggregation decisions, KV-aware decode choice,
queue backpressure, overload, a prefill worker killed under load, client disconnects."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Server, launch, write_policy

pytestmark = pytest.mark.timeout(240)


def complete(server: Server, prompt: str, max_tokens: int = 2, **extra: object) -> httpx.Response:
    return server.post(
        "/v1/completions",
        {"model": "tiny-random", "prompt": prompt, "max_tokens": max_tokens, "kvxfer": {"timing": True}, **extra},
    )


def test_short_prompt_prefills_locally_long_prompt_remotely(null_cluster: Server) -> None:
    local_before = null_cluster.metric("kvxfer_disaggregation_decisions_total", prefill="local", reason="short_prompt")
    remote_before = null_cluster.metric("kvxfer_disaggregation_decisions_total", prefill="remote", reason="long_prompt")
    short = complete(null_cluster, "short prompt").json()["kvxfer"]
    prompt = "a long prompt that is well over thirty-two tokens, byte by byte " * 2
    long = complete(null_cluster, prompt).json()
    assert short["disaggregated"] is False and short["prefill_worker"] == short["decode_worker"]
    timing = long["kvxfer"]
    assert timing["disaggregated"] is True and timing["prefill_worker"] == "prefill-0"
    assert timing["kv_bytes"] > 0  # the null decode worker reports 64 bytes per prompt token
    # the null prefill worker answers the prompt's last token, the decode worker echoes on from the prompt's second
    assert long["choices"][0]["text"] == prompt[-1] + prompt[1]
    assert (
        null_cluster.metric("kvxfer_disaggregation_decisions_total", prefill="local", reason="short_prompt")
        == local_before + 1
    )
    assert (
        null_cluster.metric("kvxfer_disaggregation_decisions_total", prefill="remote", reason="long_prompt")
        == remote_before + 1
    )
    assert null_cluster.metric("kvxfer_kv_transfer_bytes_total") > 0


def test_a_repeated_prefix_goes_back_to_the_same_decode_worker(null_cluster: Server) -> None:
    chosen = {}
    for index in range(6):
        prefix = f"shared prefix number {index} " * 3
        chosen[prefix] = complete(null_cluster, prefix + "first").json()["kvxfer"]["decode_worker"]
    for prefix, worker in chosen.items():
        again = complete(null_cluster, prefix + "second question").json()["kvxfer"]
        assert again["decode_worker"] == worker
        assert again["predicted_cached_tokens"] >= 48


def test_a_client_disconnect_aborts_the_request_and_frees_its_blocks(server_dir: Path) -> None:
    server = launch(["router", "--model", "tiny-random", "--port", "0"], server_dir / "disconnect.log")
    try:
        server.start_null_worker("decode-slow", "decode", token_delay=0.05)
        server.wait_workers({"decode-slow"})
        free = server.worker("decode-slow")["free_blocks"]
        body = {"model": "tiny-random", "prompt": "x" * 100, "max_tokens": 1500, "stream": True}
        with (
            httpx.Client(base_url=server.url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as reply,
        ):
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            time.sleep(0.6)  # the worker's next load report shows the blocks held
            assert server.worker("decode-slow")["free_blocks"] < free
        deadline = time.monotonic() + 10
        while server.worker("decode-slow")["free_blocks"] != free and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.worker("decode-slow")["free_blocks"] == free
        assert server.metric("kvxfer_aborts_total", cause="disconnect") == 1
        assert server.http.get("/kvxfer/workers").json()["in_flight"] == 0
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def slow_cluster(server_dir: Path) -> Iterator[Server]:
    """A router over a slow prefill worker (0.4 s a prefill, one at a time, one in flight) and a slow decode worker
    (0.25 s a local prefill, one at a time); a prefill queue of 4; a TTFT SLO of 1 s."""
    policy = write_policy(
        server_dir / "slow.json",
        max_local_prefill_length=16,
        max_prefill_queue_size=4,
        ttft_slo_s=1.0,
        default_prefill_tokens_per_s=400.0,
        retry_after_min_s=2.0,
    )
    server = launch(
        ["router", "--model", "tiny-random", "--port", "0", "--policy", str(policy)], server_dir / "slow.log"
    )
    try:
        server.start_null_worker("prefill-0", "prefill", prefill_delay=0.4, max_batch=1)
        server.start_null_worker("decode-0", "decode", prefill_delay=0.25)
        server.wait_workers({"prefill-0", "decode-0"})
        yield server
    finally:
        server.stop()


def test_a_full_prefill_queue_answers_503_with_retry_after(slow_cluster: Server) -> None:
    prompt = "p" * 40
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        replies = list(
            pool.map(
                lambda i: complete(slow_cluster, prompt + str(i), priority="high", kvxfer={"prefill": "remote"}),
                range(12),
            )
        )
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 5 and statuses.count(503) >= 1, statuses
    refused = next(r for r in replies if r.status_code == 503)
    assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 2
    assert slow_cluster.metric("kvxfer_rejections_total", reason="queue_full") >= 1


@pytest.mark.slow
def test_overload_rejects_low_priority_early_and_serves_high_priority(slow_cluster: Server) -> None:
    prompt = "q" * 200  # 0.5 s of predicted prefill at 400 tokens/s: a queue of two breaks the 1 s SLO

    def send(index: int) -> httpx.Response:
        return complete(slow_cluster, str(index) + prompt, priority="high" if index % 2 else "low")

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(send, range(20)))
    low = [r.status_code for i, r in enumerate(replies) if i % 2 == 0]
    high = [r.status_code for i, r in enumerate(replies) if i % 2]
    assert low.count(429) >= 5, low
    assert all(status == 200 for status in high), high
    rejected = next(r for i, r in enumerate(replies) if i % 2 == 0 and r.status_code == 429)
    assert rejected.json()["error"]["code"] == "rate_limit_exceeded" and int(rejected.headers["retry-after"]) >= 1
    assert slow_cluster.metric("kvxfer_rejections_total", reason="overload") >= 5


@pytest.mark.slow
def test_sigkill_of_a_prefill_worker_under_load_requeues_and_nothing_hangs(server_dir: Path) -> None:
    policy = write_policy(server_dir / "kill.json", max_local_prefill_length=16, ttft_slo_s=60.0)
    server = launch(
        ["router", "--model", "tiny-random", "--port", "0", "--policy", str(policy)], server_dir / "kill.log"
    )
    try:
        victim = server.start_null_worker("prefill-0", "prefill", prefill_delay=0.3, max_batch=2)
        server.start_null_worker("prefill-1", "prefill", prefill_delay=0.3, max_batch=2)
        server.start_null_worker("decode-0", "decode")
        server.wait_workers({"prefill-0", "prefill-1", "decode-0"})
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [
                pool.submit(complete, server, "r" * 64 + str(i), 4, kvxfer={"prefill": "remote"}) for i in range(16)
            ]
            time.sleep(0.5)
            victim.send_signal(signal.SIGKILL)
            replies = [f.result(timeout=60) for f in futures]
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 8
        for reply in replies:
            if reply.status_code == 503:
                assert reply.json()["error"]["code"] in ("prefill_worker_lost", "worker_lost")
        assert server.metric("kvxfer_prefill_requeues_total") >= 1
        assert server.metric("kvxfer_worker_losses_total", role="prefill") == 1
        assert {w["name"] for w in server.workers_info()} == {"prefill-1", "decode-0"}
        assert server.http.get("/kvxfer/workers").json()["in_flight"] == 0
    finally:
        server.stop()


def test_sigterm_drains_and_exits_zero(server_dir: Path) -> None:
    server = launch(
        ["router", "--model", "tiny-random", "--port", "0", "--drain-timeout", "10"], server_dir / "drain.log"
    )
    try:
        server.start_null_worker("decode-0", "decode", token_delay=0.02)
        server.wait_workers({"decode-0"})
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(complete, server, "drain me", 40)
            time.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            reply = future.result(timeout=30)
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"
        assert reply.json()["usage"]["completion_tokens"] == 40
        assert server.process.wait(30) == 0
        assert server.workers["decode-0"].wait(10) == 0  # told to shut down
    finally:
        server.stop()


@pytest.mark.slow
def test_requests_queued_for_a_lost_prefill_pool_fall_back_to_local_prefill(server_dir: Path) -> None:
    policy = write_policy(server_dir / "fallback.json", max_local_prefill_length=16, ttft_slo_s=60.0)
    server = launch(
        ["router", "--model", "tiny-random", "--port", "0", "--policy", str(policy)], server_dir / "fallback.log"
    )
    try:
        victim = server.start_null_worker("prefill-0", "prefill", prefill_delay=0.5, max_batch=1)
        server.start_null_worker("decode-0", "decode")
        server.wait_workers({"prefill-0", "decode-0"})
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(complete, server, str(i) + "f" * 64, 3) for i in range(6)]
            time.sleep(0.3)
            victim.send_signal(signal.SIGKILL)
            replies = [f.result(timeout=60) for f in futures]
        assert [r.status_code for r in replies] == [200] * 6
        assert sum(not r.json()["kvxfer"]["disaggregated"] for r in replies) >= 4  # prefilled by decode-0
        assert server.metric("kvxfer_disaggregation_decisions_total", prefill="local", reason="no_prefill_worker") >= 4
    finally:
        server.stop()
