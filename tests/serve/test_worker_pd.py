"""A prefill worker and a decode worker (real processes, KV through UCX) driven by a fake router: disaggregated
output equals aggregated output (greedy), with and without prefix-cache hits; abort frees blocks on both sides;
SIGKILL of the prefill worker before the pull fails the decode leg within its deadline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from kvxfer.serve import protocol as p
from tests.serve.test_worker import PROMPTS, FakeRouter, reference

pytestmark = [pytest.mark.ucx]


@pytest.fixture
def pair(tmp_path: Path) -> Any:
    fake = FakeRouter(tmp_path)
    (tmp_path / "token").write_text("s3cret\n")  # the side channel's secret (the KV path does not change)
    fake.spawn("prefill", "p0", "--lease-ttl", "3", "--token-file", str(tmp_path / "token"))
    fake.spawn("decode", "d0", "--transfer-timeout", "10")
    registers = {name: fake.register(name) for name in ("p0", "d0")}
    peers = p.Peers(tuple(p.PeerInfo(r.name, r.role, r.rank_info) for r in registers.values()))
    fake.send("p0", peers)
    fake.send("d0", peers)
    yield fake
    fake.close()


def disaggregated(
    router: FakeRouter, rid: str, prompt: list[int], max_tokens: int = 8, deadline_s: float = 60.0
) -> tuple[list[int], str, dict, p.Prefilled]:
    sampling = p.Sampling(max_tokens=max_tokens, ignore_eos=True)
    deadline = time.time() + deadline_s
    router.send("p0", p.Prefill(rid, tuple(prompt), sampling, "d0", deadline))
    prefilled = router.wait_for("p0", lambda m: isinstance(m, (p.Prefilled, p.Error)) and m.rid == rid)
    assert isinstance(prefilled, p.Prefilled), prefilled
    router.send("d0", p.Decode(rid, tuple(prompt), sampling, prefilled.kv_ready, prefilled.first_token, deadline))
    tokens, finish, timing, _ = router.stream("d0", rid)
    return tokens, finish, timing, prefilled


def test_disaggregated_equals_aggregated(pair: FakeRouter) -> None:
    initial = {name: pair.load(name).free_blocks for name in ("p0", "d0")}
    expected = reference(PROMPTS)
    for rid, prompt in PROMPTS.items():  # r2 shares r0's first 30 tokens: prefix hits on both sides
        tokens, finish, timing, prefilled = disaggregated(pair, rid, prompt)
        assert (tokens, finish) == (expected[rid], "length")
        assert tokens[0] == prefilled.first_token
        assert timing["transfer_s"] > 0 and timing["kv_bytes"] > 0 and "queue_s" in timing
        assert set(prefilled.timing or {}) >= {"queue_s", "prefill_s"}
        if rid == "r2":
            assert timing["cached_tokens"] == 16  # the decode side's prefix cache held r0's first block
            assert (prefilled.timing or {})["cached_tokens"] == 16
    again, _, timing, _ = disaggregated(pair, "r0b", PROMPTS["r0"])  # the whole prompt cached (but one block)
    assert again == expected["r0"] and timing["cached_tokens"] == 32
    # blocks come back on both sides once the pulls ended (decode: the sequences finished)
    mark = {name: pair.count(name) for name in ("p0", "d0")}
    for name in ("p0", "d0"):
        load = pair.load(name, lambda m, name=name: m.free_blocks == initial[name], start=mark[name])
        assert load.active_blocks == 0
    links = pair.load("d0", lambda m: bool(m.links)).links
    assert set(links) == {"p0"} and links["p0"][0] > 0  # the pipe's measured rate on the p0 -> d0 link


def test_abort_mid_decode_frees_blocks_on_both_sides(pair: FakeRouter) -> None:
    initial = {name: pair.load(name).free_blocks for name in ("p0", "d0")}
    sampling = p.Sampling(max_tokens=5000, ignore_eos=True)
    deadline = time.time() + 60
    prompt = tuple(range(1, 60))
    pair.send("p0", p.Prefill("a", prompt, sampling, "d0", deadline))
    ready = pair.wait_for("p0", lambda m: isinstance(m, p.Prefilled))
    assert isinstance(ready, p.Prefilled)
    pair.send("d0", p.Decode("a", prompt, sampling, ready.kv_ready, ready.first_token, deadline))
    pair.wait_for("d0", lambda m: isinstance(m, p.Tokens) and m.rid == "a")
    assert pair.load("d0", lambda m: m.running == 1).free_blocks < initial["d0"]
    for name in ("p0", "d0"):
        pair.send(name, p.Abort("a"))
    assert pair.stream("d0", "a")[1] == "abort"
    # a prefilled request aborted before any pull: the prefill side ends its lease and frees the blocks
    pair.send("p0", p.Prefill("b", prompt[::-1], sampling, "d0", deadline))
    pair.wait_for("p0", lambda m: isinstance(m, p.Prefilled) and m.rid == "b")
    assert pair.load("p0", lambda m: m.running == 1).free_blocks < initial["p0"]
    pair.send("p0", p.Abort("b"))
    assert pair.stream("p0", "b")[1] == "abort"
    mark = {name: pair.count(name) for name in ("p0", "d0")}
    for name in ("p0", "d0"):
        load = pair.load(name, lambda m, name=name: m.free_blocks == initial[name] and m.running == 0, start=mark[name])
        assert load.active_blocks == 0


def test_prefill_killed_before_the_pull_fails_the_decode_leg(pair: FakeRouter) -> None:
    sampling = p.Sampling(max_tokens=8, ignore_eos=True)
    prompt = tuple(range(1, 60))
    pair.send("p0", p.Prefill("k", prompt, sampling, "d0", time.time() + 60))
    ready = pair.wait_for("p0", lambda m: isinstance(m, p.Prefilled))
    assert isinstance(ready, p.Prefilled)
    initial = pair.load("d0").free_blocks
    pair.processes["p0"].kill()
    pair.processes["p0"].wait(10)
    began = time.monotonic()
    pair.send("d0", p.Decode("k", prompt, sampling, ready.kv_ready, ready.first_token, time.time() + 8))
    tokens, finish, _, _ = pair.stream("d0", "k", timeout=30)
    assert finish in ("error:transfer", "error:deadline") and tokens == [], pair.log("d0")
    assert time.monotonic() - began < 20  # within its deadline (8 s) plus slack, never a hang
    mark = pair.count("d0")
    assert pair.load("d0", lambda m: m.free_blocks == initial, start=mark).running == 0
    # the decode worker keeps serving
    pair.send("d0", p.Generate("after", tuple(PROMPTS["r1"]), sampling, time.time() + 60))
    assert pair.stream("d0", "after")[0] == reference({"after": PROMPTS["r1"]})["after"]


def test_concurrent_requests_batch_on_both_sides(pair: FakeRouter) -> None:
    prompts = {f"c{i}": [3 + i] * (5 + 9 * i) for i in range(6)}
    sampling = p.Sampling(max_tokens=10, ignore_eos=True)
    deadline = time.time() + 60
    for rid, prompt in prompts.items():  # all queued at once: the prefill worker batches them
        pair.send("p0", p.Prefill(rid, tuple(prompt), sampling, "d0", deadline))
    for rid, prompt in prompts.items():
        ready = pair.wait_for("p0", lambda m, rid=rid: isinstance(m, p.Prefilled) and m.rid == rid)
        assert isinstance(ready, p.Prefilled)
        pair.send("d0", p.Decode(rid, tuple(prompt), sampling, ready.kv_ready, ready.first_token, deadline))
    expected = reference(prompts, max_tokens=10)
    assert {rid: pair.stream("d0", rid)[:2] for rid in prompts} == {rid: (expected[rid], "length") for rid in prompts}


@pytest.mark.gpu
def test_disaggregated_equals_aggregated_on_gpu(tmp_path: Path) -> None:
    """Both workers and an aggregated one on cuda:0 (CUDA IPC between the processes); run by the coordinator."""
    fake = FakeRouter(tmp_path)
    try:
        for role, name in (("prefill", "p0"), ("decode", "d0"), ("agg", "a0")):
            fake.spawn(role, name, "--device", "cuda:0")
        registers = {name: fake.register(name) for name in ("p0", "d0", "a0")}
        peers = p.Peers(tuple(p.PeerInfo(r.name, r.role, r.rank_info) for r in registers.values() if r.rank_info))
        fake.send("p0", peers)
        fake.send("d0", peers)
        for rid, prompt in PROMPTS.items():
            fake.send("a0", p.Generate(rid, tuple(prompt), p.Sampling(max_tokens=8, ignore_eos=True), time.time() + 60))
            agg = fake.stream("a0", rid)[:2]
            assert disaggregated(fake, rid, prompt)[:2] == agg and agg[1] == "length"
    finally:
        fake.close()
