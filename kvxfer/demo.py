"""`kvxfer demo`: a prefill agent and a decode agent in one process move one request's paged KV cache.

The prefill agent serves its metadata on a loopback side channel; the decode agent fetches it, pulls the
request's blocks (scattered at random in both caches), checks every byte, and reports what moved and how fast.
"""

from __future__ import annotations

import time

import numpy as np

from .agent import Agent
from .descs import Descs
from .handle import Notification
from .spec import KVCacheSpec


def run(tokens: int = 2048, block_size: int = 16, backend: str = "local", repeats: int = 5) -> dict:
    """Move a Llama-3.1-8B-shaped request of ``tokens`` tokens; return what moved and the timings."""
    blocks = -(-tokens // block_size)
    spec = KVCacheSpec(
        num_layers=32,
        num_blocks=2 * blocks,
        block_size=block_size,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        model="llama-3.1-8b",
    )
    rng = np.random.default_rng(0)
    prefill_cache = np.frombuffer(rng.bytes(spec.nbytes), dtype=np.uint16).reshape(spec.tensor_shape).copy()
    decode_cache = np.zeros_like(prefill_cache)
    prefill_ids, decode_ids = rng.permutation(spec.num_blocks)[:blocks], rng.permutation(spec.num_blocks)[:blocks]
    with (
        Agent("prefill", backends=[backend], listen="127.0.0.1:0") as prefill,
        Agent("decode", backends=[backend]) as decode,
    ):
        prefill.register(prefill_cache, name="kv")
        local = decode.register(decode_cache, name="kv")
        address = prefill.listen_address
        assert address is not None  # the agent was made with listen=
        peer = decode.connect_to(address)
        start = time.perf_counter()
        plan = decode.plan(
            Descs.from_blocks(local, spec, decode_ids), peer, Descs.from_blocks(peer.region("kv"), spec, prefill_ids)
        )
        plan_seconds = time.perf_counter() - start
        seconds = []
        for attempt in range(repeats):
            decode_cache[:] = 0
            start = time.perf_counter()
            decode.read(plan, notify=f"req-{attempt}".encode()).wait()
            seconds.append(time.perf_counter() - start)
        notes: list[Notification] = []
        give_up = time.monotonic() + 5.0  # the last one may still be on its way when wait() returns
        while len(notes) < repeats and time.monotonic() < give_up:
            notes += prefill.notifications(timeout=max(give_up - time.monotonic(), 0.0))
        exact = bool(np.array_equal(decode_cache[:, decode_ids], prefill_cache[:, prefill_ids]))
        untouched = not np.delete(decode_cache, decode_ids, axis=1).any()
        return {
            "tokens": tokens,
            "blocks": blocks,
            "fragments": len(plan.prepared_local),
            "pairs": len(plan),
            "fragment_bytes": spec.fragments()[1],
            "nbytes": plan.nbytes,
            "backend": plan.backend.caps.name,
            "plan_ms": plan_seconds * 1e3,
            "transfer_ms": float(np.median(seconds)) * 1e3,
            "GB/s": plan.nbytes / float(np.median(seconds)) / 1e9,
            "exact": exact and untouched,
            "notifications": len(notes),
            "side_channel": prefill.listen_address,
        }


def main(tokens: int, block_size: int, backend: str) -> int:
    """Print the demo's report; exit status 0 only when every byte arrived and every notification came."""
    result = run(tokens, block_size, backend)
    print(
        f"kvxfer demo: prefill -> decode over '{result['backend']}' (metadata via side channel "
        f"{result['side_channel']})"
    )
    print(
        f"  request: {result['tokens']} tokens = {result['blocks']} blocks of a Llama-3.1-8B-shaped cache "
        f"(32 layers x K,V x 8 heads x 128 dims, bf16)"
    )
    print(
        f"  moved:   {result['nbytes'] / 2**20:.1f} MiB in {result['fragments']} fragments of "
        f"{result['fragment_bytes'] // 1024} KiB ({result['pairs']} copies after coalescing)"
    )
    print(
        f"  plan:    {result['plan_ms']:.2f} ms   transfer: {result['transfer_ms']:.2f} ms   "
        f"=> {result['GB/s']:.2f} GB/s (median of 5)"
    )
    print(
        f"  check:   bytes {'exact' if result['exact'] else 'WRONG'}, "
        f"{result['notifications']}/5 notifications delivered after the data"
    )
    return 0 if result["exact"] and result["notifications"] == 5 else 1
