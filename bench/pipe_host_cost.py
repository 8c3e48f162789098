"""Host cost of ``KVPipe.pull`` on a CPU machine: everything pull() does up to the kernel launch, the launch a no-op.

Two agents of this process hold Llama-3.1-8B-shaped caches (host memory, never touched); the decode side's pipe is
forced onto its GPU kernel route with a stand-in for cupy whose CUDA calls do nothing: kernel launches, async copies
and event records return at once, events are always done. So the time measured is kvxfer's Python and NumPy work
per pull (checks, planning or id buffer, ring slot, handle), WITHOUT the CUDA driver's own cost of the launch,
the copy and the event record (a few microseconds each on a real GPU: scripts/pipe_timing.py measures those).

Each pull has its own shuffled block ids, as an engine's requests do. Paths: "tables" (host-built fragment tables,
the route before the block-id kernel) and "ids" (fragment addresses derived on the GPU from block ids), when the
code under test has them (run it on an older checkout through PYTHONPATH for a before/after pair).

    python bench/pipe_host_cost.py [--repeats 3000] [--json bench/results/pipe_host_cost_cpu_<date>.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import types
from typing import Any

import numpy as np

import kvxfer
import kvxfer.devices
from kvxfer import KVPipe
from kvxfer.bench.kv import Setup


class _Pointer(np.ndarray):
    """Host bytes posing as pinned or device memory (``.ptr``)."""

    @property
    def ptr(self) -> int:
        return int(self.ctypes.data)


class _Event:
    done = True

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Stream:
    def __init__(self, non_blocking: bool = False, ptr: int = 1234) -> None:
        self.ptr = ptr

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


_Stream.__module__ = "cupy.cuda.stream"


class _Device:
    def __init__(self, device: int = 0) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass

    def use(self) -> None:
        pass


class _Function:
    num_regs = 40

    def __call__(
        self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], stream: Any = None
    ) -> None:
        pass


class _Module:
    def __init__(self, code: str = "", options: tuple[str, ...] = ()) -> None:
        pass

    def get_function(self, name: str) -> _Function:
        return _Function()


def _buffer(nbytes: int) -> _Pointer:
    return np.zeros(nbytes, dtype=np.uint8).view(_Pointer)


def no_op_cupy() -> types.SimpleNamespace:
    """The parts of cupy kvxfer's kernel route touches, doing nothing."""
    properties = {
        "regsPerMultiprocessor": 65536,
        "maxThreadsPerMultiProcessor": 2048,
        "multiProcessorCount": 132,
        "maxBlocksPerMultiProcessor": 32,
    }
    runtime = types.SimpleNamespace(
        getDeviceProperties=lambda device: properties,
        memcpyHostToDevice=1,
        memcpyAsync=lambda *args: None,
        getDeviceCount=lambda: 1,
    )
    null = _Stream(ptr=0)
    return types.SimpleNamespace(
        RawModule=_Module,
        int64=np.int64,
        empty=lambda shape, dtype: types.SimpleNamespace(set=lambda values, stream=None: None),
        cuda=types.SimpleNamespace(
            Device=_Device,
            Stream=_StreamClass(null),
            Event=lambda block=False, disable_timing=True, interprocess=False: _Event(),
            runtime=runtime,
            get_current_stream=lambda: null,
            alloc_pinned_memory=_buffer,
            alloc=_buffer,
            ExternalStream=lambda ptr, device=0: _Stream(ptr=ptr),
        ),
    )


class _StreamClass:
    """``cupy.cuda.Stream``: callable (a new stream) with a ``null`` attribute."""

    def __init__(self, null: _Stream) -> None:
        self.null = null

    def __call__(self, non_blocking: bool = False) -> _Stream:
        return _Stream(non_blocking)


def _install(fake: types.SimpleNamespace) -> None:
    kvxfer.devices.cupy_module = lambda: fake  # type: ignore[assignment]
    from kvxfer.kernels import _cuda

    _cuda.cupy_module = lambda: fake  # type: ignore[assignment]
    _cuda.clear_caches()
    try:
        from kvxfer.kernels import id_launch

        id_launch.clear_caches()
    except ImportError:  # an older checkout: no block-id kernel
        pass


