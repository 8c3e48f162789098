"""Regions: spans of host or device memory that an agent registers and backends move bytes in and out of."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .errors import ConfigError

# DLPack device types (dlpack.h): the ones a region can live on.
_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST = 1, 2, 3


class MemoryKind(str, Enum):
    """Where a region's bytes live."""

    HOST = "host"
    CUDA = "cuda"


@dataclass(eq=False)
class Region:
    """A span of memory: ``nbytes`` bytes at ``addr`` on ``device`` (-1 for host memory).

    Built from an array with :meth:`from_array` (numpy, torch, cupy, or anything with ``__array_interface__``,
    ``__cuda_array_interface__`` or DLPack) or from a raw pointer with :meth:`from_ptr`. The region keeps
    ``owner`` alive so the memory cannot be freed while the region exists. ``name`` and ``index`` are set when an
    agent registers it. ``itemsize``: bytes per element of the array it was built from (None for a raw pointer);
    a KV spec laid over it must have elements of that size unless it is 1 (bytes are untyped storage).
    """

    addr: int
    nbytes: int
    kind: MemoryKind
    device: int = -1
    owner: Any = field(default=None, repr=False)
    name: str = ""
    index: int = -1
    itemsize: int | None = None
    _agent: Any = field(default=None, repr=False)
    _backend_keys: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.kind = _memory_kind(self.kind)
        for argument, value in (("addr", self.addr), ("nbytes", self.nbytes)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"Region.{argument} must be an int >= 0, got {value!r}")
        if self.nbytes == 0:
            raise ConfigError("Region.nbytes must be > 0, got 0")
        if self.addr == 0:
            raise ConfigError("Region.addr must not be NULL")
        if self.itemsize is not None and (
            not isinstance(self.itemsize, (int, np.integer)) or isinstance(self.itemsize, bool) or self.itemsize < 1
        ):
            raise ConfigError(f"Region.itemsize must be None or an int >= 1, got {self.itemsize!r}")
        if self.addr + self.nbytes > 2**64:
            raise ConfigError(f"Region [{self.addr:#x}, +{self.nbytes}) overflows a 64-bit address")
        if self.kind is MemoryKind.CUDA and self.device < 0:
            raise ConfigError(f"Region.device must be >= 0 for CUDA memory, got {self.device}")
        if self.kind is MemoryKind.HOST:
            self.device = -1
        self.addr, self.nbytes, self.device = int(self.addr), int(self.nbytes), int(self.device)
        self.itemsize = None if self.itemsize is None else int(self.itemsize)

    @property
    def registered(self) -> bool:
        """True while an agent holds this region registered."""
        return self._agent is not None

    @property
    def agent(self) -> Any:
        """The agent that holds this region registered, or None."""
        return self._agent

    @property
    def backend_keys(self) -> dict[str, bytes]:
        """A copy of what each backend returned when it registered this region, by backend wire name."""
        return dict(self._backend_keys)

    def set_backend_key(self, wire: str, key: bytes) -> None:
        """Record what the backend with wire name ``wire`` returned when it registered this region."""
        self._backend_keys[wire] = key

    def bind(self, agent: Any) -> None:
        """Mark this region as registered with ``agent`` (None: deregistered); called by the agent."""
        self._agent = agent

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.addr + self.nbytes

    @classmethod
    def from_ptr(
        cls, ptr: int, nbytes: int, kind: MemoryKind | str = MemoryKind.HOST, device: int = -1, owner: Any = None
    ) -> Region:
        """A region over raw memory the caller keeps alive (or passes as ``owner``)."""
        return cls(addr=ptr, nbytes=nbytes, kind=_memory_kind(kind), device=device, owner=owner)

    @classmethod
    def from_array(cls, array: Any) -> Region:
        """A region spanning a C-contiguous array; the array is kept alive as the owner."""
        if isinstance(array, Region):
            return array
        torch_region = _from_torch(array)
        if torch_region is not None:
            return torch_region
        interface = getattr(array, "__cuda_array_interface__", None)
        if interface is not None:
            return _from_interface(array, interface, MemoryKind.CUDA, _cuda_device_of(array, interface))
        interface = getattr(array, "__array_interface__", None)
        if interface is not None:
            return _from_interface(array, interface, MemoryKind.HOST, -1)
        if hasattr(array, "__dlpack__") and hasattr(array, "__dlpack_device__"):
            return _from_dlpack(array)
        if isinstance(array, (bytearray, memoryview)):
            return cls.from_array(np.frombuffer(array, dtype=np.uint8))
        raise ConfigError(
            f"array: cannot register {type(array).__name__}: expected a numpy/torch/cupy array, an object with "
            "__array_interface__, __cuda_array_interface__ or __dlpack__, or Region.from_ptr(...)"
        )

    def as_numpy(self) -> np.ndarray:
        """A uint8[nbytes] host view of a host region (the region keeps its owner alive)."""
        if self.kind is not MemoryKind.HOST:
            raise ConfigError(f"region {self.name!r}: as_numpy needs host memory, it is on {self.kind.value}")
        buffer = (ctypes.c_uint8 * self.nbytes).from_address(self.addr)
        view = np.frombuffer(memoryview(buffer), dtype=np.uint8)
        return view


