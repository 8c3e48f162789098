"""kvxfer.bench.kernels run end to end on a stand-in for cupy whose kernels run the host emulation (no GPU).

Checks the benchmark's plumbing before the one GPU run that times it: every row and variant launches, each launch
still copies the right bytes, the timing loop queues spin / start / launch / end in that order, JSON is written.
"""

from __future__ import annotations

import ctypes
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvxfer.bench import kernels as bench
from kvxfer.kernels import _cuda, reference
from kvxfer.kernels.launch import KernelTuning
from tests.kernels import emulator as emulation

pytestmark = pytest.mark.timeout(300)


class Array:
    """Host bytes posing as a cupy array (1-D)."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = host
        self.nbytes = host.nbytes
        self.shape = host.shape
        self.data = types.SimpleNamespace(ptr=host.ctypes.data)

    def set(self, values: np.ndarray, stream: Any = None) -> None:
        self.host[...] = values


class HostBuffer(np.ndarray):
    """Host bytes posing as pinned or device memory (cupy's alloc_pinned_memory / alloc: ``.ptr``, a buffer)."""

    @property
    def ptr(self) -> int:
        return int(self.ctypes.data)


def host_buffer(nbytes: int) -> HostBuffer:
    return np.zeros(nbytes, dtype=np.uint8).view(HostBuffer)


class Stream:
    def __init__(self, ptr: int = 0) -> None:
        self.ptr = ptr

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


Stream.__module__ = "cupy.cuda.stream"


class BenchCupy:
    """The parts of cupy that kvxfer.bench.kernels and kvxfer.kernels._cuda touch; records the queue."""

    uint8, int64 = np.uint8, np.int64

    def __init__(self, directory: Path) -> None:
        self.directory, self.libraries, self.queue = directory, {}, []
        outer = self

        class Device:
            def __init__(self, device: int) -> None:
                assert device == 0

            def __enter__(self) -> None:
                return None

            def __exit__(self, *exc: Any) -> None:
                return None

        class Event:
            def __init__(self, block: bool = False, disable_timing: bool = False) -> None:
                self.done = False

            def record(self, stream: Any) -> None:
                outer.queue.append(("event", stream.ptr))

            def synchronize(self) -> None:
                return None

        class Kernel:
            num_regs = 40

            def __init__(self, name: str, defines: tuple[str, ...]) -> None:
                self.name, self.defines = name, defines

            def __call__(self, grid: tuple, block: tuple, args: tuple, stream: Any = None) -> None:
                outer.queue.append((self.name, stream.ptr if stream is not None else 0))
                outer.run(self, grid, block, args)

        class RawModule:
            def __init__(self, code: str, options: tuple = ()) -> None:
                self.defines = tuple(o for o in options if o.startswith("-D"))

            def get_function(self, name: str) -> Kernel:
                return Kernel(name, self.defines)

        runtime = types.SimpleNamespace(
            memcpyDeviceToDevice=3,
            deviceSynchronize=lambda: None,
            getDeviceProperties=lambda device: {
                "name": b"emulated",
                "regsPerMultiprocessor": 65536,
                "maxThreadsPerMultiProcessor": 2048,
                "multiProcessorCount": 2,
                "maxBlocksPerMultiProcessor": 32,
            },
            memcpyAsync=self.memcpy,
            memcpyHostToDevice=1,
        )
        streams = iter(range(1000, 2000))

        def new_stream(non_blocking: bool = False) -> Stream:
            return Stream(next(streams))

        new_stream.null = Stream(0)  # type: ignore[attr-defined]
        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(
            Device=Device,
            Stream=new_stream,
            Event=Event,
            runtime=runtime,
            get_current_stream=lambda: Stream(0),
            get_elapsed_time=lambda start, end: 1.0,
            alloc_pinned_memory=host_buffer,
            alloc=host_buffer,
        )
        self.pool = types.SimpleNamespace(free_all_blocks=lambda: None)

    def get_default_memory_pool(self) -> Any:
        return self.pool

    def empty(self, shape: Any, dtype: Any) -> Array:
        return Array(np.zeros(shape, dtype=dtype))

    def asarray(self, values: np.ndarray) -> Array:
        return Array(np.array(values))

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.queue.append(("memcpy", stream))
        ctypes.memmove(dst, src, nbytes)

    def run(self, kernel: Any, grid: tuple, block: tuple, args: tuple) -> None:
        if kernel.name == "kvxfer_bench_spin":
            return
        if kernel.name == "kvxfer_bench_fill":
            words = args[0].host.view(np.uint32)[: int(args[1])]
            words[:] = (np.arange(words.size, dtype=np.uint64) * 2654435761 % 2**32).astype(np.uint32)
            return
        lib = self.libraries.get(kernel.defines)
        if lib is None:
            tuning = _tuning_of(kernel.defines)
            directory = self.directory / f"tuning{len(self.libraries)}"
            directory.mkdir()
            lib = self.libraries[kernel.defines] = emulation.build(directory, tuning)
        src, dst, table, *scalars = args
        span = (0, 2**63)
        table_ptr = int(table) if isinstance(table, np.integer) else table.data.ptr  # table slot or array
        assert (
            emulation.launch(lib, kernel.name, grid[0], block[0], int(src), int(dst), span, span, table_ptr, scalars)
            == 0
        )


def _tuning_of(defines: tuple[str, ...]) -> KernelTuning:
    values = dict(d[2:].split("=") for d in defines)
    return KernelTuning(
        unroll=int(values["KVXFER_UNROLL"]),
        threads=int(values["KVXFER_THREADS"]),
        prefetch=values["KVXFER_PREFETCH"] == "1",
        min_ctas=int(values["KVXFER_MIN_CTAS"]),
        streaming=values["KVXFER_STREAMING"] == "1",
    )


@pytest.fixture
def bench_cupy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BenchCupy]:
    if emulation.build(tmp_path) is None:
        pytest.skip("needs a C++ compiler (g++)")
    fake = BenchCupy(tmp_path)
    monkeypatch.setattr("kvxfer.devices.cupy_module", lambda: fake)
    monkeypatch.setattr(_cuda, "cupy_module", lambda: fake)
    _cuda.clear_caches()
    yield fake
    _cuda.clear_caches()


