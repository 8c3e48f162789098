"""kvxfer/kernels/_cuda.py driven through a stand-in for cupy whose kernel launches run the host emulation.

No GPU here: "device" arrays are host memory behind ``__cuda_array_interface__``. This checks what the launcher
does around the kernel: dispatch, argument order and C types, table upload and caching, streams, grid caps.
"""

from __future__ import annotations

import ctypes
import types
from typing import Any, Iterator

import numpy as np
import pytest

import kvxfer.kernels as kernels
from kvxfer.errors import ConfigError
from kvxfer.kernels import _cuda, reference
from kvxfer.kernels.launch import DEFAULT_TUNING, KernelTuning, default_tuning
from kvxfer.spec import KVCacheSpec
from tests.kernels import emulator as emulation
from tests.kernels.cases import random_bytes, random_case, random_spec

pytestmark = pytest.mark.timeout(120)

_C_TYPES = (np.int32, np.int32, np.uint32, np.uint32, np.int32, np.int32, np.int64, np.int64, np.int64, np.int64,
            np.uint32, np.uint32, np.uint32, np.uint32, np.int32)


class FakeDeviceArray:
    """Host bytes posing as device memory of GPU 0."""

    def __init__(self, data: np.ndarray) -> None:
        self.host = data
        self.device = types.SimpleNamespace(id=0)
        self.nbytes = data.nbytes

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"data": (self.host.ctypes.data, False), "shape": self.host.shape, "typestr": self.host.dtype.str,
                "version": 3}

    def set(self, values: np.ndarray, stream: Any = None) -> None:
        self.host[...] = values


class FakeStream:
    def __init__(self, ptr: int, device: int = 0) -> None:
        self.ptr, self.device_id = ptr, device

    def __enter__(self) -> "FakeStream":
        FakeCupy.current.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        FakeCupy.current.pop()

    def synchronize(self) -> None:
        pass


FakeStream.__module__ = "cupy.cuda.stream"


class FakeCupy:
    """Just the parts of cupy that _cuda.py touches."""

    current: list[FakeStream] = []
    int64 = np.int64

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib, self.launches, self.tables = lib, [], []
        outer = self
        FakeCupy.current = [FakeStream(0)]

        class Device:
            def __init__(self, device: int) -> None:
                assert device == 0

            def __enter__(self) -> None:
                return None

            def __exit__(self, *exc: Any) -> None:
                return None

        class Kernel:
            num_regs = 40

            def __init__(self, name: str) -> None:
                self.name = name

            def __call__(self, grid: tuple, block: tuple, args: tuple, stream: Any = None) -> None:
                outer.run(self.name, grid, block, args, stream)

        class RawModule:
            def __init__(self, code: str, options: tuple) -> None:
                assert "KVXFER_DEFINE_WIDTH(16, kvxfer_vec16)" in code
                assert {o.split("=")[0] for o in DEFAULT_TUNING.defines()} <= {o.split("=")[0] for o in options}

            def get_function(self, name: str) -> Kernel:
                return Kernel(name)

        properties = {"regsPerMultiprocessor": 65536, "maxThreadsPerMultiProcessor": 2048,
                      "multiProcessorCount": 2, "maxBlocksPerMultiProcessor": 32}
        runtime = types.SimpleNamespace(getDeviceProperties=lambda device: properties)
        self.RawModule = RawModule
        stream_class = types.SimpleNamespace(null=FakeStream(0))
        self.cuda = types.SimpleNamespace(Device=Device, ExternalStream=FakeStream, Stream=stream_class,
                                          runtime=runtime, get_current_stream=lambda: FakeCupy.current[-1])

    def empty(self, shape: tuple, dtype: Any) -> FakeDeviceArray:
        array = FakeDeviceArray(np.empty(shape, dtype=dtype))
        array.stream = FakeCupy.current[-1].ptr  # the pool arena it comes from
        self.tables.append(array)
        return array

    def asarray(self, values: np.ndarray) -> FakeDeviceArray:
        array = FakeDeviceArray(np.array(values))
        self.tables.append(array)
        return array

    def run(self, entry: str, grid: tuple, block: tuple, args: tuple, stream: Any) -> None:
        src, dst, table, *scalars = args
        assert isinstance(src, np.uint64) and isinstance(dst, np.uint64) and block == (DEFAULT_TUNING.threads,)
        assert tuple(type(x) for x in scalars) == _C_TYPES
        assert stream is not None, "the launcher names its stream"
        self.launches.append((int(entry.rsplit("_v", 1)[1]), grid[0], stream.ptr, entry))
        span = (0, 2**63)  # bounds are checked by the emulation tests; here: the launcher's plumbing
        violations = emulation.launch(self.lib, entry, grid[0], block[0], int(src), int(dst), span, span,
                                      table.host.ctypes.data, scalars)
        assert violations == 0


@pytest.fixture
def fake_cupy(emulator: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCupy]:
    fake = FakeCupy(emulator)
    monkeypatch.setattr(_cuda, "cupy_module", lambda: fake)
    caches = (_cuda._module, _cuda.kernel, _cuda.resident_ctas, _cuda._external_stream)
    for cached in caches:
        cached.cache_clear()
    yield fake
    for cached in caches:
        cached.cache_clear()


def test_public_functions_launch_once_per_call_and_match_reference(fake_cupy: FakeCupy) -> None:
    rng = np.random.default_rng(1)
    for seed in range(12):
        src_spec = random_spec(rng, num_layers=3, num_blocks=12, block_size=int(rng.choice([1, 4, 16])),
                               num_kv_heads=4, head_dim=int(rng.choice([8, 64])), itemsize=2)
        dst_spec = random_spec(rng, num_layers=3, num_blocks=14, block_size=int(rng.choice([2, 8, 32])),
                               num_kv_heads=2, head_dim=src_spec.head_dim, itemsize=2, total_kv_heads=4, tp_size=2,
                               tp_rank=1)
        capacity = min(12 * src_spec.block_size, 14 * dst_spec.block_size)
        case = random_case(rng, src_spec=src_spec, dst_spec=dst_spec, num_tokens=int(rng.integers(1, capacity + 1)))
        expected = case.dst.copy()
        reference.copy_kv(case.src, expected, case.plan)
        before = len(fake_cupy.launches)
        kernels.copy_kv(FakeDeviceArray(case.src), FakeDeviceArray(case.dst), case.plan)
        assert len(fake_cupy.launches) == before + 1, f"case {seed}: one launch per copy"
        np.testing.assert_array_equal(case.dst, expected)


