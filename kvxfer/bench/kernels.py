"""KV copy kernel bandwidth on one GPU, each row beside a plain device-to-device copy of the same bytes.

A Llama-3.1-8B-shaped cache (32 layers, 8 KV heads, head_dim 128, bf16) holding one 4k-token request in random
blocks of a pool 4x larger (a few GB: L2 does not flatter it). Fragment = bytes of one (layer, block, K/V part)
box of the source cache: 4 KiB (2-token blocks), 32 KiB (16-token blocks, the real Llama case), 2 MiB (1024-token
blocks). Bandwidth = (bytes read + bytes written) / time, median of ``repeats`` after warm-up, CUDA events on one
stream. ``ceiling`` is cudaMemcpyAsync of the same payload between two contiguous buffers, timed in the same run.
``variant``: "default" is the launch every call uses (one wave of resident CTAs striding over boxes, tables
uploaded once per plan with upload_plan); the gather is also timed with the other TUNING_VARIANTS and with its
tables uploaded on every call ("upload/call"), to choose defaults from data.
TP rows time both ranks' launches together. Peak device memory is about 8 GiB.

    python -m kvxfer.bench.kernels [--json PATH] [--repeats N] [--tokens N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from .. import kernels
from ..kernels import _cuda
from ..kernels.launch import DEFAULT_TUNING, KernelTuning
from ..spec import KVCacheSpec
from .report import print_table, write_json

#: Fragment (source box) size in KiB -> block size giving it with 8 heads x 128 x bf16.
BLOCK_SIZE_OF_FRAGMENT = {4: 2, 32: 16, 2048: 1024}
#: Other kernel settings timed on the gather, to choose defaults from data (labels -> tuning).
TUNING_VARIANTS = {
    "per-box grid": KernelTuning(waves=None),
    "2 waves": KernelTuning(waves=2.0),
    "no prefetch": KernelTuning(prefetch=False),
    "unroll 8": KernelTuning(unroll=8, min_ctas=3),
    "unroll 2": KernelTuning(unroll=2),
}
COLUMNS = ("op", "fragment_kib", "variant", "payload_mib", "gbps", "ceiling_gbps", "ratio", "target", "host_us")


def run(num_tokens: int = 4096, fragments_kib: Sequence[int] = (4, 32, 2048), repeats: int = 20, warmup: int = 3,
        device: int = 0, num_layers: int = 32, pool_factor: int = 4) -> list[dict[str, Any]]:
    """Measure every operation at every fragment size; returns one dict per row (see COLUMNS)."""
    from ..devices import cupy_module

    cupy = cupy_module()
    rows: list[dict[str, Any]] = []
    with cupy.cuda.Device(device):
        stream = cupy.cuda.Stream(non_blocking=True)
        for fragment in fragments_kib:
            bench = _Bench(cupy, stream, device, num_tokens, BLOCK_SIZE_OF_FRAGMENT[fragment], num_layers,
                           pool_factor, repeats, warmup)
            rows += [dict(fragment_kib=fragment, **row) for row in bench.rows()]
            del bench
            cupy.get_default_memory_pool().free_all_blocks()
    return rows


class _Bench:
    """The buffers and plans of one fragment size, and their timings."""

    def __init__(self, cupy: Any, stream: Any, device: int, num_tokens: int, block_size: int, num_layers: int,
                 pool_factor: int, repeats: int, warmup: int) -> None:
        self.cupy, self.stream, self.device, self.repeats, self.warmup = cupy, stream, device, repeats, warmup
        rng = np.random.default_rng(block_size)
        blocks = -(-num_tokens // block_size)
        self.hnd = KVCacheSpec(num_layers=num_layers, num_blocks=blocks * pool_factor, block_size=block_size,
                               num_kv_heads=8, head_dim=128, layout="HND")
        self.nhd = self.hnd.replace(layout="NHD")
        self.ranks = [self.hnd.replace(num_kv_heads=4, tp_size=2, tp_rank=r) for r in range(2)]
        self.staging = kernels.staging_spec(self.hnd, num_tokens)
        self.ids = [rng.permutation(self.hnd.num_blocks)[:blocks] for _ in range(3)]
        self.tokens = num_tokens
        self.memory = {name: self._random(spec.nbytes) for name, spec in
                       (("hnd", self.hnd), ("nhd", self.nhd), ("staging", self.staging), ("rank0", self.ranks[0]),
                        ("rank1", self.ranks[1]))}

    def _random(self, nbytes: int) -> Any:
        data = self.cupy.empty(nbytes, dtype=self.cupy.uint8)
        words = nbytes // 4
        data[:words * 4].view(self.cupy.float32)[:] = self.cupy.random.random(words, dtype=self.cupy.float32)
        return data

    def _plan(self, src: KVCacheSpec, dst: KVCacheSpec, src_ids: Any, dst_ids: Any, **heads: Any) -> Any:
        plan = kernels.plan_kv_copy(src, dst, src_ids, dst_ids, num_tokens=self.tokens, **heads)
        return kernels.upload_plan(plan, self.device)

    def operations(self) -> list[tuple[str, list[tuple[str, str, Any]]]]:
        """(name, [(src buffer, dst buffer, plan), ...]) — the calls one row times together."""
        hnd, ids = self.hnd, self.ids
        split = [("hnd", f"rank{r}", self._plan(hnd, rank, ids[0], ids[1], src_heads=rank.head_range()))
                 for r, rank in enumerate(self.ranks)]
        merge = [(f"rank{r}", "hnd", self._plan(rank, hnd, ids[1], ids[2], dst_heads=rank.head_range()))
                 for r, rank in enumerate(self.ranks)]
        return [
            ("gather", [("hnd", "staging", self._plan(hnd, self.staging, ids[0], [0]))]),
            ("scatter", [("staging", "hnd", self._plan(self.staging, hnd, [0], ids[1]))]),
            ("tp split 1->2", split),
            ("tp merge 2->1", merge),
            ("NHD->HND", [("nhd", "hnd", self._plan(self.nhd, hnd, ids[0], ids[2]))]),
            ("HND->NHD", [("hnd", "nhd", self._plan(hnd, self.nhd, ids[1], ids[0]))]),
        ]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        operations = self.operations()
        for name, calls in operations:
            out.append(self._row(name, calls, DEFAULT_TUNING, "default"))
        gather = operations[0][1]
        for label, tuning in TUNING_VARIANTS.items():
            out.append(self._row("gather", gather, tuning, label))
        fresh = [(s, d, kernels.plan_kv_copy(p.src_spec, p.dst_spec, p.src_block_ids, p.dst_block_ids,
                                             num_tokens=p.num_tokens)) for s, d, p in gather]
        out.append(self._row("gather", fresh, DEFAULT_TUNING, "upload/call"))
        return out

    def _row(self, name: str, calls: list[tuple[str, str, Any]], tuning: KernelTuning, label: str) -> dict:
        memory, stream = self.memory, self.stream

        def launch() -> None:
            for src, dst, plan in calls:
                _cuda.copy_kv(memory[src], memory[dst], plan, stream=stream, tuning=tuning)

        payload = sum(plan.nbytes for _, _, plan in calls)
        seconds, host = self._time(launch)
        ceiling = self._ceiling(payload)
        gbps, ceiling_gbps = 2 * payload / seconds / 1e9, 2 * payload / ceiling / 1e9
        fragment = calls[0][2].src_spec.block_nbytes // calls[0][2].src_spec.num_kv_parts
        return dict(op=name, variant=label, payload_mib=payload / 2**20, gbps=gbps, ceiling_gbps=ceiling_gbps,
                    ratio=gbps / ceiling_gbps, target=0.92 if fragment >= 16 << 10 else 0.85, host_us=host * 1e6)

    def _ceiling(self, payload: int) -> float:
        cupy = self.cupy
        src, dst = self._random(payload), cupy.empty(payload, dtype=cupy.uint8)
        kind = cupy.cuda.runtime.memcpyDeviceToDevice
        seconds, _ = self._time(lambda: cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, payload, kind,
                                                                        self.stream.ptr))
        return seconds

    def _time(self, launch: Callable[[], None]) -> tuple[float, float]:
        """(median GPU seconds, median host seconds to enqueue) over ``repeats`` after ``warmup`` calls."""
        cupy = self.cupy
        for _ in range(self.warmup):
            launch()
        self.stream.synchronize()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        gpu, host = [], []
        for _ in range(self.repeats):
            start.record(self.stream)
            begin = time.perf_counter()
            launch()
            host.append(time.perf_counter() - begin)
            end.record(self.stream)
            end.synchronize()
            gpu.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return statistics.median(gpu), statistics.median(host)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print a compact table last; optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m kvxfer.bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write rows and environment to this JSON file")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--fragments", type=int, nargs="+", default=[4, 32, 2048],
                        choices=sorted(BLOCK_SIZE_OF_FRAGMENT), help="fragment sizes in KiB")
    args = parser.parse_args(argv)
    rows = run(num_tokens=args.tokens, fragments_kib=args.fragments, repeats=args.repeats, warmup=args.warmup,
               device=args.device)
    if args.json:
        cupy = _cuda.cupy_module()
        name = cupy.cuda.runtime.getDeviceProperties(args.device)["name"]
        write_json(args.json, {"subcommand": "kernels", "device": name.decode() if isinstance(name, bytes) else name,
                               "rows": rows})
    print_table("KV copy kernels vs device memcpy of the same bytes (GB/s = read + write)", rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