def test_every_row_launches_and_copies_the_right_bytes(
    bench_cupy: BenchCupy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = []
    original = bench._Bench._row

    def checked_row(self: Any, name: str, calls: list, tuning: KernelTuning, label: str) -> dict:
        for _, dst, _ in calls:
            self.memory[dst].host[:] = 0
        row = original(self, name, calls, tuning, label)
        expected = {dst: np.zeros_like(self.memory[dst].host) for _, dst, _ in calls}
        for src, dst, plan in calls:  # what the timed launches left behind (TP merge: two into one)
            reference.copy_kv(self.memory[src].host, expected[dst], plan)
        for dst, bytes_ in expected.items():
            np.testing.assert_array_equal(self.memory[dst].host, bytes_, err_msg=f"{name} {label}")
        checked.append((name, label))
        return row

    monkeypatch.setattr(bench._Bench, "_row", checked_row)
    monkeypatch.setattr(bench._Timer, "warm_clocks", lambda self, seconds: self.memcpy())
    rows = bench.run(2048, (4, 32, 2048), repeats=2, warmup=1, num_layers=1)
    per_fragment = 6 + sum(len(v) for v in bench.VARIANT_OPS.values()) + 1
    assert len(rows) == len(checked) == 3 * per_fragment
    assert {r["fragment_kib"] for r in rows} == {4, 32, 2048}
    assert all(r["gbps"] > 0 and r["ratio"] > 0 and r["late"] == 0 for r in rows)
    entries = {(r["op"], r["variant"]): r["entry"] for r in rows if r["fragment_kib"] == 32}
    assert entries[("tp split 1->2", "default")] == "run_v16"
    assert entries[("tp split 1->2", "no run entry")] == "rows_v16"
    assert entries[("gather", "default")] == entries[("NHD->HND", "default")] == "rows_v16"
    # each timed repeat: spin, start event, the launch(es), end event; all on the timer's stream
    queue = bench_cupy.queue
    spins = [i for i, item in enumerate(queue) if item[0] == "kvxfer_bench_spin"]
    assert spins and all(
        queue[i + 1][0] == "event" and queue[i + 2][0] in ("memcpy", "kvxfer_rows_v16", "kvxfer_run_v16") for i in spins
    )
    assert {item[1] for item in queue if item[0] != "kvxfer_bench_fill"} == {1000}
    verdicts = bench.summary(rows)
    assert verdicts[0]["variant"] == "default" and all(v["rows"] > 0 for v in verdicts)


def test_quick_mode_and_json(
    bench_cupy: BenchCupy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(bench._Timer, "warm_clocks", lambda self, seconds: self.memcpy())
    out = tmp_path / "kernels.json"
    assert bench.main(["--quick", "--tokens", "64", "--json", str(out), "--repeats", "2"]) == 0
    document = json.loads(out.read_text())
    assert document["device"] == "emulated" and document["method"]["repeats"] == 2
    rows = document["rows"]
    assert {r["fragment_kib"] for r in rows} == {32}
    assert {r["variant"] for r in rows} == {"default", "1 wave", "no run entry", "upload/call"}
    assert "Per variant" in capsys.readouterr().out


def test_without_a_gpu_main_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from kvxfer.errors import BackendUnavailableError

    def unavailable() -> None:
        raise BackendUnavailableError("no device here")

    monkeypatch.setattr(_cuda, "cupy_module", unavailable)
    out = tmp_path / "kernels.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    assert "skipped: needs a CUDA GPU" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == []
