"""cuda_ipc copy-engine path: one cuMemcpyBatchAsync when the driver has it, else one memcpyAsync per run (CPU,
with stand-ins for cuda-python and cupy)."""

from __future__ import annotations

import enum
from types import SimpleNamespace

import pytest

from kvxfer.backends.cuda_ipc import driver
from kvxfer.backends.cuda_ipc.backend import CudaIpcBackend
from kvxfer.errors import BackendError


class CUresult(enum.Enum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_NOT_FOUND = 500


class FakeDriver:
    """The parts of cuda.bindings.driver that memcpy_batch uses; records every batch."""

    CUresult = CUresult
    CUmemcpySrcAccessOrder = SimpleNamespace(CU_MEMCPY_SRC_ACCESS_ORDER_STREAM="stream-order")

    def __init__(self, answer: CUresult = CUresult.CUDA_SUCCESS, has_batch: bool = True) -> None:
        self.answer, self.batches = answer, []
        if has_batch:
            self.cuMemcpyBatchAsync = self._batch

    @staticmethod
    def CUmemcpyAttributes():
        return SimpleNamespace(srcAccessOrder=None)

    @staticmethod
    def CUdeviceptr(value: int) -> int:
        return int(value)

    @staticmethod
    def CUstream(value: int) -> str:
        return f"stream:{value}"

    def cuGetErrorString(self, status):
        return CUresult.CUDA_SUCCESS, status.name.encode()

    def _batch(self, dsts, srcs, sizes, count, attrs, attr_idxs, num_attrs, stream):
        assert len(dsts) == len(srcs) == len(sizes) == count and attr_idxs == [0] and num_attrs == len(attrs) == 1
        self.batches.append((list(dsts), list(srcs), list(sizes), attrs[0].srcAccessOrder, stream))
        return (self.answer,)


class FakeRuntime:
    def __init__(self) -> None:
        self.copies = []

    def memcpyAsync(self, dst, src, size, kind, stream):
        self.copies.append((dst, src, size, kind, stream))


@pytest.fixture
def fake(monkeypatch):
    def install(**kwargs):
        fake_driver = FakeDriver(**kwargs)
        monkeypatch.setattr(driver, "cu", lambda: fake_driver)
        monkeypatch.setattr(driver, "_BATCH_UNSUPPORTED", [])
        runtime = FakeRuntime()
        return fake_driver, SimpleNamespace(cuda=SimpleNamespace(runtime=runtime)), runtime

    return install


def test_one_batch_call_queues_every_run(fake):
    fake_driver, cupy, runtime = fake()
    CudaIpcBackend._copy_engine(cupy, [10, 20, 30], [110, 120, 130], [4 << 20, 8 << 20, 4 << 20], 77)
    assert fake_driver.batches == [
        ([110, 120, 130], [10, 20, 30], [4 << 20, 8 << 20, 4 << 20], "stream-order", "stream:77")
    ]
    assert runtime.copies == []


@pytest.mark.parametrize(
    "kwargs",
    [dict(has_batch=False), dict(answer=CUresult.CUDA_ERROR_NOT_SUPPORTED), dict(answer=CUresult.CUDA_ERROR_NOT_FOUND)],
)
def test_without_batch_support_one_copy_per_run_and_remembered(fake, kwargs):
    fake_driver, cupy, runtime = fake(**kwargs)
    for _ in range(2):
        CudaIpcBackend._copy_engine(cupy, [10, 20], [110, 120], [5, 6], 77)
    assert runtime.copies == [(110, 10, 5, 4, 77), (120, 20, 6, 4, 77)] * 2
    assert len(fake_driver.batches) <= 1  # asked at most once, then remembered
    assert driver._BATCH_UNSUPPORTED


def test_other_batch_failures_raise(fake):
    _fake_driver, cupy, runtime = fake(answer=CUresult.CUDA_ERROR_INVALID_VALUE)
    with pytest.raises(BackendError, match="cuMemcpyBatchAsync"):
        CudaIpcBackend._copy_engine(cupy, [10], [110], [5], 77)
    assert runtime.copies == []
