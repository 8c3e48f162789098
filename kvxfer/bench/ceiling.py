"""Raw ceilings of this machine, measured in the run that reports against them.

- memcpy: ``numpy.copyto`` between two touched host buffers (perf_counter);
- device copy / peer copy: ``cudaMemcpyAsync`` within one GPU / ``cudaMemcpyPeerAsync`` between two (CUDA events);
- pinned h2d / d2h: ``cudaMemcpyAsync`` between page-locked host memory and a GPU (CUDA events);
- ucx_perftest: ``ucp_put_bw`` (WRITE) / ``ucp_get`` (READ) between two processes on loopback, from the libucx
  wheel (or ``$PATH``), when present.

GB/s are 1e9 bytes per second of payload (each byte counted once), from the median of ``repeats`` timed copies
after two warm-up copies.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError
from .cases import device_random

WARMUP = 2


def _row(name: str, path: str, nbytes: int, seconds: list[float], timer: str) -> dict[str, Any]:
    median = float(np.median(seconds))
    return {
        "ceiling": name,
        "path": path,
        "op": "copy",
        "nbytes": nbytes,
        "gbps": nbytes / median / 1e9,
        "median_us": median * 1e6,
        "p99_us": float(np.percentile(seconds, 99)) * 1e6,
        "timer": timer,
    }


def _host_seconds(action: Callable[[], Any], repeats: int) -> list[float]:
    for _ in range(WARMUP):
        action()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return seconds


def memcpy(nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """numpy.copyto of ``nbytes`` between two host buffers (random source, touched destination)."""
    source = np.frombuffer(np.random.default_rng(0).bytes(nbytes), dtype=np.uint8)
    destination = np.ones(nbytes, dtype=np.uint8)
    return _row(
        "memcpy", "host->host", nbytes, _host_seconds(lambda: np.copyto(destination, source), repeats), "perf_counter"
    )


def _cupy() -> Any:
    from ..devices import cupy_module

    return cupy_module()


def _event_seconds(cupy: ModuleType, device: int, launch: Callable[[Any], None], repeats: int) -> list[float]:
    """GPU seconds of ``launch(stream)`` per call, with CUDA events on a stream of ``device``."""
    with cupy.cuda.Device(device):
        stream = cupy.cuda.Stream(non_blocking=True)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        seconds = []
        for attempt in range(WARMUP + repeats):
            start.record(stream)
            launch(stream)
            stop.record(stream)
            stop.synchronize()
            if attempt >= WARMUP:
                seconds.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return seconds


def device_copy(nbytes: int, source: int = 0, destination: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """One contiguous copy from GPU ``source`` to GPU ``destination`` (default: the same GPU)."""
    cupy = _cupy()
    destination = source if destination is None else destination
    src = device_random(nbytes, source, 0)
    with cupy.cuda.Device(destination):
        dst = cupy.ones(nbytes, dtype=cupy.uint8)
    if source == destination:
        kind = cupy.cuda.runtime.memcpyDeviceToDevice

        def copy_local(s: Any) -> None:
            cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, kind, s.ptr)

        return _row(
            "device copy",
            f"cuda:{source}->cuda:{source}",
            nbytes,
            _event_seconds(cupy, source, copy_local, repeats),
            "cuda events",
        )
    with cupy.cuda.Device(destination):
        if cupy.cuda.runtime.deviceCanAccessPeer(destination, source):
            try:
                cupy.cuda.runtime.deviceEnablePeerAccess(source)
            except cupy.cuda.runtime.CUDARuntimeError:
                pass  # already enabled by an earlier call

    def copy_peer(s: Any) -> None:
        cupy.cuda.runtime.memcpyPeerAsync(dst.data.ptr, destination, src.data.ptr, source, nbytes, s.ptr)

    return _row(
        "peer copy",
        f"cuda:{source}->cuda:{destination}",
        nbytes,
        _event_seconds(cupy, destination, copy_peer, repeats),
        "cuda events",
    )


def pinned(nbytes: int, device: int = 0, to_device: bool = True, repeats: int = 10) -> dict[str, Any]:
    """One contiguous copy between page-locked host memory and GPU ``device`` (h2d when ``to_device``)."""
    cupy = _cupy()
    import cupyx

    host = cupyx.empty_pinned(nbytes, dtype=np.uint8)
    host[:] = np.frombuffer(np.random.default_rng(0).bytes(nbytes), dtype=np.uint8)
    with cupy.cuda.Device(device):
        gpu = cupy.ones(nbytes, dtype=cupy.uint8)
    if to_device:
        kind, dst, src, name = cupy.cuda.runtime.memcpyHostToDevice, gpu.data.ptr, host.ctypes.data, "pinned h2d"
        path = f"host->cuda:{device}"
    else:
        kind, dst, src, name = cupy.cuda.runtime.memcpyDeviceToHost, host.ctypes.data, gpu.data.ptr, "pinned d2h"
        path = f"cuda:{device}->host"
    launch = lambda s: cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, kind, s.ptr)  # noqa: E731
    return _row(name, path, nbytes, _event_seconds(cupy, device, launch, repeats), "cuda events")


def path_ceiling(source: str, destination: str, nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """The raw copy a transfer from ``source`` to ``destination`` memory ("host" or "cuda:N") is bounded by."""
    if source == "host" and destination == "host":
        return memcpy(nbytes, repeats)
    if source == "host":
        return pinned(nbytes, int(destination.split(":")[1]), True, repeats)
    if destination == "host":
        return pinned(nbytes, int(source.split(":")[1]), False, repeats)
    return device_copy(nbytes, int(source.split(":")[1]), int(destination.split(":")[1]), repeats)


# ---- ucx_perftest --------------------------------------------------------------------------------------------


def perftest_binary() -> tuple[str, dict[str, str]] | None:
    """(path, environment) of ucx_perftest: the libucx wheel's, else one on $PATH; None when neither exists."""
    try:
        import libucx

        root = os.path.dirname(libucx.__file__)
        binary = os.path.join(root, "bin", "ucx_perftest")
        if os.access(binary, os.X_OK):
            library = os.path.join(root, "lib")
            paths = os.pathsep.join(filter(None, [library, os.environ.get("LD_LIBRARY_PATH")]))
            return binary, dict(os.environ, LD_LIBRARY_PATH=paths)
    except ImportError:
        pass
    found = shutil.which("ucx_perftest")
    return (found, dict(os.environ)) if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def perftest(
    size: int, op: str = "WRITE", memory: str = "host", total: int = 256 << 20, timeout: float = 120.0
) -> dict[str, Any]:
    """ucx_perftest bandwidth of ``size``-byte messages between two local processes (``ucp_put_bw`` for WRITE,
    ``ucp_get`` for READ); ``memory``: "host" or "cuda" (perftest's ``-m``). BackendUnavailableError if absent."""
    found = perftest_binary()
    if found is None:
        raise BackendUnavailableError("ucx_perftest not found (libucx wheel or $PATH)")
    binary, env = found
    test = "ucp_put_bw" if op == "WRITE" else "ucp_get"
    iterations = int(min(100_000, max(20, total // size)))
    for _attempt in range(5):  # the server may not listen yet on the first try
        port = _free_port()
        server = subprocess.Popen(
            [binary, "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(0.3)
            client = subprocess.run(
                [
                    binary,
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-t",
                    test,
                    "-s",
                    str(size),
                    "-n",
                    str(iterations),
                    "-m",
                    f"{memory},{memory}",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        finally:
            server.kill()
            server.wait()
        final = re.search(r"Final:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", client.stdout)
        if final:
            # perftest's "MB/s" column is MiB/s (UCS_MBYTE = 2**20)
            gbps = float(final.group(5)) * (1 << 20) / 1e9
            return {
                "ceiling": f"ucx_perftest {test}",
                "path": f"{memory}->{memory}",
                "op": op,
                "nbytes": size,
                "gbps": gbps,
                "median_us": size / gbps / 1e3,
                "p99_us": None,
                "timer": "ucx_perftest",
            }
    raise BackendUnavailableError(f"ucx_perftest {test} -s {size} gave no result: {client.stderr.strip()[-300:]}")


def measure_all(
    host_nbytes: int = 256 << 20,
    device_nbytes: int = 1 << 30,
    repeats: int = 10,
    perftest_sizes: tuple[int, ...] = (4 << 10, 64 << 10, 1 << 20, 64 << 20),
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every ceiling this machine has: (rows, reasons for the ones skipped)."""
    from ..devices import cuda_available, device_count

    rows, skipped = [], []
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [("memcpy", lambda: memcpy(host_nbytes, repeats))]
    if cuda_available():
        count = device_count()
        steps.append(("device copy", lambda: device_copy(device_nbytes, 0, 0, repeats)))
        if count > 1:
            steps.append(("peer copy", lambda: device_copy(device_nbytes, 0, 1, repeats)))
        else:
            skipped.append("peer copy: one GPU only")
        steps.append(("pinned h2d", lambda: pinned(device_nbytes, 0, True, repeats)))
        steps.append(("pinned d2h", lambda: pinned(device_nbytes, 0, False, repeats)))
    else:
        skipped.append("device copy, peer copy, pinned h2d/d2h: no CUDA device (cupy)")
    if perftest_binary() is None:
        skipped.append("ucx_perftest: not found (libucx wheel or $PATH)")
    else:
        for memory in ("host", "cuda") if cuda_available() else ("host",):
            for size in perftest_sizes:
                for op in ("WRITE", "READ"):
                    run_perftest = functools.partial(perftest, size, op, memory)
                    steps.append((f"ucx_perftest {op} {size} B {memory}", run_perftest))
    for name, step in steps:
        if progress:
            progress(name)
        try:
            rows.append(step())
        except (BackendUnavailableError, subprocess.TimeoutExpired) as error:
            skipped.append(f"{name}: {error}")
    return rows, skipped
