"""Where a KVPipe pull's time goes on a GPU machine: host time of pull() and end to end, by block ids vs by tables.

A prefill process on GPU 0 holds a Llama-3.1-8B cache and records when each notification arrives; this process
(GPU 1, or GPU 0 on a one-GPU machine) pulls requests through KVPipe over CUDA IPC, each with its own shuffled
block ids, one at a time, by both kernel routes in turn:

- "ids":    fragment addresses derived on the GPU from the block ids (``pipe.gpu_addressing = True``, the default)
- "tables": fragment tables built on the host per request and uploaded (``gpu_addressing = False``, the route before)

Per route and request size it prints medians of: the host time of ``pull()`` (call to return, i.e. to the launch);
the GPU time of its work (events around the pull on the pipe's stream, queued behind a spin kernel so that host
time is not counted: the upload of ids or table, and the copy); end to end (call -> notification delivered in the
prefill process; both sides read CLOCK_MONOTONIC); a contiguous device copy of the same bytes on this GPU (the
ceiling); their ratio, and what a request costs beyond the bytes. ``--phases`` also replays the table route's
phases by hand; ``--profile`` prints where pull() by ids spends its host time.

Usage: python3 scripts/pipe_timing.py [--tokens 4096 128] [--tp 1 2] [--repeats 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import sys
import time
from typing import Any

import numpy as np

from kvxfer import Agent, KVPipe, kernels
from kvxfer.bench.kv import Setup, _allocate

#: A one-thread kernel that keeps the stream busy for ``cycles`` GPU clocks.
_SPIN = """
extern "C" __global__ void kvxfer_spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
"""


def _prefill(conn: Any, setup: Setup) -> None:
    """The prefill rank: its cache, then every notification's arrival time until told to stop."""
    arrivals: dict[bytes, float] = {}
    with Agent("prefill-0", backends=["cuda_ipc"]) as agent:
        agent.register(_allocate(setup.spec("p", 0), setup.p_gpu, True), name="kv")
        conn.send(agent.metadata())
        while not conn.poll():
            for note in agent.notifications(timeout=0.001):
                arrivals.setdefault(note.payload, time.monotonic())
        conn.recv()
        conn.send(arrivals)


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _copy_us(cupy: Any, nbytes: int, repeats: int) -> float:
    """Median microseconds of one contiguous device-to-device copy of ``nbytes`` on the current GPU."""
    src, dst = cupy.ones(nbytes, dtype=cupy.uint8), cupy.zeros(nbytes, dtype=cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
    samples = []
    for _ in range(repeats + 3):
        begin.record(stream)
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, 3, stream.ptr)
        end.record(stream)
        end.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(begin, end) * 1e3)
    return _median(samples[3:])


