"""Read-only and object memory is never registered, whatever array type wraps it (issue 14 item 5).

A peer may WRITE into any registered region and a READ lands in one: an immutable ``bytes`` would be mutated, a
read-only mapping would fault (SIGSEGV), an object array's pointers would be corrupted.
"""

from __future__ import annotations

import mmap
import warnings

import numpy as np
import pytest
import torch

import kvxfer
from kvxfer import ConfigError, Region


@pytest.fixture
def agent():
    with kvxfer.Agent("a", backends=["local"]) as agent:
        yield agent


@pytest.fixture
def read_only_mapping(tmp_path):
    path = tmp_path / "ro.bin"
    path.write_bytes(bytes(range(256)) * 32)
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
    yield mapping
    mapping.close()


class _DLPackOnly:
    """Hides everything but DLPack, so registration goes through the DLPack path."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class _FakeCudaArray:
    """A foreign CUDA array as cupy or numba would describe it (no GPU needed: refused before any device call)."""

    class _Device:
        id = 0

    def __init__(self, readonly: bool, typestr: str = "|u1") -> None:
        self.device = self._Device()
        self.__cuda_array_interface__ = {
            "data": (0x7F0000000000, readonly),
            "shape": (64,),
            "typestr": typestr,
            "version": 3,
            "strides": None,
        }


def _read_only_numpy():
    array = np.zeros(4096, np.uint8)
    array.setflags(write=False)
    return array


@pytest.mark.parametrize(
    "make",
    [
        _read_only_numpy,
        lambda: np.frombuffer(bytes(8192), dtype=np.uint8),
        lambda: np.frombuffer(memoryview(bytes(64)), dtype=np.uint8),
        lambda: memoryview(bytes(64)),
        lambda: _DLPackOnly(np.frombuffer(bytes(64), dtype=np.uint8)),
        lambda: _FakeCudaArray(readonly=True),
    ],
    ids=[
        "numpy-non-writeable",
        "numpy-over-bytes",
        "numpy-over-readonly-memoryview",
        "readonly-memoryview",
        "dlpack-readonly",
        "cuda-interface-readonly",
    ],
)
def test_read_only_arrays_are_refused(agent, make):
    with pytest.raises(ConfigError, match="read-only"):
        agent.register(make())
    assert agent.regions == []


def test_bytes_are_never_mutated_by_a_read(agent):
    immutable = bytes(8192)
    with pytest.raises(ConfigError):
        agent.register(np.frombuffer(immutable, dtype=np.uint8))
    assert immutable == bytes(8192)


def test_read_only_memory_map_is_refused_through_numpy_pointer_and_torch(agent, read_only_mapping):
    view = np.frombuffer(read_only_mapping, dtype=np.uint8)
    with pytest.raises(ConfigError, match="read-only"):
        agent.register(view)
    raw = Region.from_ptr(view.ctypes.data, view.nbytes, owner=read_only_mapping)
    with pytest.raises(ConfigError, match="not writeable"):
        agent.register(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the buffer is not writable
        tensor = torch.frombuffer(read_only_mapping, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="not writeable"):
        agent.register(tensor)
    assert agent.regions == []


def test_unmapped_raw_pointer_is_refused(agent):
    with pytest.raises(ConfigError, match="not mapped"):
        agent.register(Region.from_ptr(16 << 40, 4096))  # far from anything this process maps


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.array([object()] * 8, dtype=object),
        lambda: np.zeros(4, dtype=[("a", np.int64), ("b", object)]),
        lambda: _FakeCudaArray(readonly=False, typestr="|O8"),
    ],
    ids=["numpy-object", "numpy-structured-with-object", "cuda-interface-object"],
)
def test_object_arrays_are_refused(agent, make):
    with pytest.raises(ConfigError, match="Python objects"):
        agent.register(make())


def test_writeable_arrays_of_every_host_kind_still_register(agent):
    buffers = [
        np.zeros(256, np.uint8),
        torch.zeros(64, dtype=torch.float32),
        bytearray(128),
        _DLPackOnly(np.zeros(32, np.uint8)),
        np.zeros(4, dtype=[("a", np.int64), ("b", np.float32)]),
    ]
    regions = [agent.register(buffer) for buffer in buffers]
    assert [r.nbytes for r in regions] == [256, 256, 128, 32, 4 * 12]