def _memory_kind(kind: MemoryKind | str) -> MemoryKind:
    try:
        return MemoryKind(kind)
    except ValueError:
        raise ConfigError(f"kind must be 'host' or 'cuda', got {kind!r}") from None


def _contiguous_nbytes(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> int:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if strides is not None:
        expected = itemsize
        # strict=False: shape and strides come from a third-party interface dict, not checked to match here
        for size, stride in zip(reversed(shape), reversed(strides), strict=False):
            if size > 1 and stride != expected:
                raise ConfigError(f"array must be C-contiguous to register; shape {shape} has strides {strides}")
            expected *= size
    return count * itemsize


def _from_interface(owner: Any, interface: dict, kind: MemoryKind, device: int) -> Region:
    addr, readonly = interface["data"]
    if readonly:
        # A peer may WRITE into any registered region, and a READ lands in it: read-only memory (an immutable
        # bytes object, a read-only mmap) would be mutated or fault.
        raise ConfigError(
            f"array: cannot register read-only memory ({type(owner).__name__} is not writeable); "
            "register a writeable copy"
        )
    dtype = np.dtype(interface["typestr"])
    descr = interface.get("descr")
    structured = np.dtype(descr) if isinstance(descr, list) and len(descr) > 1 else dtype
    if dtype.hasobject or structured.hasobject or (isinstance(owner, np.ndarray) and owner.dtype.hasobject):
        raise ConfigError(
            f"array: cannot register an array of Python objects (dtype {getattr(owner, 'dtype', dtype)})"
            "; its bytes are pointers that a copy would corrupt"
        )
    itemsize = dtype.itemsize
    nbytes = _contiguous_nbytes(tuple(interface["shape"]), interface.get("strides"), itemsize)
    return Region(addr=addr, nbytes=nbytes, kind=kind, device=device, owner=owner, itemsize=itemsize)


def check_writable(addr: int, nbytes: int) -> None:
    """ConfigError unless every byte of host memory [addr, addr + nbytes) lies in writeable mappings of this
    process (Linux: /proc/self/maps; elsewhere nothing is checked)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return
    covered, end = addr, addr + nbytes
    for line in lines:  # sorted by address
        span, permissions = line.split(" ", 2)[:2]
        low_text, _, high_text = span.partition("-")
        low, high = int(low_text, 16), int(high_text, 16)
        if high <= covered:
            continue
        if low > covered:
            break
        if "w" not in permissions:
            raise ConfigError(
                f"memory at {covered:#x} ({permissions}) is not writeable; cannot register "
                f"[{addr:#x}, +{nbytes}) (a read-only mapping?)"
            )
        covered = high
        if covered >= end:
            return
    raise ConfigError(
        f"memory [{covered:#x}, {end:#x}) is not mapped in this process; cannot register [{addr:#x}, +{nbytes})"
    )


def _cuda_device_of(array: Any, interface: dict) -> int:
    device = getattr(array, "device", None)
    device_id = getattr(device, "id", None)
    if device_id is None:
        device_id = getattr(device, "index", None)
    if device_id is not None:
        return int(device_id)
    from .devices import device_of_pointer  # only reached for foreign CUDA arrays

    return device_of_pointer(interface["data"][0])


def _from_torch(array: Any) -> Region | None:
    module = type(array).__module__
    if not module.startswith("torch") or not hasattr(array, "data_ptr"):
        return None
    if not array.is_contiguous():
        raise ConfigError(f"array must be contiguous to register; torch tensor of shape {tuple(array.shape)} is not")
    itemsize = array.element_size()
    nbytes = array.numel() * itemsize
    if array.device.type == "cuda":
        return Region(
            addr=array.data_ptr(),
            nbytes=nbytes,
            kind=MemoryKind.CUDA,
            device=array.device.index,
            owner=array,
            itemsize=itemsize,
        )
    if array.device.type == "cpu":
        return Region(addr=array.data_ptr(), nbytes=nbytes, kind=MemoryKind.HOST, owner=array, itemsize=itemsize)
    raise ConfigError(f"array: torch device {array.device} is not supported (cpu or cuda)")


def _from_dlpack(array: Any) -> Region:
    device_type, _device_id = array.__dlpack_device__()
    if device_type in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
        view = np.from_dlpack(array)
        region = Region.from_array(view)
        region.owner = (array, view)
        return region
    if device_type == _DLPACK_CUDA:
        try:
            import cupy
        except ImportError:
            raise ConfigError("array: a CUDA DLPack array needs cupy to register") from None
        view = cupy.from_dlpack(array)
        region = Region.from_array(view)
        region.owner = (array, view)
        return region
    raise ConfigError(f"array: DLPack device type {device_type} is not supported (CPU or CUDA)")


@dataclass(frozen=True, eq=False)
class RemoteRegion:
    """A region registered by a peer agent, as its metadata describes it (addresses are in the peer's space)."""

    name: str
    index: int
    addr: int
    nbytes: int
    kind: MemoryKind
    device: int
    peer: Any = field(repr=False)
    keys: dict = field(default_factory=dict, repr=False)

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.addr + self.nbytes

    @property
    def itemsize(self) -> None:
        """Unknown: peers' metadata does not carry dtypes, so only the side that registered a region checks it."""
        return None

    @property
    def peer_name(self) -> str:
        """Name of the agent that registered it."""
        return str(self.peer.name)
