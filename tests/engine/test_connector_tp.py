"""Disaggregated == aggregated across processes: prefill ranks (TP p, one gloo group) and decode ranks (TP d, another)
in their own processes, KV over UCX, for (p, d) in {1, 2}^2; prefix hits on both sides; no block leaks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import CacheConfig, DecodeEngine, KVReady, Model, ModelConfig, RankInfo
from kvxfer.engine.messages import request_to_wire

from .connector_cluster import PROMPTS, Side, prefix_hit, requests

pytestmark = [pytest.mark.ucx, pytest.mark.timeout(240)]

# (p, d) -> prefill cache, decode cache, how many messages the decode side receives before waiting
COMBOS = {
    (1, 1): (dict(block_size=16, layout="HND"), dict(block_size=16, layout="HND"), 1),
    (1, 2): (dict(block_size=16, layout="HND"), dict(block_size=8, layout="NHD"), 1),
    (2, 1): (dict(block_size=8, layout="NHD"), dict(block_size=16, layout="HND"), 3),
    (2, 2): (dict(block_size=16, layout="NHD"), dict(block_size=16, layout="NHD"), 2),
}


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """Greedy tokens of one aggregated engine (TP 1, in this process)."""
    engine = DecodeEngine(Model.random(ModelConfig.preset("tiny"), seed=1), CacheConfig(num_blocks=128))
    return {o.request_id: list(o.output_token_ids) for o in engine.generate(requests())}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp: Path = tmp_path_factory.mktemp("connector-tp")
    prefill = Side("prefill", 2, tmp)
    decode = Side("decode", 2, tmp)
    try:
        yield prefill, decode
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("p_tp, d_tp", list(COMBOS))
def test_disaggregated_equals_aggregated(cluster: Any, reference: dict, p_tp: int, d_tp: int) -> None:
    prefill, decode = cluster
    p_cache, d_cache, batch = COMBOS[(p_tp, d_tp)]
    options = {
        "name": f"{p_tp}x{d_tp}",
        "backend": "ucx",
        "prefill_tp": p_tp,
        "decode_tp": d_tp,
        "prefill_cache": dict(num_blocks=48, **p_cache),
        "decode_cache": dict(num_blocks=96, **d_cache),
    }
    p_infos = prefill.call("setup", options)[:p_tp]
    d_infos = decode.call("setup", options)[:d_tp]
    try:
        prefill.call("connect", d_infos)
        decode.call("connect", p_infos)
        per_rank = prefill.call("prefill", [request_to_wire(r) for r in requests()])[:p_tp]
        readies = [[KVReady.decode(data) for data in rank] for rank in per_rank]
        for rank in readies[1:]:  # every prefill rank holds the same blocks and sampled the same token
            assert [(r.block_ids, r.first_token) for r in rank] == [(r.block_ids, r.first_token) for r in readies[0]]
        expected_hits = [prefix_hit(i, p_cache["block_size"]) for i in range(len(PROMPTS))]
        assert expected_hits[1] > 0
        assert [r.num_cached_tokens for r in readies[0]] == expected_hits
        reports = decode.call("serve", per_rank[0], batch)[:d_tp]
        drains = prefill.call("drain", 30.0)[:p_tp]
    finally:
        prefill.call("teardown")
        decode.call("teardown")
    for report in reports:
        assert report["tokens"] == reference
        assert all(admitted for _, admitted, *_ in report["admissions"]), report["admissions"]
        assert report["free"] == report["total"] and not report["pending"]  # no decode block leaked
        assert report["strategy"] == ("direct" if p_cache == d_cache else "staged")
    cached = [a[3] for a in reports[0]["admissions"]]
    if batch == 1:  # each request was admitted before the next arrived: the decode prefix cache served SYSTEM
        assert cached == [prefix_hit(i, d_cache["block_size"]) for i in range(len(PROMPTS))]
    moved = sum(a[5] for a in reports[0]["admissions"])
    assert moved == sum(len(p) for p in PROMPTS) - sum(a[4] for a in reports[0]["admissions"])
    total_prompt = sum(len(p) for p in PROMPTS)
    for drain in drains:
        assert drain["drained"] and drain["free"] == drain["total"] and not drain["held"]  # no prefill leak
        assert drain["expired"] == 0 and drain["released"] >= len(PROMPTS)
        assert drain["computed"] == total_prompt - sum(expected_hits)  # prefix hits were not recomputed


@pytest.mark.parametrize("p_tp, d_tp", [(2, 1), (1, 2)])
def test_streamed_push_equals_aggregated(cluster: Any, reference: dict, p_tp: int, d_tp: int) -> None:
    prefill, decode = cluster
    options = {
        "name": f"push{p_tp}x{d_tp}",
        "backend": "ucx",
        "prefill_tp": p_tp,
        "decode_tp": d_tp,
        "prefill_cache": dict(num_blocks=48, block_size=16),
        "decode_cache": dict(num_blocks=96, block_size=8),
    }
    p_infos = prefill.call("setup", options)[:p_tp]
    d_infos = decode.call("setup", options)[:d_tp]
    try:
        prefill.call("connect", d_infos)
        decode.call("connect", p_infos)
        wanted = decode.call("reserve_push", [request_to_wire(r) for r in requests()])[:d_tp]
        assert all(rank == wanted[0] for rank in wanted)  # every decode rank reserved the same blocks
        results = prefill.call("prefill", [], wanted[0])[:p_tp]
        reports = decode.call("finish_push")[:d_tp]
        drains = prefill.call("drain", 30.0)[:p_tp]
    finally:
        prefill.call("teardown")
        decode.call("teardown")
    assert all(ok for rank in results for _, ok, _, _ in rank), results
    for report in reports:
        assert report["tokens"] == reference and report["free"] == report["total"] and not report["pending"]
    for drain in drains:
        assert drain["drained"] and drain["free"] == drain["total"] and drain["released"] == 0


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine (several processes, torch)
def test_push_fills_every_replica_when_decode_tp_exceeds_kv_heads(tmp_path: Path, reference: dict) -> None:
    """Prefill TP 1 -> decode TP 4 of a model with 2 KV heads: decode ranks (0, 1) both hold head 0 and (2, 3)
    head 1, and each rank attends with its own copy, so the tokens match only if the push filled every replica
    (and each replica's rank got the prefill's note)."""
    prefill, decode = Side("prefill", 1, tmp_path), Side("decode", 4, tmp_path)
    options = {
        "name": "push1x4",
        "backend": "ucx",
        "prefill_tp": 1,
        "decode_tp": 4,
        "prefill_cache": dict(num_blocks=48, block_size=16, layout="HND"),
        "decode_cache": dict(num_blocks=96, block_size=8, layout="NHD"),
    }
    try:
        p_infos = prefill.call("setup", options)
        d_infos = decode.call("setup", options)
        assert [RankInfo.decode(i).spec.head_range() for i in d_infos] == [(0, 1), (0, 1), (1, 2), (1, 2)]
        prefill.call("connect", d_infos)
        decode.call("connect", p_infos)
        wanted = decode.call("reserve_push", [request_to_wire(r) for r in requests()])
        assert all(rank == wanted[0] for rank in wanted)
        [results] = prefill.call("prefill", [], wanted[0])
        reports = decode.call("finish_push")
        [drain] = prefill.call("drain", 30.0)
        prefill.call("teardown")
        decode.call("teardown")
    finally:
        prefill.close()
        decode.close()
    assert [ok for _, ok, _, _ in results] == [True] * len(PROMPTS), results
    for report in reports:
        assert all(admitted for _, admitted, *_ in report["admissions"]), report["admissions"]
        assert report["tokens"] == reference and report["free"] == report["total"] and not report["pending"]
    assert drain["drained"] and drain["free"] == drain["total"] and drain["released"] == 0
