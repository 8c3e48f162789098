"""A stand-in for cupy whose kernel launches run the host emulation of csrc/kv_copy.cu and csrc/id_copy.cu.

"Device" memory is host memory: the GPU kernel route of a pipe (``launcher.device >= 0``) runs on a CPU machine,
through kvxfer's real launch code (ring slots, async copies, launch arguments), with every kernel access checked
for bounds and alignment by the emulation.
"""

from __future__ import annotations

import ctypes
import types
from typing import Any

import numpy as np

from tests.kernels import emulator as emulation

_ANYWHERE = (0, 2**63)


class HostBuffer(np.ndarray):
    """Host bytes posing as pinned or device memory (``.ptr``)."""

    @property
    def ptr(self) -> int:
        return int(self.ctypes.data)


class DeviceArray:
    """A pool allocation (the ring's fallback when every slot is in flight)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.host = np.zeros(shape, dtype=dtype)

    def set(self, values: np.ndarray, stream: Any = None) -> None:
        self.host[...] = values


class Event:
    """Done when the emulated GPU says so (``EmulatedCupy.events_done``)."""

    def __init__(self, gpu: EmulatedCupy) -> None:
        self.gpu, self.records = gpu, 0
        gpu.events.append(self)

    @property
    def done(self) -> bool:
        return self.gpu.events_done

    def record(self, stream: Any = None) -> None:
        self.records += 1

    def synchronize(self) -> None:
        self.gpu.events_done = True  # a host wait: the work finishes


class Stream:
    def __init__(self, non_blocking: bool = False, ptr: int = 77) -> None:
        self.ptr = ptr

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


Stream.__module__ = "cupy.cuda.stream"


class _StreamClass:
    def __init__(self) -> None:
        self.null = Stream(ptr=0)

    def __call__(self, non_blocking: bool = False) -> Stream:
        return Stream(non_blocking)


class _Device:
    def __init__(self, device: int = 0) -> None:
        assert device == 0

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass


class EmulatedCupy:
    """The parts of cupy kvxfer's kernel route touches; ``launches`` lists (entry, grid) of every launch."""

    int64 = np.int64

    def __init__(self, kv_copy: ctypes.CDLL, id_copy: ctypes.CDLL) -> None:
        self.kv_copy, self.id_copy = kv_copy, id_copy
        self.launches: list[tuple[str, int]] = []
        #: (start, end) of the memory kernels may touch: a launch may read and write only inside the span holding
        #: its pointer argument (an access elsewhere counts as a violation instead of corrupting this process)
        self.regions: list[tuple[int, int]] = []
        self.events: list[Event] = []
        self.events_done = True
        self.copies = 0
        gpu = self
        properties = {
            "regsPerMultiprocessor": 65536,
            "maxThreadsPerMultiProcessor": 2048,
            "multiProcessorCount": 2,
            "maxBlocksPerMultiProcessor": 32,
        }

        class Function:
            num_regs = 40

            def __init__(self, name: str) -> None:
                self.name = name

            def __call__(self, grid: tuple[int], block: tuple[int], args: tuple[Any, ...], stream: Any = None) -> None:
                gpu.run(self.name, grid[0], block[0], args)

        class RawModule:
            def __init__(self, code: str, options: tuple[str, ...]) -> None:
                pass

            def get_function(self, name: str) -> Function:
                return Function(name)

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(
            Device=_Device,
            Stream=_StreamClass(),
            Event=lambda block=False, disable_timing=True, interprocess=False: Event(self),
            runtime=types.SimpleNamespace(
                getDeviceProperties=lambda device: properties,
                memcpyHostToDevice=1,
                memcpyAsync=self._memcpy,
                getDeviceCount=lambda: 1,
            ),
            get_current_stream=lambda: self.cuda.Stream.null,
            alloc_pinned_memory=self._buffer,
            alloc=self._buffer,
            ExternalStream=lambda ptr, device=0: Stream(ptr=ptr),
        )

    @staticmethod
    def _buffer(nbytes: int) -> HostBuffer:
        return np.zeros(nbytes, dtype=np.uint8).view(HostBuffer)

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        assert kind == 1
        self.copies += 1
        ctypes.memmove(dst, src, nbytes)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> DeviceArray:
        return DeviceArray(shape, dtype)

    def run(self, entry: str, grid: int, block: int, args: tuple[Any, ...]) -> None:
        src, dst, table, *scalars = args
        assert isinstance(src, np.uint64) and isinstance(dst, np.uint64)
        table_ptr = int(table) if isinstance(table, np.integer) else table.host.ctypes.data
        self.launches.append((entry, grid))
        read, write = self._span(int(src)), self._span(int(dst))
        if entry.startswith("kvxfer_ids_"):
            assert not scalars
            violations = emulation.launch_ids(
                self.id_copy, entry, grid, block, int(src), int(dst), read, write, table_ptr
            )
        else:
            violations = emulation.launch(
                self.kv_copy, entry, grid, block, int(src), int(dst), read, write, table_ptr, scalars
            )
        assert violations == 0, f"{entry}: {violations} accesses outside the region or misaligned"

    def _span(self, pointer: int) -> tuple[int, int]:
        return next(((start, end) for start, end in self.regions if start <= pointer < end), _ANYWHERE)
