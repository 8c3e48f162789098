"""KVPipe's GPU kernel route with fragment addresses derived on the GPU from block ids (kernels/id_copy.py), run on
a CPU machine: a cupy stand-in (tests/pipe/emulated_gpu.py) runs every launch in the host emulation of the CUDA
sources. Same bytes as the table path and as the host reference, same errors, one launch per route, no table."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import numpy as np
import pytest

import kvxfer.devices
from kvxfer import KVPipe, TransferState
from kvxfer.errors import DescriptorError
from kvxfer.kernels import _cuda, id_launch
from tests.helpers import BLOCKS, Cluster, write_sequence
from tests.kernels import emulator as emulation
from tests.pipe.emulated_gpu import EmulatedCupy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    kv_copy = emulation.build(tmp_path_factory.mktemp("kv_copy"))
    id_copy = emulation.build_ids(tmp_path_factory.mktemp("id_copy"))
    if kv_copy is None or id_copy is None:
        pytest.skip("needs a C++ compiler (g++) to emulate the CUDA kernels")
    return kv_copy, id_copy


@pytest.fixture
def gpu(libraries: tuple[ctypes.CDLL, ctypes.CDLL], monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedCupy]:
    fake = EmulatedCupy(*libraries)
    monkeypatch.setattr(kvxfer.devices, "cupy_module", lambda: fake)
    monkeypatch.setattr(_cuda, "cupy_module", lambda: fake)
    _cuda.clear_caches()
    id_launch.clear_caches()
    yield fake
    _cuda.clear_caches()
    id_launch.clear_caches()


def _on_gpu(pipe: KVPipe, gpu: EmulatedCupy, cluster: Cluster, addressing: bool | None = True) -> KVPipe:
    """The pipe's kernel route as on a GPU (host memory posing as device memory); kernels confined to the caches.
    ``addressing``: the block-id route (True), tables (False), or the pipe's default (None)."""
    gpu.regions = [(c.ctypes.data, c.ctypes.data + c.nbytes) for c in cluster.p_caches + cluster.d_caches]
    pipe.device = 0
    pipe._launcher.device = 0
    if addressing is not None:
        pipe.gpu_addressing = addressing
    return pipe


def _pull_all(cluster: Cluster, gpu: EmulatedCupy, addressing: bool, layers: list[int] | None = None) -> list[str]:
    entries = []
    for rank in range(len(cluster.decode)):
        pipe = _on_gpu(cluster.pipe(rank, strategy="kernel"), gpu, cluster)
        pipe.gpu_addressing = addressing
        before = len(gpu.launches)
        handle = pipe.pull(cluster.d_ids, cluster.p_ids, notify=b"done", num_tokens=cluster.tokens, layers=layers)
        handle.wait(timeout=30)
        assert handle.state is TransferState.DONE
        made = gpu.launches[before:]
        assert len(made) == len(pipe.routes)  # one launch per route
        entries += [entry for entry, _ in made]
        pipe.close()
    return entries


CASES = [
    (1, 1, 16, 16, "HND", "HND", 45),
    (1, 1, 16, 16, "NHD", "NHD", 48),
    (1, 2, 16, 16, "HND", "HND", 45),
    (2, 1, 16, 32, "NHD", "HND", 45),
    (2, 4, 32, 16, "HND", "NHD", 70),
    (4, 2, 8, 16, "NHD", "NHD", 33),
]


@pytest.mark.parametrize("p_tp, d_tp, p_block, d_block, p_layout, d_layout, tokens", CASES)
def test_pull_lands_the_same_bytes_as_the_table_path(
    gpu: EmulatedCupy, p_tp: int, d_tp: int, p_block: int, d_block: int, p_layout: str, d_layout: str, tokens: int
) -> None:
    results = {}
    for addressing in (True, False):
        cluster = Cluster(p_tp, d_tp, 8, p_block, d_block, p_layout, d_layout, tokens=tokens)
        try:
            entries = _pull_all(cluster, gpu, addressing)
            assert all(e.startswith("kvxfer_ids_") == addressing for e in entries), entries
            for rank in range(d_tp):
                np.testing.assert_array_equal(cluster.d_caches[rank], cluster.expected(rank))
            results[addressing] = [cache.copy() for cache in cluster.d_caches]
        finally:
            cluster.close()
    for ids, tables in zip(results[True], results[False], strict=True):
        assert ids.tobytes() == tables.tobytes()


def test_the_block_id_route_is_opt_in_by_environment(gpu: EmulatedCupy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default until the kernel has run on a GPU; KVXFER_PIPE_GPU_ADDRESSING=1 turns it on for new pipes."""
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=40)
    try:
        default = _on_gpu(cluster.pipe(0, strategy="kernel"), gpu, cluster, None)
        monkeypatch.setenv("KVXFER_PIPE_GPU_ADDRESSING", "1")
        opted = _on_gpu(cluster.pipe(0, strategy="kernel"), gpu, cluster, None)
        assert not default.gpu_addressing and opted.gpu_addressing
        launched, initial = [], cluster.d_caches[0].copy()
        assert not np.array_equal(initial, cluster.expected(0))
        for pipe in (default, opted):
            cluster.d_caches[0][...] = initial
            before = len(gpu.launches)
            pipe.pull(cluster.d_ids, cluster.p_ids, num_tokens=cluster.tokens).wait(timeout=30)
            launched.append([entry for entry, _ in gpu.launches[before:]])
            np.testing.assert_array_equal(cluster.d_caches[0], cluster.expected(0))
            pipe.close()
        assert not any(e.startswith("kvxfer_ids_") for e in launched[0]) and launched[0]
        assert all(e.startswith("kvxfer_ids_") for e in launched[1]) and launched[1]
    finally:
        cluster.close()


def test_layer_subsets_and_slots_reused_without_new_events(gpu: EmulatedCupy) -> None:
    cluster = Cluster(1, 2, 8, 16, 16, "HND", "NHD", tokens=40)
    try:
        _pull_all(cluster, gpu, True, layers=[1])
        events = len(gpu.events)
        _pull_all(cluster, gpu, True, layers=[0])
        assert len(gpu.events) == events  # each pull's completion is its ring slot's event: none created
        for rank in range(2):
            np.testing.assert_array_equal(cluster.d_caches[rank], cluster.expected(rank))
    finally:
        cluster.close()


def test_pending_until_the_launch_completes(gpu: EmulatedCupy) -> None:
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=32)
    try:
        pipe = _on_gpu(cluster.pipe(0, strategy="kernel"), gpu, cluster)
        gpu.events_done = False
        handle = pipe.pull(cluster.d_ids, cluster.p_ids)
        assert handle.poll() is TransferState.PENDING
        gpu.events_done = True
        handle.wait(timeout=10)
        assert handle.state is TransferState.DONE and gpu.launches[-1][0].startswith("kvxfer_ids_")
        pipe.close()
    finally:
        cluster.close()


def test_push_writes_the_peer_blocks(gpu: EmulatedCupy) -> None:
    cluster = Cluster(1, 1, 8, 16, 32, "NHD", "HND", tokens=50)
    try:
        _pull_all(cluster, gpu, True)
        pipe = _on_gpu(cluster.pipe(0, strategy="kernel"), gpu, cluster)
        others = np.setdiff1d(np.arange(BLOCKS), cluster.p_ids)[: len(cluster.p_ids)]
        expected = cluster.p_caches[0].copy()
        write_sequence(expected, cluster.p_specs[0], others, cluster.sequence)
        handle = pipe.push(cluster.d_ids, others, num_tokens=cluster.tokens)
        handle.wait(timeout=10)
        assert gpu.launches[-1][0].startswith("kvxfer_ids_")
        np.testing.assert_array_equal(cluster.p_caches[0], expected)
        pipe.close()
    finally:
        cluster.close()


def test_bad_ids_raise_what_the_table_path_raises_and_launch_nothing(gpu: EmulatedCupy) -> None:
    cluster = Cluster(2, 1, 8, 16, 16, "HND", "HND", tokens=32)
    try:
        messages: dict[bool, list[str]] = {}
        for addressing in (True, False):
            pipe = _on_gpu(cluster.pipe(0, strategy="kernel"), gpu, cluster)
            pipe.gpu_addressing = addressing
            bad = [
                (cluster.d_ids[:1], cluster.p_ids, None),
                ([0, BLOCKS], cluster.p_ids, None),
                ([3, 3], cluster.p_ids, None),
                (np.array([3, 3], np.int32), cluster.p_ids, None),
                (cluster.d_ids, [0, BLOCKS + 5], None),
                (cluster.d_ids, [-1, 2], None),
                (cluster.d_ids, cluster.p_ids, 40),
                (np.array([[1, 2]]), cluster.p_ids, None),
            ]
            messages[addressing] = []
            for local, remote, tokens in bad:
                with pytest.raises(DescriptorError) as raised:
                    pipe.pull(local, remote, num_tokens=tokens)
                messages[addressing].append(str(raised.value))
            pipe.close()
        assert messages[True] == messages[False] and not gpu.launches
        assert (cluster.d_caches[0] == -7).all()
    finally:
        cluster.close()


def test_block_sizes_that_do_not_divide_take_the_table_path(gpu: EmulatedCupy) -> None:
    cluster = Cluster(1, 1, 8, 16, 24, "HND", "NHD", tokens=45)
    try:
        entries = _pull_all(cluster, gpu, True)
        assert entries and not any(entry.startswith("kvxfer_ids_") for entry in entries)
        np.testing.assert_array_equal(cluster.d_caches[0], cluster.expected(0))
    finally:
        cluster.close()
