"""Disaggregated == aggregated on GPUs: prefill and decode ranks in their own processes, KV over CUDA IPC (float32).

``gpu``: one prefill and one decode process sharing GPU 0, pull and streamed push. ``multi_gpu``: TP pairs with
each side's ranks on GPUs 0 and 1 (NCCL per side), so transfers cross GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import CacheConfig, DecodeEngine, KVReady, Model, ModelConfig
from kvxfer.engine.messages import request_to_wire

from .connector_cluster import PROMPTS, Side, prefix_hit, requests

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gpu_reference() -> dict[str, list[int]]:
    """Greedy tokens of one aggregated engine on GPU 0 (TP 1, in this process)."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    model = Model.random(ModelConfig.preset("tiny"), seed=1, device="cuda:0")
    engine = DecodeEngine(model, CacheConfig(num_blocks=128))
    return {o.request_id: list(o.output_token_ids) for o in engine.generate(requests())}


def _run(prefill: Side, decode: Side, options: dict[str, Any], push: bool) -> tuple[list, list, list]:
    p_tp, d_tp = options["prefill_tp"], options["decode_tp"]
    p_infos = prefill.call("setup", options)[:p_tp]
    d_infos = decode.call("setup", options)[:d_tp]
    try:
        prefill.call("connect", d_infos)
        decode.call("connect", p_infos)
        wires = [request_to_wire(r) for r in requests()]
        if push:
            wanted = decode.call("reserve_push", wires)[0]
            results = prefill.call("prefill", [], wanted)[:p_tp]
            reports = decode.call("finish_push")[:d_tp]
        else:
            results = prefill.call("prefill", wires)[:p_tp]
            reports = decode.call("serve", results[0], 1)[:d_tp]
        drains = prefill.call("drain", 30.0)[:p_tp]
    finally:
        prefill.call("teardown")
        decode.call("teardown")
    return results, reports, drains


def _check(reference: dict, results: list, reports: list, drains: list, push: bool, p_block: int) -> None:
    for report in reports:
        assert report["tokens"] == reference
        assert all(admitted for _, admitted, *_ in report["admissions"]), report["admissions"]
        assert report["free"] == report["total"] and not report["pending"]
        assert report["strategy"] == "kernel"  # CUDA IPC maps the peer's cache: one launch per route
    if push:
        assert all(ok for rank in results for _, ok, _, _ in rank), results
    else:
        assert [KVReady.decode(r).num_cached_tokens for r in results[0]] == [
            prefix_hit(i, p_block) for i in range(len(PROMPTS))
        ]
    for drain in drains:
        assert drain["drained"] and drain["free"] == drain["total"] and drain["expired"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("push", [False, True], ids=["pull", "push"])
def test_one_gpu_two_processes(tmp_path: Path, gpu_reference: dict, push: bool) -> None:
    prefill, decode = Side("prefill", 1, tmp_path, devices=[0]), Side("decode", 1, tmp_path, devices=[0])
    options = {
        "name": "g1",
        "backend": "cuda_ipc",
        "prefill_tp": 1,
        "decode_tp": 1,
        "prefill_cache": dict(num_blocks=48, block_size=16, layout="HND"),
        "decode_cache": dict(num_blocks=96, block_size=8, layout="NHD"),
    }
    try:
        _check(gpu_reference, *_run(prefill, decode, options, push), push, 16)
    finally:
        prefill.close()
        decode.close()


@pytest.mark.multi_gpu
@pytest.mark.parametrize("p_tp, d_tp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_tp_pairs_across_gpus(tmp_path: Path, gpu_reference: dict, p_tp: int, d_tp: int) -> None:
    # Rank r of each side runs on GPU r; with TP 1 the prefill is on GPU 0 and the decode on GPU 1.
    prefill = Side("prefill", p_tp, tmp_path, devices=[0, 1])
    decode = Side("decode", d_tp, tmp_path, devices=[1, 0] if d_tp == 1 else [0, 1])
    options = {
        "name": f"m{p_tp}{d_tp}",
        "backend": "cuda_ipc",
        "prefill_tp": p_tp,
        "decode_tp": d_tp,
        "prefill_cache": dict(num_blocks=48, block_size=16, layout="HND"),
        "decode_cache": dict(num_blocks=96, block_size=16 if d_tp == 2 else 8, layout="NHD"),
    }
    try:
        _check(gpu_reference, *_run(prefill, decode, options, push=False), False, 16)
    finally:
        prefill.close()
        decode.close()
