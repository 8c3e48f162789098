"""What target-side bounds enforcement costs on each UCX host path (issue 14, item 1), in one run.

Two processes on this host; this one initiates, a child is the target (one child trusting same-uid peers, the
default, one with ``KVXFER_UCX_ONE_SIDED=off``). Per path (cma; UCX over shared memory, i.e. ``cma=off``; UCX over
tcp, i.e. ``cma=off`` + peer error mode), fragment size and op, three variants of the same transfer:

- ``unchecked``: the one-sided path as before enforcement (the export-table check replaced by a no-op here, in
  this process only): what main did;
- ``export-check``: the default now: one-sided, after reading the target's export table (one cross-memory call
  per post, the span check once per plan and table generation);
- ``target-checked``: the target refuses one-sided access: staged messages, every span checked by the target.

``--total`` bytes per transfer in fragments at random distinct offsets, median of ``--repeats`` after a warm-up.
GB/s = 1e9 B/s. JSON into bench/results/ucx_enforcement_<date>.json.

    python bench/ucx_enforcement.py
    python bench/ucx_enforcement.py --sizes 4096 1048576 --total 16777216 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

import numpy as np

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20]
PATHS: dict[str, dict[str, Any]] = {"cma": {}, "shm": {"cma": "off"}, "tcp": {"cma": "off", "error_mode": "peer"}}
ENVIRON = {"UCX_MEM_MMAP_HOOK_MODE": "none"}


def _target(connection: Any, nbytes: int, one_sided: str) -> None:
    os.environ.update(ENVIRON)
    os.environ["KVXFER_UCX_ONE_SIDED"] = one_sided
    import kvxfer

    with kvxfer.Agent(f"target-{one_sided}", backends=["ucx"]) as agent:
        memory = np.zeros(nbytes, dtype=np.uint8)
        agent.register(memory, name="buf")
        connection.send(agent.metadata())
        connection.recv()  # quit


def _time(agent: Any, op: str, plan: Any, repeats: int) -> float:
    move = agent.write if op == "WRITE" else agent.read
    move(plan).wait(120)  # warm-up: page faults, connections, plan caches
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        move(plan).wait(120)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--total", type=int, default=32 << 20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", nargs="+", default=list(PATHS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.update(ENVIRON)
    import kvxfer
    from kvxfer.backends.ucx import UcxBackend
    from kvxfer.backends.ucx.config import UcxConfig

    pool = 2 * max(args.total, max(args.sizes))
    context = multiprocessing.get_context("spawn")
    targets, metas = [], {}
    for mode in ("same-uid", "off"):
        mine, theirs = context.Pipe()
        process = context.Process(target=_target, args=(theirs, pool, mode), daemon=True)
        process.start()
        targets.append((process, mine))
        metas[mode] = mine.recv()
    results = []
    rng = np.random.default_rng(0)
    try:
        for path in args.paths:
            for size in args.sizes:
                count = max(1, args.total // size)
                slots = pool // size
                local_offsets = rng.choice(slots, count, replace=False) * size
                remote_offsets = rng.choice(slots, count, replace=False) * size
                for variant in ("unchecked", "export-check", "target-checked"):
                    backend = UcxBackend(UcxConfig(**PATHS[path]))
                    if variant == "unchecked":
                        backend.check_one_sided = lambda link, plan: None  # type: ignore[method-assign]
                    agent = kvxfer.Agent(
                        f"bench-{path}-{size}-{variant}", backends=[backend], timeouts=kvxfer.Timeouts(transfer=120.0)
                    )
                    with agent:
                        local = np.ones(pool, dtype=np.uint8)
                        region = agent.register(local, name="buf")
                        peer = agent.connect(metas["off" if variant == "target-checked" else "same-uid"])
                        plan = agent.plan(
                            kvxfer.Descs.from_ranges(region, local_offsets, size),
                            peer,
                            kvxfer.Descs.from_ranges(peer.region("buf"), remote_offsets, size),
                        )
                        strategy = backend.data_path(plan)
                        for op in ("WRITE", "READ"):
                            seconds = _time(agent, op, plan, args.repeats)
                            row = {
                                "path": path,
                                "fragment": size,
                                "op": op,
                                "variant": variant,
                                "data_path": strategy,
                                "seconds": seconds,
                                "gbps": round(count * size / seconds / 1e9, 3),
                            }
                            results.append(row)
                            print(json.dumps(row), flush=True)
    finally:
        for process, connection in targets:
            try:
                connection.send("quit")
            except OSError:
                pass
            process.join(10)
            if process.is_alive():
                process.kill()
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"ucx_enforcement_{date}.json"
    )
    document = {
        "benchmark": "ucx_enforcement",
        "date": date,
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"host": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "total_bytes": args.total,
        "repeats": args.repeats,
        "results": results,
        "note": "GB/s = 1e9 B/s; median of repeats; shared 2-core machine, noisy (other jobs ran)",
    }
    with open(out, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=1)
    print(out)


if __name__ == "__main__":
    main()
