import gc
import types
import weakref

import numpy as np
import pytest
import torch

from kvxfer import ConfigError, MemoryKind, Region


class OnlyDlpack:
    """An object reachable through DLPack alone."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


class FakeCudaArray:
    """Device memory of GPU 0 as __cuda_array_interface__ describes it (never dereferenced)."""

    device = types.SimpleNamespace(id=0)

    def __init__(self, typestr, count):
        self.__cuda_array_interface__ = {"data": (1 << 20, False), "shape": (count,), "typestr": typestr, "version": 3}


def test_from_numpy_torch_bytearray_and_pointer():
    array = np.arange(100, dtype=np.float32)
    region = Region.from_array(array)
    assert (region.addr, region.nbytes, region.kind, region.device) == (array.ctypes.data, 400, MemoryKind.HOST, -1)
    tensor = torch.arange(10, dtype=torch.bfloat16)
    assert Region.from_array(tensor).nbytes == 20 and Region.from_array(tensor).addr == tensor.data_ptr()
    buffer = bytearray(b"abc" * 10)
    assert Region.from_array(buffer).nbytes == 30
    raw = Region.from_ptr(array.ctypes.data, 40, "host", owner=array)
    assert raw.as_numpy()[:4].tobytes() == array[:1].tobytes()


def test_dlpack_object_is_accepted():
    array = np.ones(64, dtype=np.uint8)
    region = Region.from_array(OnlyDlpack(array))
    assert region.addr == array.ctypes.data and region.nbytes == 64


def test_region_keeps_its_owner_alive():
    array = np.ones(1 << 20, dtype=np.uint8)
    ref = weakref.ref(array)
    region = Region.from_array(array)
    del array
    gc.collect()
    assert ref() is not None
    del region
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones((4, 4))[:, ::2], "contiguous"),
        (torch.ones(4, 4).t(), "contiguous"),
        (object(), "cannot register"),
        (np.ones(0), "nbytes must be > 0"),
    ],
)
def test_bad_arrays(bad, match):
    with pytest.raises(ConfigError, match=match):
        Region.from_array(bad)


def test_bad_pointers():
    with pytest.raises(ConfigError, match="NULL"):
        Region.from_ptr(0, 10)
    with pytest.raises(ConfigError, match="overflows"):
        Region.from_ptr(2**64 - 4, 10)
    with pytest.raises(ConfigError, match="device"):
        Region.from_ptr(4096, 10, "cuda", device=-1)
    with pytest.raises(ConfigError, match="kind"):
        Region.from_ptr(4096, 10, "disk")


@pytest.mark.parametrize(
    "make, itemsize",
    [
        (lambda: np.zeros(8, np.float32), 4),
        (lambda: np.zeros(8, np.uint16), 2),
        (lambda: np.zeros(8, np.uint8), 1),
        (lambda: torch.zeros(8, dtype=torch.bfloat16), 2),
        (lambda: torch.zeros(8, dtype=torch.float64), 8),
        (lambda: bytearray(8), 1),
        (lambda: OnlyDlpack(np.zeros(8, np.float32)), 4),
        (lambda: FakeCudaArray("<f4", 8), 4),
        (lambda: FakeCudaArray("<u2", 8), 2),
    ],
    ids=[
        "float32",
        "uint16",
        "uint8",
        "torch-bfloat16",
        "torch-float64",
        "bytearray",
        "dlpack-float32",
        "cuda-f4",
        "cuda-u2",
    ],
)
def test_region_records_the_element_size_of_its_array(make, itemsize):
    assert Region.from_array(make()).itemsize == itemsize


def test_raw_pointer_regions_have_no_element_size():
    array = np.zeros(8, np.float32)
    assert Region.from_ptr(array.ctypes.data, array.nbytes, owner=array).itemsize is None
    assert Region.from_ptr(4096, 10, "cuda", device=0).itemsize is None


@pytest.mark.parametrize("bad", [0, -2, True, 2.0])
def test_bad_itemsize(bad):
    with pytest.raises(ConfigError, match=r"Region\.itemsize"):
        Region(addr=4096, nbytes=8, kind="host", itemsize=bad)
