"""NIXL 1.5.1 on the same GPU work as `kvxfer-bench ipc`: a decode process on GPU ``target`` READs a
Llama-3.1-8B request (4k tokens, 16-token blocks, random block ids; the same descriptor pairs kvxfer's plan moves
after coalescing) from a prefill process on GPU ``source``; also raw 4 KiB and 2 MiB fragments.
Timing: from the transfer call until NIXL reports DONE at the initiator. Usage: python3 bench/nixl_gpu.py --json X
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time

import numpy as np

from kvxfer.bench.ipc import LLAMA_8B, ceiling_gbps
from kvxfer.bench.report import environment, print_table
from kvxfer.descs import Descs, coalesce_pairs
from kvxfer.spec import KVCacheSpec


def _spec(tokens: int, block_size: int) -> KVCacheSpec:
    return KVCacheSpec(num_blocks=2 * (tokens // block_size), block_size=block_size, **LLAMA_8B)


def _prefill(conn, device: int, nbytes: int) -> None:
    import cupy
    from nixl._api import nixl_agent, nixl_agent_config

    cupy.cuda.Device(device).use()
    cache = cupy.random.default_rng(0).integers(1, 256, nbytes, dtype=cupy.uint8)
    agent = nixl_agent("prefill", nixl_agent_config(backends=["UCX"]))
    agent.register_memory([(cache.data.ptr, nbytes, device, "")], "VRAM")
    conn.send((agent.get_agent_metadata(), cache.data.ptr))
    conn.recv()


def workloads(spec: KVCacheSpec, tokens: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, local offsets, remote offsets, sizes) — the ids and order of kvxfer.bench.ipc."""
    rng = np.random.default_rng(1)
    blocks = tokens // spec.block_size
    local_ids, remote_ids = rng.permutation(spec.num_blocks)[:blocks], rng.permutation(spec.num_blocks)[:blocks]
    local, piece = spec.block_offsets(local_ids)
    remote, _ = spec.block_offsets(remote_ids)
    pairs = [
        Descs(
            o.astype(np.uint64),
            np.full(len(o), piece, np.uint64),
            np.zeros(len(o), np.int32),
            np.zeros(len(o), np.int32),
            None,
        )
        for o in (local, remote)
    ]
    merged_local, merged_remote = coalesce_pairs(*pairs)
    result = [("llama-8b kv", merged_local.addr, merged_remote.addr, merged_local.nbytes)]
    moved = int(merged_local.nbytes.sum())
    for size in (4 << 10, 2 << 20):
        count = moved // size
        result.append(
            (
                f"{size // 1024} KiB fragments",
                rng.permutation(spec.nbytes // size)[:count] * size,
                rng.permutation(spec.nbytes // size)[:count] * size,
                np.full(count, size),
            )
        )
    return result


def run(source: int, target: int, tokens: int, block_size: int, repeats: int) -> list[dict]:
    import cupy
    from nixl._api import nixl_agent, nixl_agent_config

    spec = _spec(tokens, block_size)
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=_prefill, args=(child, source, spec.nbytes), daemon=True)
    process.start()
    rows = []
    try:
        cupy.cuda.Device(target).use()
        cache = cupy.zeros(spec.nbytes, dtype=cupy.uint8)
        agent = nixl_agent("decode", nixl_agent_config(backends=["UCX"]))
        agent.register_memory([(cache.data.ptr, spec.nbytes, target, "")], "VRAM")
        meta, remote_base = conn.recv()
        remote_name = agent.add_remote_agent(meta)
        ceiling = ceiling_gbps(source, target)
        for name, local, remote, sizes in workloads(spec, tokens):

            def descs(base: int, offsets: np.ndarray, lengths: np.ndarray, device: int) -> np.ndarray:
                table = np.zeros((len(offsets), 3), dtype=np.uint64)
                table[:, 0] = np.uint64(base) + np.asarray(offsets, np.uint64)
                table[:, 1] = np.asarray(lengths, np.uint64)
                table[:, 2] = device
                return table

            local_side = agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs(cache.data.ptr, local, sizes, target), "VRAM")
            remote_side = agent.prep_xfer_dlist(remote_name, descs(remote_base, remote, sizes, source), "VRAM")
            index = np.arange(len(local), dtype=np.int32)
            handle = agent.make_prepped_xfer("READ", local_side, index, remote_side, index, b"")
            seconds = []
            for _ in range(repeats + 2):
                start = time.perf_counter()
                state = agent.transfer(handle)
                while state == "PROC":
                    state = agent.check_xfer_state(handle)
                if state != "DONE":
                    raise RuntimeError(f"NIXL transfer ended in state {state}")
                seconds.append(time.perf_counter() - start)
            agent.release_xfer_handle(handle)
            median = float(np.median(seconds[2:]))
            nbytes = int(np.sum(sizes))
            rows.append(
                {
                    "workload": name,
                    "fragment_bytes": int(sizes[0]),
                    "fragments": len(sizes),
                    "MiB": nbytes / 2**20,
                    "ms": median * 1e3,
                    "GB/s": nbytes / median / 1e9,
                    "ceiling_GB/s": ceiling,
                    "ratio": nbytes / median / 1e9 / ceiling,
                }
            )
    finally:
        conn.send("exit")
        process.join(30)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=int, default=0)
    parser.add_argument("--target", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    try:
        import nixl  # noqa: F401
    except ImportError as error:
        print(f"NIXL is not installed ({error}); nothing to compare")
        return 0
    rows = run(args.source, args.target, args.tokens, args.block_size, args.repeats)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"environment": environment(), "rows": rows}, file, indent=2)
    print_table(f"NIXL 1.5.1 (UCX) GPU{args.source} -> GPU{args.target} READ, until DONE at the initiator", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
