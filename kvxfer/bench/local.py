"""`kvxfer-bench local`: the core's own costs on host memory, beside a plain numpy copy measured in the same run.

- plan: building the 40,960-descriptor plan of a 4k-token Llama-3.1-70B TP8 request (16-token blocks);
- post: `select` of one request out of a prepared whole-cache plan, then `read` (post only, not the copy), both
  back to back and after an idle wait;
- bandwidth: the local backend moving shuffled fragments of 4 KiB ... 64 MiB, beside `numpy.copyto` of the
  same number of bytes in one piece (the ceiling).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..agent import Agent
from ..descs import Descs
from ..plan import TransferPlan
from ..spec import KVCacheSpec

# Llama-3.1-70B at TP8: 80 layers, 1 KV head per rank, head_dim 128, bf16, 16-token blocks; 4k tokens = 256 blocks.
SEVENTY_B_TP8 = functools.partial(
    KVCacheSpec,
    num_layers=80,
    block_size=16,
    num_kv_heads=1,
    head_dim=128,
    dtype="bfloat16",
    tp_size=8,
    total_kv_heads=8,
)


def _median_seconds(action: Callable[[], Any], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.percentile(times, 99))


def _agents(nbytes: int) -> tuple[Agent, Agent, np.ndarray, np.ndarray, Any]:
    source_agent, destination_agent = Agent("bench-src", backends=["local"]), Agent("bench-dst", backends=["local"])
    source = np.frombuffer(np.random.default_rng(0).bytes(nbytes), dtype=np.uint8).copy()
    destination = np.ones(nbytes, dtype=np.uint8)  # touched, so page faults stay out of the copy timings
    source_agent.register(source, name="kv")
    destination_agent.register(destination, name="kv")
    peer = destination_agent.connect(source_agent.metadata())
    return source_agent, destination_agent, source, destination, peer


def plan_and_post(repeats: int = 50, cache_blocks: int = 1024, request_blocks: int = 256) -> list[dict[str, Any]]:
    """Median and p99 milliseconds of descriptor building, plan building, select and post."""
    spec = SEVENTY_B_TP8(num_blocks=cache_blocks)
    source_agent, destination_agent, _, _, peer = _agents(spec.nbytes)
    rng = np.random.default_rng(1)
    local_ids = rng.permutation(cache_blocks)[:request_blocks]
    remote_ids = rng.permutation(cache_blocks)[:request_blocks]
    local_region, remote_region = destination_agent.regions[0], peer.region("kv")
    rows = []
    with source_agent, destination_agent:

        def build() -> tuple[Descs, Descs]:
            return Descs.from_blocks(local_region, spec, local_ids), Descs.from_blocks(remote_region, spec, remote_ids)

        local, remote = build()
        rows.append(_row("descs (both sides)", len(local), *_median_seconds(build, repeats)))
        planning = _median_seconds(lambda: destination_agent.plan(local, peer, remote), repeats)
        rows.append(_row("plan", len(local), *planning))
        every = np.arange(cache_blocks)
        prepared = destination_agent.plan(
            Descs.from_blocks(local_region, spec, every), peer, Descs.from_blocks(remote_region, spec, every)
        )
        layer = np.arange(spec.num_layers)[:, None, None] * cache_blocks * 2

        def rows_of(ids: np.ndarray) -> np.ndarray:
            return (layer + ids[None, :, None] * 2 + np.arange(2)[None, None, :]).ravel()

        local_rows, remote_rows = rows_of(local_ids), rows_of(remote_ids)
        rows.append(
            _row("select", len(local_rows), *_median_seconds(lambda: prepared.select(local_rows, remote_rows), repeats))
        )
        request = prepared.select(local_rows, remote_rows)
        request.check_destination("read")
        # Posting a stream of requests (what an engine does per layer or per request) measures post's own cost;
        # posting right after an idle wait adds the cost of a cold core and waking the copy threads.
        for label, wait_between in (("post, back to back", False), ("post, after an idle wait", True)):
            post_times, handles = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                handles.append(destination_agent.read(request))
                post_times.append(time.perf_counter() - start)
                if wait_between:
                    handles.pop().wait()
            for handle in handles:
                handle.wait()
            rows.append(_row(label, len(request), float(np.median(post_times)), float(np.percentile(post_times, 99))))
    return rows


def _row(step: str, descriptors: int, median: float, p99: float) -> dict[str, Any]:
    return {"step": step, "descriptors": descriptors, "median_ms": median * 1e3, "p99_ms": p99 * 1e3}


def bandwidth(
    total_nbytes: int = 256 << 20, smallest: int = 4 << 10, largest: int = 64 << 20, repeats: int = 5
) -> list[dict[str, Any]]:
    """GB/s (1e9 B/s) of the local backend per fragment size, beside numpy.copyto of the same bytes."""
    source_agent, destination_agent, source, destination, peer = _agents(total_nbytes)
    rows = []
    with source_agent, destination_agent:
        ceiling, _ = _median_seconds(lambda: np.copyto(destination, source), repeats)
        size = smallest
        while size <= min(largest, total_nbytes):
            slots = np.random.default_rng(size).permutation(total_nbytes // size) * size
            plan = destination_agent.plan(
                Descs.from_ranges(destination_agent.regions[0], slots, size),
                peer,
                Descs.from_ranges(peer.region("kv"), slots[::-1].copy(), size),
            )
            destination_agent.read(plan).wait()  # warm-up; also checks the plan once

            def read(plan: TransferPlan = plan) -> None:
                destination_agent.read(plan).wait()

            seconds, _ = _median_seconds(read, repeats)
            moved = len(slots) * size
            rows.append(
                {
                    "fragment_bytes": size,
                    "fragments": len(slots),
                    "pairs": len(plan),
                    "GB/s": moved / seconds / 1e9,
                    "numpy_GB/s": total_nbytes / ceiling / 1e9,
                    "ratio": (moved / seconds) / (total_nbytes / ceiling),
                }
            )
            size *= 2
    return rows