def test_streams_per_box_grid_and_grid_cap(fake_cupy: FakeCupy) -> None:
    spec = KVCacheSpec(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=128)
    staging = kernels.staging_spec(spec, 64 * 16)
    cache = FakeDeviceArray(random_bytes(np.random.default_rng(2), spec.nbytes))
    out = FakeDeviceArray(np.zeros(staging.nbytes, dtype=np.uint8))
    kernels.gather_blocks(cache, spec, np.arange(64)[::-1], out, stream=1234)
    kernels.gather_blocks(cache, spec, np.arange(64)[::-1], out, stream=FakeStream(99))
    kernels.gather_blocks(cache, spec, np.arange(64)[::-1], out, stream=types.SimpleNamespace(cuda_stream=77))
    kernels.gather_blocks(cache, spec, np.arange(64)[::-1], out)
    assert [launch[2] for launch in fake_cupy.launches] == [1234, 99, 77, 0]
    # tables uploaded per call come from the launch stream's pool (reused in that stream's order)
    assert [table.stream for table in fake_cupy.tables] == [1234, 99, 77, 0]
    plan = kernels.plan_kv_copy(spec, staging, np.arange(64)[::-1], [0])
    one_wave = 2 * min(65536 // (40 * 32 * 8), 2048 // 256)  # resident CTAs of the fake 2-SM device
    chosen = default_tuning(plan.tables.contiguous)  # calls without a tuning take the per-entry default
    assert all(launch[0] == 16 and launch[1] == (plan.tables.num_boxes if chosen.waves is None else one_wave)
               for launch in fake_cupy.launches)
    expected = np.zeros(staging.nbytes, dtype=np.uint8)
    reference.copy_kv(cache.host, expected, plan)
    np.testing.assert_array_equal(out.host, expected)
    out.host[:] = 0
    _cuda.copy_kv(cache, out, plan, tuning=KernelTuning())  # per-box grid: 32 KiB boxes, one CTA of 256 each
    assert fake_cupy.launches[-1][1] == plan.tables.num_boxes
    np.testing.assert_array_equal(out.host, expected)
    out.host[:] = 0
    _cuda.copy_kv(cache, out, plan, tuning=KernelTuning(waves=1.0))
    assert fake_cupy.launches[-1][1] == one_wave
    np.testing.assert_array_equal(out.host, expected)
    with pytest.raises(ConfigError, match="stream"):
        kernels.gather_blocks(cache, spec, [0], out, stream="s")


def test_cupy_14_streams_come_from_stream_protocol(fake_cupy: FakeCupy) -> None:
    wrapped: list[int] = []

    def from_external(handle: Any) -> FakeStream:
        version, pointer = handle.__cuda_stream__()
        wrapped.append(pointer)
        return FakeStream(pointer)

    def deprecated(*args: Any) -> None:
        raise AssertionError("ExternalStream is deprecated in cupy 14")

    fake_cupy.cuda.Stream.from_external = from_external
    fake_cupy.cuda.ExternalStream = deprecated
    spec = KVCacheSpec(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
    src = FakeDeviceArray(random_bytes(np.random.default_rng(4), spec.nbytes))
    dst = FakeDeviceArray(np.zeros(spec.nbytes, dtype=np.uint8))
    plan = kernels.plan_kv_copy(spec, spec, [1, 2], [5, 6])
    for stream in (555, 555, 0):
        kernels.copy_kv(src, dst, plan, stream=stream)
    assert wrapped == [555]  # one wrapper per stream, reused; stream 0 is cupy's null stream
    assert [launch[2] for launch in fake_cupy.launches] == [555, 555, 0]
    assert [table.stream for table in fake_cupy.tables] == [555, 555, 0]


def test_launch_entries_follow_the_box_form(fake_cupy: FakeCupy) -> None:
    spec = KVCacheSpec(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, layout="NHD")
    src = FakeDeviceArray(random_bytes(np.random.default_rng(5), spec.nbytes))
    dst = FakeDeviceArray(np.zeros(spec.nbytes, dtype=np.uint8))
    run = kernels.plan_kv_copy(spec, spec, [1, 2], [5, 6], num_tokens=7)  # NHD full heads: runs
    rows = kernels.plan_kv_copy(spec, spec.replace(layout="HND"), [1, 2], [5, 6], num_tokens=7)
    for plan, tuning in ((run, DEFAULT_TUNING), (run, KernelTuning(runs=False)), (rows, DEFAULT_TUNING)):
        _cuda.copy_kv(src, dst, plan, tuning=tuning)
    assert [launch[3] for launch in fake_cupy.launches] == ["kvxfer_run_v16", "kvxfer_rows_v16", "kvxfer_rows_v16"]
    shape = _cuda.launch_of(rows, src.host.ctypes.data, dst.host.ctypes.data, 0)
    assert shape.entry == "kvxfer_rows_v16" and shape.num_ctas == rows.tables.num_boxes // 8


def test_uploaded_plan_is_reused_and_pointer_entry_checks_sizes(fake_cupy: FakeCupy) -> None:
    spec = KVCacheSpec(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
    plan = kernels.upload_plan(kernels.plan_kv_copy(spec, spec, [1, 2], [5, 6]), device=0)
    uploads = len(fake_cupy.tables)
    src = random_bytes(np.random.default_rng(3), spec.nbytes)
    dst = np.zeros(spec.nbytes, dtype=np.uint8)
    kernels.copy_kv_pointers(src.ctypes.data, src.nbytes, dst.ctypes.data, dst.nbytes, plan, device=0)
    kernels.copy_kv_pointers(src.ctypes.data, src.nbytes, dst.ctypes.data, dst.nbytes, plan, device=0)
    assert len(fake_cupy.tables) == uploads and len(fake_cupy.launches) == 2
    expected = np.zeros_like(dst)
    reference.copy_kv(src, expected, plan)
    np.testing.assert_array_equal(dst, expected)
    with pytest.raises(ConfigError, match="needs"):
        kernels.copy_kv_pointers(src.ctypes.data, src.nbytes - 1, dst.ctypes.data, dst.nbytes, plan, device=0)
