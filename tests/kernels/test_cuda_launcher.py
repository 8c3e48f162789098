"""kvxfer/kernels/_cuda.py driven through a stand-in for cupy whose kernel launches run the host emulation.

No GPU here: "device" arrays are host memory behind ``__cuda_array_interface__``. This checks what the launcher
does around the kernel: dispatch, argument order and C types, table upload and caching, streams, grid caps.
"""

from __future__ import annotations

import ctypes
import types
from collections.abc import Iterator
from typing import Any, ClassVar

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

_C_TYPES = (
    np.int32,
    np.int32,
    np.uint32,
    np.uint32,
    np.int32,
    np.int32,
    np.int64,
    np.int64,
    np.int64,
    np.int64,
    np.uint32,
    np.uint32,
    np.uint32,
    np.uint32,
    np.int32,
)


class FakeDeviceArray:
    """Host bytes posing as device memory of GPU 0."""

    def __init__(self, data: np.ndarray) -> None:
        self.host = data
        self.device = types.SimpleNamespace(id=0)
        self.nbytes = data.nbytes

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "data": (self.host.ctypes.data, False),
            "shape": self.host.shape,
            "typestr": self.host.dtype.str,
            "version": 3,
        }

    def set(self, values: np.ndarray, stream: Any = None) -> None:
        self.host[...] = values


class HostBuffer(np.ndarray):
    """Host bytes posing as pinned or device memory (cupy's alloc_pinned_memory / alloc: ``.ptr``, a buffer)."""

    @property
    def ptr(self) -> int:
        return int(self.ctypes.data)


class FakeEvent:
    """An event whose completion the test decides (``FakeCupy.events_done``)."""

    def __init__(self, outer: FakeCupy) -> None:
        self.outer, self.streams = outer, []

    @property
    def done(self) -> bool:
        return self.outer.events_done

    def record(self, stream: Any) -> None:
        self.streams.append(stream.ptr)


class FakeStream:
    def __init__(self, ptr: int, device: int = 0) -> None:
        self.ptr, self.device_id = ptr, device

    def __enter__(self) -> FakeStream:
        FakeCupy.current.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        FakeCupy.current.pop()

    def synchronize(self) -> None:
        pass


FakeStream.__module__ = "cupy.cuda.stream"


class FakeCupy:
    """Just the parts of cupy that _cuda.py touches."""

    current: ClassVar[list[FakeStream]] = []
    int64 = np.int64

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib, self.launches, self.tables = lib, [], []
        self.copies: list[int] = []  # streams of table copies from pinned slots
        self.slot_streams: list[int] = []  # streams current when a slot's device memory was drawn
        self.events: list[FakeEvent] = []
        self.events_done = True
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

        properties = {
            "regsPerMultiprocessor": 65536,
            "maxThreadsPerMultiProcessor": 2048,
            "multiProcessorCount": 2,
            "maxBlocksPerMultiProcessor": 32,
        }
        runtime = types.SimpleNamespace(
            getDeviceProperties=lambda device: properties, memcpyHostToDevice=1, memcpyAsync=self.memcpy
        )
        self.RawModule = RawModule
        stream_class = types.SimpleNamespace(null=FakeStream(0))
        self.cuda = types.SimpleNamespace(
            Device=Device,
            ExternalStream=FakeStream,
            Stream=stream_class,
            runtime=runtime,
            get_current_stream=lambda: FakeCupy.current[-1],
            alloc_pinned_memory=self.host_buffer,
            alloc=self.device_buffer,
            Event=self.event,
        )

    def host_buffer(self, nbytes: int) -> HostBuffer:
        return np.zeros(nbytes, dtype=np.uint8).view(HostBuffer)

    def device_buffer(self, nbytes: int) -> HostBuffer:
        self.slot_streams.append(FakeCupy.current[-1].ptr)
        return self.host_buffer(nbytes)

    def event(self, block: bool = False, disable_timing: bool = False) -> FakeEvent:
        assert disable_timing
        self.events.append(FakeEvent(self))
        return self.events[-1]

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        assert kind == 1 and nbytes % 8 == 0
        self.copies.append(stream)
        ctypes.memmove(dst, src, nbytes)

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
        table_ptr = int(table) if isinstance(table, np.integer) else table.host.ctypes.data  # slot or array
        violations = emulation.launch(
            self.lib, entry, grid[0], block[0], int(src), int(dst), span, span, table_ptr, scalars
        )
        assert violations == 0


@pytest.fixture
def fake_cupy(emulator: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCupy]:
    fake = FakeCupy(emulator)
    monkeypatch.setattr(_cuda, "cupy_module", lambda: fake)
    _cuda.clear_caches()
    yield fake
    _cuda.clear_caches()


