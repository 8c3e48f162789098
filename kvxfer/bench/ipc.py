"""`kvxfer-bench ipc`: GPU->GPU between two processes of one host through the CUDA IPC backend.

A "prefill" process on GPU ``source`` holds a Llama-3.1-8B-shaped paged cache; a "decode" process on GPU
``target`` pulls one request's blocks (random ids on both sides). Time runs from the first call (plan select
and read) to the notification arriving at the prefill process (CLOCK_MONOTONIC is shared by processes of a
host). The ceiling is one contiguous peer copy of 1 GiB measured in the same run.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, TypedDict

import numpy as np

from ..descs import Descs
from ..spec import KVCacheSpec


class ModelShape(TypedDict):
    """KVCacheSpec arguments that describe a model's KV cache (the rest describe one engine's cache)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


LLAMA_8B = ModelShape(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def _prefill(conn: Any, device: int, nbytes: int, strategy: str) -> None:
    import cupy

    from ..agent import Agent
    from ..backends.cuda_ipc import CudaIpcBackend

    cupy.cuda.Device(device).use()
    cache = cupy.random.default_rng(0).integers(1, 256, nbytes, dtype=cupy.uint8)
    with Agent("prefill", backends=[CudaIpcBackend(strategy)]) as agent:
        agent.register(cache, name="kv")
        conn.send(agent.metadata())
        while True:
            command = conn.recv()
            if command == "exit":
                break
            notes = agent.notifications(timeout=30.0)
            conn.send((time.monotonic(), [n.payload for n in notes]))


def ceiling_gbps(source: int, target: int, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """GB/s of one contiguous copy from GPU ``source`` to GPU ``target`` (the link's ceiling)."""
    import cupy

    with cupy.cuda.Device(source):
        a = cupy.ones(nbytes, dtype=cupy.uint8)
    with cupy.cuda.Device(target):
        b = cupy.zeros(nbytes, dtype=cupy.uint8)
        if source != target:
            try:
                cupy.cuda.runtime.deviceEnablePeerAccess(source)
            except cupy.cuda.runtime.CUDARuntimeError:
                pass  # already enabled
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(repeats + 2):
            start.record()
            cupy.cuda.runtime.memcpyPeer(b.data.ptr, target, a.data.ptr, source, nbytes)
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return nbytes / float(np.median(times[2:])) / 1e9


def _kernel_seconds(state: Any, device: int, repeats: int = 10, **launch: Any) -> float:
    """GPU time of the backend's copy kernel alone (tables uploaded, events around the launch)."""
    import cupy

    from ..backends.base import Op
    from ..kernels import batch_copy

    table = state.tables[Op.READ]
    with cupy.cuda.Device(device):
        stream = cupy.cuda.Stream(non_blocking=True)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(repeats + 2):
            start.record(stream)
            batch_copy.launch(table, device, stream, **launch)
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times[2:]))


def _kernel_variants(agent: Any, workload: tuple, peer: Any, device: int, ceiling: float) -> list[dict[str, Any]]:
    """The copy kernel alone on the Llama request, for other piece sizes and grid sizes."""
    from ..backends.base import Op
    from ..kernels import batch_copy

    name, local, remote = workload
    plan = agent.plan(local, peer, remote)
    state = plan.backend.plan_state(plan)
    rows = []
    for piece in (16 << 10, 64 << 10, 256 << 10):
        state.tables[Op.READ] = batch_copy.to_device(
            batch_copy.split_pieces(state.remote, state.local, state.sizes, piece), device
        )
        for ctas in (4, 8, 16):
            seconds = _kernel_seconds(state, device, ctas_per_sm=ctas)
            rows.append(
                {
                    "workload": f"{name} kernel only",
                    "fragment_bytes": piece,
                    "strategy": f"{ctas} CTAs/SM",
                    "kernel_ms": seconds * 1e3,
                    "kernel_GB/s": plan.nbytes / seconds / 1e9,
                    "ceiling_GB/s": ceiling,
                    "ratio": plan.nbytes / seconds / 1e9 / ceiling,
                }
            )
    return rows


def run(
    source: int = 0,
    target: int = 1,
    tokens: int = 4096,
    block_size: int = 16,
    strategy: str = "auto",
    fragment_sizes: tuple[int, ...] = (4 << 10, 2 << 20),
    repeats: int = 20,
) -> list[dict[str, Any]]:
    """One row per workload: Llama-8B request, plus raw fragments of each size in ``fragment_sizes``."""
    import cupy

    from ..agent import Agent
    from ..backends.cuda_ipc import CudaIpcBackend

    blocks = tokens // block_size
    spec = KVCacheSpec(num_blocks=2 * blocks, block_size=block_size, **LLAMA_8B)
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=_prefill, args=(child, source, spec.nbytes, strategy), daemon=True)
    process.start()
    child.close()  # ours: a prefill process that dies then ends our recv() with EOFError instead of a hang
    rows = []
    try:
        cupy.cuda.Device(target).use()
        cache = cupy.zeros(spec.nbytes, dtype=cupy.uint8)
        with Agent("decode", backends=[CudaIpcBackend(strategy)]) as agent:
            region = agent.register(cache, name="kv")
            peer = agent.connect(conn.recv())
            rng = np.random.default_rng(1)
            workloads = [
                (
                    "llama-8b kv",
                    Descs.from_blocks(region, spec, rng.permutation(spec.num_blocks)[:blocks]),
                    Descs.from_blocks(peer.region("kv"), spec, rng.permutation(spec.num_blocks)[:blocks]),
                )
            ]
            moved = workloads[0][1].total_nbytes
            for size in fragment_sizes:
                count = moved // size
                workloads.append(
                    (
                        f"{size // 1024} KiB fragments",
                        Descs.from_ranges(region, rng.permutation(spec.nbytes // size)[:count] * size, size),
                        Descs.from_ranges(peer.region("kv"), rng.permutation(spec.nbytes // size)[:count] * size, size),
                    )
                )
            ceiling = ceiling_gbps(source, target)
            for name, local, remote in workloads:
                plan = agent.plan(local, peer, remote)
                seconds = []
                for attempt in range(repeats + 2):
                    conn.send("wait")
                    start = time.monotonic()
                    agent.read(plan, notify=b"%d" % attempt).wait(timeout=60)
                    arrived, notes = conn.recv()
                    if notes != [b"%d" % attempt]:
                        raise RuntimeError(f"notification mismatch: {notes}")
                    seconds.append(arrived - start)
                median = float(np.median(seconds[2:]))
                assert isinstance(plan.backend, CudaIpcBackend)  # the only backend this agent has
                state = plan.backend.plan_state(plan)
                kernel = _kernel_seconds(state, target) if state.strategy == "kernel" else float("nan")
                rows.append(
                    {
                        "workload": name,
                        "fragment_bytes": int(local.nbytes[0]),
                        "fragments": len(local),
                        "MiB": plan.nbytes / 2**20,
                        "strategy": state.strategy,
                        "ms": median * 1e3,
                        "kernel_ms": kernel * 1e3,
                        "GB/s": plan.nbytes / median / 1e9,
                        "kernel_GB/s": plan.nbytes / kernel / 1e9,
                        "ceiling_GB/s": ceiling,
                        "ratio": plan.nbytes / median / 1e9 / ceiling,
                    }
                )
            rows += _kernel_variants(agent, workloads[0], peer, target, ceiling)
    finally:
        conn.send("exit")
        process.join(30)
    return rows