def _case(name: str, tokens: int, p_tp: int, d_tp: int, repeats: int, path: str) -> dict[str, Any] | None:
    setup = Setup(tokens=tokens, p_tp=p_tp, d_tp=d_tp, backend="local")
    d_spec = setup.spec("d", 0)
    p_specs = [setup.spec("p", rank) for rank in range(p_tp)]
    prefill = [kvxfer.Agent(f"p{rank}", backends=["local"]) for rank in range(p_tp)]
    decode = kvxfer.Agent("d0", backends=["local"])
    try:
        for agent, spec in zip(prefill, p_specs, strict=True):
            agent.register(np.zeros(spec.nbytes, dtype=np.uint8), name="kv")
        decode.register(np.zeros(d_spec.nbytes, dtype=np.uint8), name="kv")
        peers = [decode.connect(agent.metadata()) for agent in prefill]
        for agent in prefill:
            agent.connect(decode.metadata())
        pipe = KVPipe(decode, d_spec, peers, p_specs, strategy="kernel")
        pipe.device = 0  # the GPU kernel route (the cupy stand-in makes its CUDA calls no-ops)
        pipe._launcher.device = 0  # noqa: SLF001 a benchmark forcing the GPU route on host memory
        if path == "tables" and hasattr(pipe, "gpu_addressing"):
            pipe.gpu_addressing = False
        elif path == "ids" and not getattr(pipe, "gpu_addressing", False):
            return None
        rng = np.random.default_rng(7)
        variants = [
            (
                rng.permutation(d_spec.num_blocks)[: -(-tokens // d_spec.block_size)],
                rng.permutation(p_specs[0].num_blocks)[: -(-tokens // p_specs[0].block_size)],
            )
            for _ in range(64)
        ]
        samples, cpu = [], []
        for attempt in range(repeats + 200):
            d_ids, p_ids = variants[attempt % len(variants)]
            start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
            handle = pipe.pull(d_ids, p_ids, notify=b"req")
            cpu.append(time.thread_time_ns() - start_cpu)
            samples.append(time.perf_counter_ns() - start)
            handle.wait(timeout=10)
            handle.release()
        pipe.close()
        timed = np.array(samples[200:]) / 1e3
        cpu_us = np.array(cpu[200:]) / 1e3
        return {
            "case": name,
            "path": path,
            "tokens": tokens,
            "p_tp": p_tp,
            "d_tp": d_tp,
            "routes": len(pipe.routes),
            "pull_us_median": round(float(np.median(timed)), 2),
            "pull_us_p10": round(float(np.percentile(timed, 10)), 2),
            "pull_us_p90": round(float(np.percentile(timed, 90)), 2),
            "pull_thread_cpu_us_median": round(float(np.median(cpu_us)), 2),
            "pull_thread_cpu_us_p10": round(float(np.percentile(cpu_us, 10)), 2),
        }
    finally:
        decode.close()
        for agent in prefill:
            agent.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--label", default="", help="a name for the code under test (e.g. 'before', 'after')")
    args = parser.parse_args()
    _install(no_op_cupy())
    rows = []
    cases = [("4k 1->1", 4096, 1, 1), ("128 1->1", 128, 1, 1), ("4k 1->2", 4096, 1, 2), ("4k 2->1", 4096, 2, 1)]
    for name, tokens, p_tp, d_tp in cases:
        for path in ("tables", "ids"):
            row = _case(name, tokens, p_tp, d_tp, args.repeats, path)
            if row is not None:
                rows.append(row)
                print(
                    f"{name:<9} {path:<7} pull() wall median {row['pull_us_median']:7.1f} us  "
                    f"p10 {row['pull_us_p10']:7.1f}  p90 {row['pull_us_p90']:7.1f};  thread CPU median "
                    f"{row['pull_thread_cpu_us_median']:6.1f} p10 {row['pull_thread_cpu_us_p10']:6.1f}  "
                    "(CUDA calls are no-ops)"
                )
    record = {
        "what": "KVPipe.pull host time from call to return, kernel route, CUDA launch/copy/event calls replaced "
        "by no-ops (a cupy stand-in): kvxfer's own Python+NumPy cost per pull, not the driver's. Wall time and "
        "the calling thread's CPU time (less sensitive to other load on a shared machine)",
        "label": args.label,
        "machine": platform.node(),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as out:
            json.dump(record, out, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