def test_public_functions_launch_once_per_call_and_match_reference(fake_cupy: FakeCupy) -> None:
    rng = np.random.default_rng(1)
    for seed in range(12):
        src_spec = random_spec(
            rng,
            num_layers=3,
            num_blocks=12,
            block_size=int(rng.choice([1, 4, 16])),
            num_kv_heads=4,
            head_dim=int(rng.choice([8, 64])),
            itemsize=2,
        )
        dst_spec = random_spec(
            rng,
            num_layers=3,
            num_blocks=14,
            block_size=int(rng.choice([2, 8, 32])),
            num_kv_heads=2,
            head_dim=src_spec.head_dim,
            itemsize=2,
            total_kv_heads=4,
            tp_size=2,
            tp_rank=1,
        )
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
    # tables go up from one reused pinned slot (its last launch done) on each launch stream; its device memory
    # came from the first launch stream's pool (ordered after that stream's earlier work)
    assert fake_cupy.copies == [1234, 99, 77, 0] and fake_cupy.slot_streams == [1234] and not fake_cupy.tables
    assert fake_cupy.events[0].streams == [1234, 99, 77, 0]
    plan = kernels.plan_kv_copy(spec, staging, np.arange(64)[::-1], [0])
    one_wave = 2 * min(65536 // (40 * 32 * 8), 2048 // 256)  # resident CTAs of the fake 2-SM device
    chosen = default_tuning(plan.tables.contiguous)  # calls without a tuning take the per-entry default
    assert all(
        launch[0] == 16 and launch[1] == (plan.tables.num_boxes if chosen.waves is None else one_wave)
        for launch in fake_cupy.launches
    )
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
        _, pointer = handle.__cuda_stream__()
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
    assert fake_cupy.copies == [555, 555, 0]


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
    assert len(fake_cupy.tables) == uploads and len(fake_cupy.launches) == 2 and not fake_cupy.copies
    expected = np.zeros_like(dst)
    reference.copy_kv(src, expected, plan)
    np.testing.assert_array_equal(dst, expected)
    with pytest.raises(ConfigError, match="needs"):
        kernels.copy_kv_pointers(src.ctypes.data, src.nbytes - 1, dst.ctypes.data, dst.nbytes, plan, device=0)


def test_table_slots_are_reused_only_after_their_launch_and_fall_back_when_all_are_in_flight(
    fake_cupy: FakeCupy,
) -> None:
    from kvxfer.kernels import table_ring

    spec = KVCacheSpec(num_layers=2, num_blocks=64, block_size=4, num_kv_heads=2, head_dim=8)
    tiny = KVCacheSpec(num_layers=1, num_blocks=800, block_size=1, num_kv_heads=1, head_dim=8, num_kv_parts=1)
    rng = np.random.default_rng(6)
    buffers = {s: (random_bytes(rng, s.nbytes), random_bytes(rng, s.nbytes)) for s in (spec, tiny)}
    expected = {s: b[1].copy() for s, b in buffers.items()}

    def request(tokens: int, on: KVCacheSpec = spec) -> None:  # a pipe's pull: a plan of one template, new ids
        blocks, half = -(-tokens // on.block_size), on.num_blocks // 2
        plan = kernels.plan_kv_copy(
            on, on, rng.permutation(half)[:blocks], half + rng.permutation(half)[:blocks], num_tokens=tokens
        )
        src, dst = buffers[on]
        reference.copy_kv(src, expected[on], plan)
        kernels.copy_kv_pointers(src.ctypes.data, src.nbytes, dst.ctypes.data, dst.nbytes, plan, device=0, stream=7)

    ring = _cuda._table_ring(0)
    for tokens in (13, 40, 9):
        request(tokens)
    assert len(ring.slots) == 1 and len(fake_cupy.slot_streams) == 1  # done after each launch: one slot
    request(400, tiny)  # a table past the slot's 1024 entries: the slot grows (its launch is done)
    assert len(ring.slots) == 1 and ring.slots[0].capacity >= 3 * 400 + 2 and len(fake_cupy.slot_streams) == 2
    request(300, tiny)
    assert len(fake_cupy.slot_streams) == 2
    fake_cupy.events_done = False  # from now on every launch stays in flight
    for _ in range(table_ring.MAX_SLOTS + 3):
        request(int(rng.integers(1, 129)))
    assert len(ring.slots) == table_ring.MAX_SLOTS and ring.fallbacks == 4
    assert [table.stream for table in fake_cupy.tables] == [7] * 4  # pool tables, ordered on the launch stream
    assert len(fake_cupy.copies) == len(fake_cupy.launches) - 4
    for on, (_, dst) in buffers.items():
        np.testing.assert_array_equal(dst, expected[on])


def test_plans_of_one_template_share_one_launch_shape(fake_cupy: FakeCupy) -> None:
    spec = KVCacheSpec(num_layers=2, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(8)
    src, dst = random_bytes(rng, spec.nbytes), np.zeros(spec.nbytes, dtype=np.uint8)
    shapes = []
    for shift in (0, 16, 32):  # other addresses of the same alignment: the same launch
        plan = kernels.plan_kv_copy(spec, spec, rng.permutation(16)[:3], rng.permutation(16)[:3])
        shapes.append(_cuda.launch_of(plan, src.ctypes.data + shift, dst.ctypes.data, 0))
        assert shapes[-1].src_addr == src.ctypes.data + shift + plan.tables.src_base
    assert len({(s.entry, s.num_ctas, s.scalars) for s in shapes}) == 1 and len(_cuda._LAUNCHES) == 1
    _cuda.launch_of(plan, src.ctypes.data + 8, dst.ctypes.data, 0)  # 8-byte aligned: another vector width
    assert len(_cuda._LAUNCHES) == 2