def _case(cupy: Any, tokens: int, d_tp: int, device: int, repeats: int, phases: bool) -> list[dict[str, Any]]:
    setup = Setup(tokens=tokens, p_tp=1, d_tp=d_tp, p_gpu=0, d_gpu=device)
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=_prefill, args=(child, setup), daemon=True)
    process.start()
    meta = conn.recv()
    spec, remote_spec = setup.spec("d", 0), setup.spec("p", 0)
    rng = np.random.default_rng(1)
    requests = [
        (
            rng.permutation(spec.num_blocks)[: -(-tokens // spec.block_size)],
            rng.permutation(remote_spec.num_blocks)[: -(-tokens // remote_spec.block_size)],
        )
        for _ in range(16)
    ]
    cupy.cuda.Device(device).use()
    cache = cupy.zeros(spec.nbytes, dtype=cupy.uint8)
    rows: list[dict[str, Any]] = []
    calls: dict[bytes, float] = {}
    with Agent("decode", backends=["cuda_ipc"]) as agent:
        agent.register(cache, name="kv")
        peer = agent.connect(meta)
        pipe = KVPipe(agent, spec, peer, remote_spec)
        launcher = pipe._launcher  # noqa: SLF001 a benchmark timing the pipe's own stream
        spin = cupy.RawKernel(_SPIN, "kvxfer_spin")
        begin, end = cupy.cuda.Event(), cupy.cuda.Event()
        for route in ("ids", "tables"):
            pipe.gpu_addressing = route == "ids"
            host, kernel, nbytes = [], [], 0
            for attempt in range(repeats + 5):  # end to end: one request at a time, nothing queued
                d_ids, p_ids = requests[attempt % len(requests)]
                payload = f"{route}-{tokens}-{attempt}".encode()
                calls[payload] = time.monotonic()
                start = time.perf_counter()
                handle = pipe.pull(d_ids, p_ids, notify=payload)
                host.append((time.perf_counter() - start) * 1e6)
                handle.wait(timeout=30)
                nbytes = handle.nbytes
                handle.release()
                time.sleep(0.003)  # the notification lands before the next pull starts
            for attempt in range(repeats):  # GPU time: queued behind a spin so the host's time is not counted
                d_ids, p_ids = requests[attempt % len(requests)]
                stream = launcher._stream  # noqa: SLF001
                spin((1,), (1,), (np.int64(2_000_000),), stream=stream)  # ~1 ms
                begin.record(stream)
                handle = pipe.pull(d_ids, p_ids)
                end.record(stream)
                handle.wait(timeout=30)
                end.synchronize()
                kernel.append(cupy.cuda.get_elapsed_time(begin, end) * 1e3)
                handle.release()
            rows.append({"route": route, "host": host[5:], "kernel": kernel, "nbytes": nbytes})
        if phases:
            _replay_phases(cupy, pipe, agent, peer, requests, remote_spec, spec, device, repeats)
        pipe.close()
    conn.send("stop")
    arrivals = conn.recv()
    process.join(30)
    ceiling = _copy_us(cupy, rows[0]["nbytes"], repeats)
    results = []
    for row in rows:
        ends = [
            (arrivals[p] - calls[p]) * 1e6
            for p in calls
            if p.startswith(row["route"].encode()) and p in arrivals and int(p.rsplit(b"-", 1)[1]) >= 5
        ]
        e2e = _median(ends) if ends else float("nan")
        results.append(
            {
                "tokens": tokens,
                "tp": f"1->{d_tp}",
                "route": row["route"],
                "MiB": round(row["nbytes"] / 2**20, 2),
                "pull_host_us_median": round(_median(row["host"]), 1),
                "pull_host_us_p10": round(float(np.percentile(row["host"], 10)), 1),
                "kernel_gpu_us_median": round(_median(row["kernel"]), 1),
                "end_to_end_us_median": round(e2e, 1),
                "notifications_seen": len(ends),
                "copy_ceiling_us": round(ceiling, 1),
                "ratio_to_copy": round(ceiling / e2e, 3) if ends else None,
                "beyond_bytes_us": round(e2e - ceiling, 1),
            }
        )
    return results


def _replay_phases(
    cupy: Any,
    pipe: KVPipe,
    agent: Agent,
    peer: Any,
    requests: list[Any],
    remote_spec: Any,
    spec: Any,
    device: int,
    n: int,
) -> None:
    """The table route's phases by hand (planning, tables, launch, event, notify), median microseconds each."""
    route, region = pipe.routes[0], next(r for r in agent.regions if r.name == "kv")
    stream = cupy.cuda.Stream(non_blocking=True)
    phases: dict[str, list[float]] = {}

    def timed(name: str, action: Any) -> Any:
        start = time.perf_counter()
        result = action()
        phases.setdefault(name, []).append((time.perf_counter() - start) * 1e6)
        return result

    for attempt in range(n):
        d_ids, p_ids = requests[attempt % len(requests)]
        plan = timed(
            "plan_kv_copy",
            lambda d_ids=d_ids, p_ids=p_ids: kernels.plan_kv_copy(
                remote_spec, spec, p_ids, d_ids, src_heads=route.heads.remote_heads, dst_heads=route.heads.local_heads
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
    for name, samples in phases.items():
        print(f"  table route phase {name:<20} median {_median(samples):8.1f} us")


def _record(cupy: Any, stream: Any) -> Any:
    event = cupy.cuda.Event(block=False, disable_timing=True)
    event.record(stream)
    return event


def main() -> None:
    import cupy

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 128])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="decode TP sizes (decode rank 0 pulls)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--phases", action="store_true", help="also replay the table route's phases by hand")
    parser.add_argument("--profile", action="store_true", help="cProfile of pull() by ids, 4k tokens")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = 1 if cupy.cuda.runtime.getDeviceCount() > 1 else 0
    results = []
    for tokens in args.tokens:
        for d_tp in args.tp:
            if tokens < 1024 and d_tp > 1:
                continue
            results += _case(cupy, tokens, d_tp, device, args.repeats, args.phases and d_tp == 1)
    for r in results:  # one line per route and size; "median" lines are what scripts/gpu-run.sh summarizes
        print(
            f"{r['route']:<6} {r['tokens']:>5} tokens {r['tp']}: pull() median {r['pull_host_us_median']} us "
            f"(p10 {r['pull_host_us_p10']}), GPU {r['kernel_gpu_us_median']} us, end to end median "
            f"{r['end_to_end_us_median']} us vs copy {r['copy_ceiling_us']} us of {r['MiB']} MiB: ratio "
            f"{r['ratio_to_copy']}, beyond the bytes {r['beyond_bytes_us']} us"
        )
    if args.profile:
        _profile(cupy, device, args.repeats)
    if args.json:
        record = {
            "what": "KVPipe pull by block ids vs by tables: host time, kernel, end to end to the notification",
            "machine": platform.node(),
            "gpu": cupy.cuda.runtime.getDeviceProperties(device)["name"].decode(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python3 scripts/pipe_timing.py " + " ".join(sys.argv[1:]),
            "results": results,
        }
        with open(args.json, "w") as out:
            json.dump(record, out, indent=1)


def _profile(cupy: Any, device: int, repeats: int) -> None:
    import cProfile
    import pstats

    setup = Setup(tokens=4096, p_gpu=0, d_gpu=device)
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=_prefill, args=(child, setup), daemon=True)
    process.start()
    meta = conn.recv()
    spec, remote_spec = setup.spec("d", 0), setup.spec("p", 0)
    rng = np.random.default_rng(2)
    cupy.cuda.Device(device).use()
    with Agent("decode-profile", backends=["cuda_ipc"]) as agent:
        agent.register(cupy.zeros(spec.nbytes, dtype=cupy.uint8), name="kv")
        pipe = KVPipe(agent, spec, agent.connect(meta), remote_spec)
        profiler = cProfile.Profile()
        for attempt in range(repeats + 5):
            d_ids, p_ids = rng.permutation(spec.num_blocks)[:256], rng.permutation(remote_spec.num_blocks)[:256]
            if attempt >= 5:
                profiler.enable()
            handle = pipe.pull(d_ids, p_ids)
            profiler.disable()
            handle.wait(timeout=30)
            handle.release()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        pipe.close()
    conn.send("stop")
    conn.recv()
    process.join(30)


if __name__ == "__main__":
    main()
