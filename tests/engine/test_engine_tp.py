"""Tensor parallelism on CPU: two gloo ranks produce the TP=1 tokens, and each rank's cache holds its head slice."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import (
    CacheConfig,
    DecodeEngine,
    Model,
    ModelConfig,
    PrefillEngine,
    Request,
    SamplingParams,
    init_tensor_parallel,
)

pytestmark = pytest.mark.timeout(180)

CONFIGS = {
    "split": ModelConfig.preset("tiny"),  # 2 KV heads over 2 ranks: one each
    "replicated": ModelConfig.preset("tiny", num_kv_heads=1),  # 1 KV head: both ranks hold it
}
PROMPTS = [list(range(3, 40)), [*list(range(100, 132)), 5, 6], list(range(100, 132)) + [7] * 11, [9, 8, 7]]
PREFILL_PROMPT = list(range(50, 95))


def _run(config: ModelConfig, tp: Any = None) -> dict[str, Any]:
    """Everything compared between TP sizes: greedy tokens, and the prefill cache of one prompt (local heads)."""
    model = Model.random(config, seed=1, tp=tp)
    decode = DecodeEngine(model, CacheConfig(num_blocks=64, block_size=4))
    outputs = decode.generate([Request(f"r{i}", p, SamplingParams(max_tokens=10)) for i, p in enumerate(PROMPTS)])
    prefill = PrefillEngine(model, CacheConfig(num_blocks=16, block_size=8, layout="NHD"), chunk_size=16)
    result = prefill.prefill(Request("p", PREFILL_PROMPT))
    kv = [
        torch.stack(prefill.cache.read(layer, list(result.block_ids), len(PREFILL_PROMPT))).numpy()
        for layer in range(config.num_layers)
    ]  # each [2, tokens, local kv heads, head_dim]
    prefill.release("p")
    spec = prefill.spec
    return {
        "tokens": [list(o.output_token_ids) for o in outputs],
        "first_token": result.first_token,
        "block_ids": result.block_ids,
        "kv": kv,
        "heads": spec.head_range(),
        "num_kv_heads": spec.num_kv_heads,
        "tp": (spec.tp_rank, spec.tp_size, spec.total_kv_heads),
        "free": (decode.num_free_blocks, prefill.num_free_blocks),
    }


def _worker(rank: int, size: int, init_file: str, results: Any) -> None:
    torch.set_num_threads(1)
    tp = init_tensor_parallel(rank, size, f"file://{init_file}", backend="gloo", timeout_s=60)
    try:
        results.put((rank, {name: _run(config, tp) for name, config in CONFIGS.items()}))
    except BaseException as error:
        results.put((rank, repr(error)))
        raise
    finally:
        torch.distributed.destroy_process_group()


def _spawn(size: int, tmp_path: Path) -> dict[int, dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_worker, args=(rank, size, str(tmp_path / "store"), results)) for rank in range(size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    try:
        for _ in range(size):
            rank, value = results.get(timeout=150)
            assert not isinstance(value, str), f"rank {rank} failed: {value}"
            collected[rank] = value
    except queue_module.Empty:
        pytest.fail(f"TP workers returned {len(collected)} of {size} results in time")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    return collected


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine (several processes, torch)
def test_tp2_gloo_matches_tp1(tmp_path: Path) -> None:
    ranks = _spawn(2, tmp_path)
    for name, config in CONFIGS.items():
        reference = _run(config)
        for rank in (0, 1):
            got = ranks[rank][name]
            assert got["tokens"] == reference["tokens"], (name, rank)
            assert got["first_token"] == reference["first_token"]
            assert got["block_ids"] == reference["block_ids"]
            assert got["free"] == reference["free"]
            assert got["tp"] == (rank, 2, config.num_kv_heads)
            h0, h1 = got["heads"]
            assert got["num_kv_heads"] == h1 - h0 == 1
            assert (h0, h1) == ((rank, rank + 1) if name == "split" else (0, 1))
            for layer, (mine, full) in enumerate(zip(got["kv"], reference["kv"], strict=True)):
                np.testing.assert_allclose(
                    mine, full[:, :, h0:h1], rtol=1e-5, atol=1e-5, err_msg=f"{name} rank {rank} layer {layer}"
                )
