"""Where a KVPipe pull's host time goes on a GPU machine: each phase of the kernel route timed on its own.

A prefill process on GPU 0 holds a Llama-3.1-8B cache; this process (GPU 1, or GPU 0 on a one-GPU machine) pulls
4k-token requests through KVPipe and, separately, replays the same phases by hand. Prints median microseconds per
phase, then (``--profile``) where pull() spends its host time.
Usage: python3 scripts/pipe_timing.py [--tokens 4096] [--repeats 30] [--profile]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np

from kvxfer import Agent, KVPipe, kernels
from kvxfer.bench.kv import Setup, _prefill_rank


def _median_us(samples: list[float]) -> float:
    return float(np.median(samples)) * 1e6


def main() -> None:
    import cupy

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = 1 if cupy.cuda.runtime.getDeviceCount() > 1 else 0
    setup = Setup(tokens=args.tokens, p_tp=1, d_tp=1, p_gpu=0, d_gpu=device)
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=_prefill_rank, args=(child, setup, 0), daemon=True)
    process.start()
    meta = conn.recv()
    spec, remote_spec = setup.spec("d", 0), setup.spec("p", 0)
    rng = np.random.default_rng(1)
    p_ids = rng.permutation(remote_spec.num_blocks)[: args.tokens // 16]
    d_ids = rng.permutation(spec.num_blocks)[: args.tokens // 16]
    cupy.cuda.Device(device).use()
    cache = cupy.zeros(spec.nbytes, dtype=cupy.uint8)
    phases: dict[str, list[float]] = {}

    def timed(name: str, action):
        start = time.perf_counter()
        result = action()
        phases.setdefault(name, []).append(time.perf_counter() - start)
        return result

    with Agent("decode", backends=["cuda_ipc"]) as agent:
        region = agent.register(cache, name="kv")
        peer = agent.connect(meta)
        pipe = KVPipe(agent, spec, peer, remote_spec)
        route = pipe.routes[0]
        stream = cupy.cuda.Stream(non_blocking=True)
        for attempt in range(args.repeats + 3):
            handle = timed("pipe.pull (returns)", lambda: pipe.pull(d_ids, p_ids))
            timed("pipe wait", lambda handle=handle: handle.wait(timeout=30))
            plan = timed(
                "plan_kv_copy",
                lambda: kernels.plan_kv_copy(
                    remote_spec,
                    spec,
                    p_ids,
                    d_ids,
                    src_heads=route.heads.remote_heads,
                    dst_heads=route.heads.local_heads,
                ),
            )
            timed("kernel_tables", lambda plan=plan: plan.tables)
            timed(
                "copy_kv_pointers",
                lambda plan=plan: kernels.copy_kv_pointers(
                    route.mapped, route.region.nbytes, region.addr, region.nbytes, plan, device=device, stream=stream
                ),
            )
            event = timed("event create+record", lambda: _record(cupy, stream))
            timed("event synchronize", event.synchronize)
            timed("agent.notify", lambda: agent.notify(peer, b"x"))
            if attempt < 3:
                phases.clear()
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            for _ in range(args.repeats):
                profiler.enable()
                handle = pipe.pull(d_ids, p_ids)
                profiler.disable()
                handle.wait(timeout=30)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        pipe.close()
    conn.send("exit")
    process.join(30)
    width = max(len(k) for k in phases)
    for name, samples in phases.items():
        print(f"{name:<{width}}  median {_median_us(samples):9.1f} us   p90 {np.percentile(samples, 90) * 1e6:9.1f} us")


def _record(cupy, stream):
    event = cupy.cuda.Event(block=False, disable_timing=True)
    event.record(stream)
    return event


if __name__ == "__main__":
    main()
