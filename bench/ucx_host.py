"""Host-memory transfers between two processes on this machine: kvxfer's UCX backend beside ucx_perftest and NIXL.

For each fragment size, the same work for every system: ``--total`` bytes in fragments at random, distinct block
offsets of a pool twice that size on each side, moved as one transfer (READ and WRITE), best and median of
``--repeats`` timed runs after a warm-up. ``ucx_perftest -t ucp_put_bw`` / ``ucp_get`` (the libucx wheel's, same
library, default transports) gives the ceiling per message size. Also: 4 KiB round trip (write + notification,
answered by write + notification) p50. GB/s = 1e9 bytes/s.

    python bench/ucx_host.py                    # full run (a few minutes), JSON into bench/results/
    python bench/ucx_host.py --sizes 4096 1048576 --total 16777216 --systems kvxfer
    python bench/ucx_host.py --memory cuda      # GPU0 -> GPU1 (GPU0 -> GPU0 with one GPU), JSON ucx_cuda_<date>
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import re
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ucx_host_sides import serve

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
# name -> (side, UcxConfig settings for kvxfer)
SYSTEMS = {"kvxfer": ("kvxfer", {}), "kvxfer-ucx": ("kvxfer", {"cma": "off"}), "nixl": ("nixl", {})}
ENVIRON = {"UCX_MEM_MMAP_HOOK_MODE": "none"}  # host memory needs no mmap hooks; saves 0.4 s per start


class Child:
    """One side of a pair in its own process (so two UCX builds never share a process)."""

    def __init__(self, system: str, name: str, pool_nbytes: int, settings: dict[str, Any], device: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        environ = ENVIRON if device < 0 else {}
        self.process = context.Process(
            target=serve, args=(child, system, name, pool_nbytes, settings, environ, device), daemon=True
        )
        self.process.start()
        self.metadata = self.answer(120)

    def call(self, *command: Any, timeout: float = 600) -> Any:
        self.connection.send(command)
        return self.answer(timeout)

    def answer(self, timeout: float = 600) -> Any:
        if not self.connection.poll(timeout):
            raise TimeoutError("benchmark child did not answer")
        result = self.connection.recv()
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        try:
            self.call("close", timeout=30)
        except (OSError, EOFError, RuntimeError):  # no answer, pipe gone, or its close failed: killed below
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def workload(sizes: list[int], total: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per fragment size: (initiator offsets, target offsets), int64[n] byte offsets into a 2 x total pool."""
    rng = np.random.default_rng(seed)
    work = {}
    for size in sizes:
        slots = max(2, 2 * total // size)
        count = max(1, total // size)
        work[size] = (rng.choice(slots, count, replace=False) * size, rng.choice(slots, count, replace=False) * size)
    return work


def run_system(
    label: str, work: dict, pool_nbytes: int, repeats: int, pingpongs: int, devices: tuple[int, int] = (-1, -1)
) -> dict[str, Any]:
    """Time ``work`` with system ``label``; ``devices``: (initiator, target) CUDA devices, -1 for host memory."""
    system, settings = SYSTEMS[label]
    target = Child(system, f"{label}-target", pool_nbytes, settings, devices[1])
    initiator = Child(system, f"{label}-initiator", pool_nbytes, settings, devices[0])
    try:
        lanes = initiator.call("connect", *target.metadata)
        target.call("connect", *initiator.metadata)
        result: dict[str, Any] = {"lanes": lanes, "sizes": {}}
        for size, (local_offsets, remote_offsets) in work.items():
            path = initiator.call("prepare", str(size), size, local_offsets, remote_offsets)
            entry = {"path": path, "nbytes": int(len(local_offsets) * size)}
            for op in ("READ", "WRITE"):
                times = initiator.call("time", str(size), op, repeats)
                entry[op] = {
                    "best_gbps": entry["nbytes"] / min(times) / 1e9,
                    "median_gbps": entry["nbytes"] / float(np.median(times)) / 1e9,
                }
            result["sizes"][size] = entry
            print(
                f"  {label:11s} {size >> 10:>6} KiB  {path:7s} READ {entry['READ']['median_gbps']:6.2f}  "
                f"WRITE {entry['WRITE']['median_gbps']:6.2f} GB/s",
                flush=True,
            )
        block = np.zeros(1, dtype=np.int64)
        initiator.call("prepare", "pp", 4096, block, block)
        target.call("prepare", "pp", 4096, block, block)
        target.call("pong", "pp", pingpongs + 100)
        round_trips = np.array(initiator.call("ping", "pp", pingpongs + 100)[100:]) * 1e6
        single = np.array(initiator.call("time", "pp", "WRITE", pingpongs)) * 1e6
        result["latency_us"] = {
            "round_trip_4k_p50": float(np.percentile(round_trips, 50)),
            "round_trip_4k_p99": float(np.percentile(round_trips, 99)),
            "write_4k_p50": float(np.percentile(single, 50)),
        }
        print(
            f"  {label:11s} 4 KiB round trip p50 {result['latency_us']['round_trip_4k_p50']:.1f} us, "
            f"write p50 {result['latency_us']['write_4k_p50']:.1f} us",
            flush=True,
        )
        return result
    finally:
        initiator.close()
        target.close()


def perftest(sizes: list[int], total: int, cuda: bool = False) -> dict[int, dict[str, float]]:
    """ucx_perftest bandwidth (GB/s) per message size: ucp_put_bw (WRITE) and ucp_get (READ)."""
    import libucx

    root = os.path.dirname(libucx.__file__)
    binary = os.path.join(root, "bin", "ucx_perftest")
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(root, "lib"), **({} if cuda else ENVIRON))
    results: dict[int, dict[str, float]] = {}
    for size in sizes:
        results[size] = {}
        for op, test in (("WRITE", "ucp_put_bw"), ("READ", "ucp_get")):
            port = _free_port()
            server = subprocess.Popen(
                [binary, "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                time.sleep(0.5)
                iterations = max(20, min(100000, 4 * total // size))
                memory = ["-m", "cuda"] if cuda else []
                output = subprocess.run(
                    [binary, "127.0.0.1", "-p", str(port), "-t", test, "-s", str(size), "-n", str(iterations), *memory],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                final = re.search(r"Final:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output.stdout)
                # ucx_perftest's "MB/s" are MiB/s (UCS_MBYTE = 2**20)
                results[size][op] = float(final.group(5)) * (1 << 20) / 1e9 if final else float("nan")
            finally:
                server.kill()
                server.wait()
        print(
            f"  perftest    {size >> 10:>6} KiB          READ {results[size]['READ']:6.2f}  "
            f"WRITE {results[size]['WRITE']:6.2f} GB/s",
            flush=True,
        )
    return results


def _gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except (ImportError, RuntimeError):  # no cupy, or no CUDA driver / device (CUDARuntimeError is a RuntimeError)
        return 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def table(report: dict[str, Any]) -> str:
    """A compact text table: GB/s (median) per size, op and system, with kvxfer's ratios."""
    systems = [s for s in report["systems"] if "sizes" in report["systems"][s]]
    head = ["size", "op"] + systems + (["perftest"] if report.get("perftest") else [])
    head += ["kvxfer/perftest", "kvxfer/nixl"]
    rows = [head]
    for size in report["sizes"]:
        for op in ("READ", "WRITE"):
            row = [f"{size >> 10} KiB", op]
            values = {s: report["systems"][s]["sizes"][size][op]["median_gbps"] for s in systems}
            row += [f"{values[s]:.2f}" for s in systems]
            ceiling = report.get("perftest", {}).get(size, {}).get(op)
            if report.get("perftest"):
                row.append(f"{ceiling:.2f}")
            row.append(f"{values['kvxfer'] / ceiling:.2f}" if ceiling and "kvxfer" in values else "-")
            row.append(f"{values['kvxfer'] / values['nixl']:.2f}" if "nixl" in values and "kvxfer" in values else "-")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    for system in systems:
        latency = report["systems"][system].get("latency_us", {})
        lines.append(
            f"{system}: 4 KiB round trip p50 {latency.get('round_trip_4k_p50', float('nan')):.1f} us, "
            f"4 KiB write p50 {latency.get('write_4k_p50', float('nan')):.1f} us; lanes "
            f"{report['systems'][system].get('lanes')}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--total", type=int, default=256 << 20, help="bytes per transfer (default 256 MiB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pingpongs", type=int, default=2000)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--skip-perftest", action="store_true")
    parser.add_argument("--memory", choices=["host", "cuda"], default="host")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/ucx_host_<date>.json)")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    work = workload(sizes, args.total, seed=1234)
    pool_nbytes = max(2 * args.total, 2 * max(sizes))
    devices = (-1, -1) if args.memory == "host" else (0, 1 if _gpu_count() > 1 else 0)
    report: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now().isoformat(),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "total_nbytes": args.total,
        "repeats": args.repeats,
        "sizes": sizes,
        "memory": args.memory,
        "devices": devices,
        "systems": {},
    }
    for label in args.systems:
        print(f"{label}:", flush=True)
        try:
            report["systems"][label] = run_system(label, work, pool_nbytes, args.repeats, args.pingpongs, devices)
        except Exception as error:  # noqa: BLE001 one system failing (e.g. NIXL not installed) must not stop the others: reported
            report["systems"][label] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            print(f"  {label} failed: {report['systems'][label]['error']}", flush=True)
    if not args.skip_perftest:
        print("ucx_perftest:", flush=True)
        report["perftest"] = perftest(sizes, args.total, cuda=args.memory == "cuda")
    stem = "ucx_host" if args.memory == "host" else "ucx_cuda"
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"{stem}_{datetime.date.today().isoformat()}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as file:
        json.dump(report, file, indent=1, default=str)
    print(table(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
