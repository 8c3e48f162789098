"""KV copy kernel bandwidth on one GPU, each row beside a device memcpy of the same bytes in the same run.

Payload: a Llama-3.1-8B-shaped request (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB a token), ``--gib``
GiB per row (default 2: 16384 tokens), in random blocks of a pool twice that size (far beyond L2). Fragment =
bytes of one (layer, block, K/V part) box of the full cache: 4 KiB (2-token blocks), 32 KiB (16-token blocks, the
real Llama case), 2 MiB (1024-token blocks). Bandwidth = (bytes read + bytes written) / GPU time.

Method: about half a second of device copies first (clocks up); each configuration runs ``--warmup`` times before
it is timed; each timed repeat queues a spin kernel that holds the stream (at least 1 ms, and 10x the median
warm-up enqueue time), then a start event, the launch(es), an end event, so the events time GPU work only: tables
are uploaded and plans built before, and the host's enqueue time (``host_us``, reported apart) hides behind the spin.
``late`` counts repeats whose spin had ended before the host finished queueing (their time may include host time;
expect 0). GPU time is the median of ``--repeats``. ``ceiling`` is cudaMemcpyAsync of the same payload between two
contiguous buffers, timed the same way for every row; ``ratio`` = gbps / ceiling_gbps, against ``target`` (issue 3:
0.92 at fragments >= 16 KiB, 0.85 at 4 KiB).

``variant``: "default" is DEFAULT_TUNING (every call's launch); other rows re-time one operation with a VARIANTS
tuning (pick a default from them: launch.DEFAULT_TUNING), and "upload/call" with its tables uploaded on each call.
``entry`` names the kernel entry the launch took (run: contiguous boxes, no index math; rows: strided rows).
TP rows time both ranks' launches together. Peak device memory about 9x the payload (18 GiB at --gib 2).

    python -m kvxfer.bench.kernels [--quick] [--json PATH] [--gib G] [--repeats N] [--fragments KIB ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from .. import kernels
from ..errors import BackendUnavailableError
from ..kernels import _cuda
from ..kernels.launch import DEFAULT_TUNING, RUN_TUNING, KernelTuning
from ..spec import KVCacheSpec, KVLayout
from .report import print_table, write_json

#: Fragment (source box) size in KiB -> block size giving it with 8 heads x 128 x bf16.
BLOCK_SIZE_OF_FRAGMENT = {4: 2, 32: 16, 2048: 1024}
#: Tunings timed beside the default (label -> tuning), and the operations each is timed on.
VARIANTS = {
    "per-box grid": KernelTuning(),
    "1 wave": KernelTuning(waves=1.0),
    "run: 128 x unroll 8": KernelTuning(threads=128, unroll=8),
    "run: 512 threads": KernelTuning(threads=512),
    "threads 128": KernelTuning(threads=128),
    "unroll 8": KernelTuning(unroll=8),
    "unroll 2": KernelTuning(unroll=2),
    "no run entry": KernelTuning(runs=False),
    "cs hints": KernelTuning(streaming=True),
}
VARIANT_OPS = {
    "gather": ("per-box grid", "threads 128", "unroll 8"),
    "NHD->HND": ("per-box grid", "threads 128"),
    "tp split 1->2": ("no run entry", "run: 128 x unroll 8", "run: 512 threads", "unroll 8"),
    "tp merge 2->1": ("run: 128 x unroll 8", "unroll 8"),
}
QUICK_VARIANT_OPS = {"gather": ("1 wave",), "tp split 1->2": ("no run entry",)}
COLUMNS = ("op", "fragment_kib", "variant", "entry", "gbps", "ceiling_gbps", "ratio", "target", "host_us", "late")
_HELPERS = r"""
extern "C" __global__ void kvxfer_bench_spin(unsigned long long ns) {  // holds its stream for ns nanoseconds
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
}
extern "C" __global__ void kvxfer_bench_fill(unsigned int* words, unsigned long long n) {  // a non-constant pattern
    for (unsigned long long i = blockIdx.x * 256ull + threadIdx.x; i < n; i += gridDim.x * 256ull) {
        words[i] = (unsigned int)(i * 2654435761ull);
    }
}
"""


def run(
    num_tokens: int | None = None,
    fragments_kib: Sequence[int] = (4, 32, 2048),
    repeats: int = 20,
    warmup: int = 3,
    device: int = 0,
    *,
    gib: float = 2.0,
    num_layers: int = 32,
    variant_ops: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Measure every operation at every fragment size; returns one dict per row (see COLUMNS).

    ``num_tokens`` (default: ``gib`` GiB of the Llama-shaped cache, a multiple of 1024) tokens per row;
    ``variant_ops``: op -> VARIANTS labels to time it with (default VARIANT_OPS).
    """
    from ..devices import cupy_module

    cupy = cupy_module()
    per_token = num_layers * 2 * 8 * 128 * 2
    if num_tokens is None:
        num_tokens = max(1024, int(gib * 2**30) // per_token // 1024 * 1024)
    rows: list[dict[str, Any]] = []
    with cupy.cuda.Device(device):
        timer = _Timer(cupy, num_tokens * per_token, repeats, warmup)
        timer.warm_clocks(0.5)
        for fragment in fragments_kib:
            bench = _Bench(cupy, timer, device, num_tokens, BLOCK_SIZE_OF_FRAGMENT[fragment], num_layers)
            rows += [
                dict(fragment_kib=fragment, **row)
                for row in bench.rows(VARIANT_OPS if variant_ops is None else variant_ops)
            ]
            del bench
            cupy.get_default_memory_pool().free_all_blocks()
    return rows


class _Timer:
    """GPU-only timings of queued work on one stream, and the memcpy ceiling of ``payload`` bytes."""

    def __init__(self, cupy: ModuleType, payload: int, repeats: int, warmup: int) -> None:
        self.cupy, self.repeats, self.warmup = cupy, repeats, warmup
        self.stream = cupy.cuda.Stream(non_blocking=True)
        helpers = cupy.RawModule(code=_HELPERS)
        self.spin, self.fill = helpers.get_function("kvxfer_bench_spin"), helpers.get_function("kvxfer_bench_fill")
        self.copy_src, self.copy_dst = self.filled(payload), cupy.empty(payload, dtype=cupy.uint8)

    def filled(self, nbytes: int) -> Any:
        """uint8[nbytes] on the current device, filled with a cheap non-constant pattern."""
        data = self.cupy.empty(nbytes, dtype=self.cupy.uint8)
        self.fill((1024,), (256,), (data, np.uint64(nbytes // 4)))
        self.cupy.cuda.runtime.deviceSynchronize()
        return data

    def memcpy(self) -> None:
        """One device-to-device copy of the ceiling buffers on the stream."""
        runtime = self.cupy.cuda.runtime
        runtime.memcpyAsync(
            self.copy_dst.data.ptr,
            self.copy_src.data.ptr,
            self.copy_src.nbytes,
            runtime.memcpyDeviceToDevice,
            self.stream.ptr,
        )

    def warm_clocks(self, seconds: float) -> None:
        """Keep the GPU busy with copies for ``seconds`` so clocks are up before the first row."""
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(4):
                self.memcpy()
            self.stream.synchronize()

    def time(self, launch: Callable[[], None]) -> dict[str, float]:
        """Median GPU seconds of ``launch`` (events around it alone), median host enqueue seconds, late repeats."""
        cupy, stream = self.cupy, self.stream
        enqueue = []
        for _ in range(self.warmup):
            begin = time.perf_counter()
            launch()
            enqueue.append(time.perf_counter() - begin)
        stream.synchronize()
        # the first call may compile: the median enqueue time sizes the spin
        spin_ns = np.uint64(min(20e6, max(1e6, 10e9 * statistics.median(enqueue or [0.0]))))
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        gpu, host, late = [], [], 0
        for _ in range(self.repeats):
            self.spin((1,), (1,), (spin_ns,), stream=stream)
            start.record(stream)
            begin = time.perf_counter()
            launch()
            host.append(time.perf_counter() - begin)
            end.record(stream)
            late += int(start.done)  # the spin ended before everything was queued
            end.synchronize()
            gpu.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return {"seconds": statistics.median(gpu), "host": statistics.median(host), "late": late}


class _Bench:
    """The buffers and plans of one fragment size, and their rows."""

    def __init__(
        self, cupy: ModuleType, timer: _Timer, device: int, num_tokens: int, block_size: int, num_layers: int
    ) -> None:
        self.cupy, self.timer, self.device, self.tokens = cupy, timer, device, num_tokens
        rng = np.random.default_rng(block_size)
        blocks = -(-num_tokens // block_size)
        self.hnd = KVCacheSpec(
            num_layers=num_layers,
            num_blocks=blocks * 2,
            block_size=block_size,
            num_kv_heads=8,
            head_dim=128,
            layout=KVLayout.HND,
        )
        self.nhd = self.hnd.replace(layout=KVLayout.NHD)
        self.ranks = [self.hnd.replace(num_kv_heads=4, tp_size=2, tp_rank=r) for r in range(2)]
        self.staging = kernels.staging_spec(self.hnd, num_tokens)
        self.ids = [rng.permutation(self.hnd.num_blocks)[:blocks] for _ in range(3)]
        self.memory = {
            name: timer.filled(spec.nbytes)
            for name, spec in (
                ("hnd", self.hnd),
                ("nhd", self.nhd),
                ("staging", self.staging),
                ("rank0", self.ranks[0]),
                ("rank1", self.ranks[1]),
            )
        }

    def _plan(self, src: KVCacheSpec, dst: KVCacheSpec, src_ids: Any, dst_ids: Any, **heads: Any) -> Any:
        plan = kernels.plan_kv_copy(src, dst, src_ids, dst_ids, num_tokens=self.tokens, **heads)
        return kernels.upload_plan(plan, self.device)

    def operations(self) -> dict[str, list[tuple[str, str, Any]]]:
        """name -> [(src buffer, dst buffer, plan), ...]: the launches one row times together."""
        hnd, ids = self.hnd, self.ids
        return {
            "gather": [("hnd", "staging", self._plan(hnd, self.staging, ids[0], [0]))],
            "scatter": [("staging", "hnd", self._plan(self.staging, hnd, [0], ids[1]))],
            "tp split 1->2": [
                ("hnd", f"rank{r}", self._plan(hnd, rank, ids[0], ids[1], src_heads=rank.head_range()))
                for r, rank in enumerate(self.ranks)
            ],
            "tp merge 2->1": [
                (f"rank{r}", "hnd", self._plan(rank, hnd, ids[1], ids[2], dst_heads=rank.head_range()))
                for r, rank in enumerate(self.ranks)
            ],
            "NHD->HND": [("nhd", "hnd", self._plan(self.nhd, hnd, ids[0], ids[2]))],
            "HND->NHD": [("hnd", "nhd", self._plan(hnd, self.nhd, ids[1], ids[0]))],
        }

    def rows(self, variant_ops: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
        operations = self.operations()
        out = [self._row(name, calls, None, "default") for name, calls in operations.items()]
        for name, labels in variant_ops.items():
            out += [self._row(name, operations[name], VARIANTS[label], label) for label in labels]
        fresh = [
            (
                s,
                d,
                kernels.plan_kv_copy(p.src_spec, p.dst_spec, p.src_block_ids, p.dst_block_ids, num_tokens=p.num_tokens),
            )
            for s, d, p in operations["gather"]
        ]
        out.append(self._row("gather", fresh, None, "upload/call"))
        return out

    def _row(self, name: str, calls: list[tuple[str, str, Any]], tuning: KernelTuning | None, label: str) -> dict:
        memory, stream = self.memory, self.timer.stream
        pointers = [
            (memory[s].data.ptr, memory[s].nbytes, memory[d].data.ptr, memory[d].nbytes, plan) for s, d, plan in calls
        ]

        def launch() -> None:
            for src, src_nbytes, dst, dst_nbytes, plan in pointers:
                _cuda.copy_kv_pointers(
                    src, src_nbytes, dst, dst_nbytes, plan, device=self.device, stream=stream, tuning=tuning
                )

        payload = sum(plan.nbytes for _, _, plan in calls)
        kernel = self.timer.time(launch)
        ceiling = self.timer.time(self.timer.memcpy)  # the timer's buffers hold one row's payload
        gbps, ceiling_gbps = 2 * payload / kernel["seconds"] / 1e9, 2 * payload / ceiling["seconds"] / 1e9
        first = pointers[0]
        entry = _cuda.launch_of(first[4], first[0], first[2], self.device, tuning).entry
        fragment = self.hnd.block_nbytes // self.hnd.num_kv_parts
        return dict(
            op=name,
            variant=label,
            entry=entry.replace("kvxfer_", ""),
            payload_mib=payload / 2**20,
            gbps=gbps,
            ceiling_gbps=ceiling_gbps,
            ratio=gbps / ceiling_gbps,
            target=0.92 if fragment >= 16 << 10 else 0.85,
            host_us=kernel["host"] * 1e6,
            late=kernel["late"] + ceiling["late"],
            gpu_us=kernel["seconds"] * 1e6,
        )


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: the worst ratio - target over its rows, and its mean ratio gain over the default rows."""
    default = {(r["op"], r["fragment_kib"]): r["ratio"] for r in rows if r["variant"] == "default"}
    out = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == label]
        gains = [r["ratio"] - default[(r["op"], r["fragment_kib"])] for r in mine]
        out.append(
            dict(
                variant=label,
                rows=len(mine),
                worst_margin=min(r["ratio"] - r["target"] for r in mine),
                mean_gain_vs_default=statistics.mean(gains),
                meets_targets=all(r["ratio"] >= r["target"] for r in mine),
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the rows, then a per-variant summary; optionally write JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m kvxfer.bench.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write rows and environment to this JSON file")
    parser.add_argument(
        "--quick", action="store_true", help="32 KiB fragments, 1 GiB rows, two variants, 10 repeats (about 20 s)"
    )
    parser.add_argument("--gib", type=float, default=2.0, help="payload per row in GiB (default 2)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per row instead of --gib")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument(
        "--fragments",
        type=int,
        nargs="+",
        default=None,
        choices=sorted(BLOCK_SIZE_OF_FRAGMENT),
        help="fragment sizes in KiB (default 4 32 2048)",
    )
    args = parser.parse_args(argv)
    fragments = args.fragments or ([32] if args.quick else [4, 32, 2048])
    gib, repeats = (1.0, min(args.repeats, 10)) if args.quick else (args.gib, args.repeats)
    started = time.perf_counter()
    try:
        _cuda.cupy_module()
    except BackendUnavailableError as error:
        print(f"kvxfer.bench.kernels skipped: needs a CUDA GPU: {error}")
        if args.json:
            write_json(args.json, {"subcommand": "kernels", "skipped": str(error), "rows": []})
        return 0
    rows = run(
        args.tokens,
        fragments,
        repeats,
        args.warmup,
        args.device,
        gib=gib,
        variant_ops=QUICK_VARIANT_OPS if args.quick else None,
    )
    verdicts = summary(rows)
    if args.json:
        cupy = _cuda.cupy_module()
        name = cupy.cuda.runtime.getDeviceProperties(args.device)["name"]
        write_json(
            args.json,
            {
                "subcommand": "kernels",
                "device": name.decode() if isinstance(name, bytes) else name,
                "method": {
                    "gib": gib,
                    "repeats": repeats,
                    "warmup": args.warmup,
                    "default_tuning": repr(DEFAULT_TUNING),
                },
                "rows": rows,
                "summary": verdicts,
                "seconds": time.perf_counter() - started,
            },
        )
    print_table(
        "KV copy kernels vs device memcpy of the same bytes (GB/s = read + write, GPU time only)", rows, COLUMNS
    )
    print_table(f"Per variant (default = {DEFAULT_TUNING}, run entries {RUN_TUNING})", verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
