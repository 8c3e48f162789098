"""Tensor-parallel workers (--tp 2: two gloo rank processes each) against a fake router: the aggregated stream and
the disaggregated one (TP 2 prefill -> TP 1 decode, and TP 1 prefill -> TP 2 decode) equal the TP 1 engine's greedy
tokens; abort frees blocks on every rank; shutdown stops every rank."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvxfer.serve import protocol as p
from tests.serve.test_worker import PROMPTS, FakeRouter, generate, reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_agg_tp2_equals_the_engine(tmp_path: Path) -> None:
    router = FakeRouter(tmp_path)
    try:
        process = router.spawn("agg", "a0", "--tp", "2")
        register = router.register("a0")
        assert (
            register.rank_info == () and register.kv_bytes_per_token == 3 * 2 * 2 * 16 * 4
        )  # layers K/V heads dim f32
        free = router.load("a0").free_blocks
        for rid, prompt in PROMPTS.items():
            router.send("a0", generate(rid, prompt))
        expected = reference(PROMPTS)
        for rid in PROMPTS:
            assert router.stream("a0", rid)[:2] == (expected[rid], "length")
        router.send("a0", generate("long", PROMPTS["r0"], max_tokens=2000))
        router.wait_for("a0", lambda m: isinstance(m, p.Tokens) and m.rid == "long")
        router.send("a0", p.Abort("long"))
        assert router.stream("a0", "long")[1] == "abort"
        mark = router.count("a0")
        assert router.load("a0", lambda m: m.running == 0 and m.waiting == 0, start=mark).free_blocks == free
        router.send("a0", p.Shutdown(5.0))
        assert process.wait(60) == 0
    finally:
        router.close()


@pytest.mark.ucx
@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_disaggregated_tp_equals_the_engine(tmp_path: Path, prefill_tp: int, decode_tp: int) -> None:
    router = FakeRouter(tmp_path)
    try:
        router.spawn("prefill", "p0", "--tp", str(prefill_tp))
        router.spawn("decode", "d0", "--tp", str(decode_tp))
        registers = {name: router.register(name) for name in ("p0", "d0")}
        assert (len(registers["p0"].rank_info), len(registers["d0"].rank_info)) == (prefill_tp, decode_tp)
        peers = p.Peers(tuple(p.PeerInfo(r.name, r.role, r.rank_info) for r in registers.values()))
        router.send("p0", peers)
        router.send("d0", peers)
        initial = {name: router.load(name).free_blocks for name in ("p0", "d0")}
        expected = reference(PROMPTS)
        sampling = p.Sampling(max_tokens=8, ignore_eos=True)
        for rid, prompt in PROMPTS.items():
            deadline = time.time() + 60
            router.send("p0", p.Prefill(rid, tuple(prompt), sampling, "d0", deadline))
            ready = router.wait_for("p0", lambda m, rid=rid: isinstance(m, (p.Prefilled, p.Error)) and m.rid == rid)
            assert isinstance(ready, p.Prefilled), ready
            router.send("d0", p.Decode(rid, tuple(prompt), sampling, ready.kv_ready, ready.first_token, deadline))
            assert router.stream("d0", rid)[:2] == (expected[rid], "length")
        mark = {name: router.count(name) for name in ("p0", "d0")}
        for name in ("p0", "d0"):
            router.load(name, lambda m, name=name: m.free_blocks == initial[name], start=mark[name])
        for name in ("p0", "d0"):
            router.send(name, p.Shutdown(5.0))
        assert [router.processes[name].wait(60) for name in ("p0", "d0")] == [0, 0]
    finally:
        router.close()


@pytest.mark.multi_gpu
def test_disaggregated_tp2_equals_aggregated_tp2_on_gpus(tmp_path: Path) -> None:
    """TP 2 prefill -> TP 2 decode and a TP 2 aggregated worker, all on cuda:0-1 (CUDA IPC between processes)."""
    router = FakeRouter(tmp_path)
    try:
        for role, name in (("prefill", "p0"), ("decode", "d0"), ("agg", "a0")):
            router.spawn(role, name, "--tp", "2", "--device", "cuda:0")
        registers = {name: router.register(name) for name in ("p0", "d0", "a0")}
        peers = p.Peers(tuple(p.PeerInfo(r.name, r.role, r.rank_info) for r in registers.values() if r.rank_info))
        router.send("p0", peers)
        router.send("d0", peers)
        sampling = p.Sampling(max_tokens=8, ignore_eos=True)
        for rid, prompt in PROMPTS.items():
            router.send("a0", p.Generate(rid, tuple(prompt), sampling, time.time() + 60))
            agg = router.stream("a0", rid)[:2]
            router.send("p0", p.Prefill(rid, tuple(prompt), sampling, "d0", time.time() + 60))
            ready = router.wait_for("p0", lambda m, rid=rid: isinstance(m, (p.Prefilled, p.Error)) and m.rid == rid)
            assert isinstance(ready, p.Prefilled), ready
            router.send(
                "d0", p.Decode(rid, tuple(prompt), sampling, ready.kv_ready, ready.first_token, time.time() + 60)
            )
            assert router.stream("d0", rid)[:2] == agg and agg[1] == "length"
    finally:
        router.close()
