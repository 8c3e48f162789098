"""The block-id KV copy (csrc/id_copy.cu) on a GPU against the NumPy reference and the table-path kernel, bit for
bit (marked gpu: skipped without cupy and a GPU). Destinations start as random bytes and are compared whole."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import kvxfer.kernels as kernels
from kvxfer.kernels import KVCopyPlan, id_launch, reference, table_ring
from kvxfer.kernels.id_launch import IdLaunch
from kvxfer.spec import KVCacheSpec
from tests.kernels.cases import random_bytes
from tests.kernels.id_cases import form_of, random_request

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cupy() -> Any:
    return pytest.importorskip("cupy")


class _Side:
    """Bytes on the GPU placed ``shift`` bytes past a 256-byte boundary (``ptr`` is the region start)."""

    def __init__(self, cupy: Any, data: np.ndarray, shift: int) -> None:
        self.buffer = cupy.zeros(data.nbytes + 512, dtype=cupy.uint8)
        start = (-self.buffer.data.ptr) % 256 + shift
        self.view = self.buffer[start : start + data.nbytes]
        self.view.set(data)
        self.ptr, self.nbytes = int(self.view.data.ptr), data.nbytes

    def host(self) -> np.ndarray:
        return self.view.get()


def _id_copy(cupy: Any, plan: KVCopyPlan, src: _Side, dst: _Side, stream: Any) -> IdLaunch:
    form = form_of(plan)
    assert form is not None
    launch = id_launch.prepare(form, src.ptr, dst.ptr, 0)
    completion = id_launch.launch_ids(
        launch,
        plan.src_block_ids,
        plan.dst_block_ids,
        plan.src_layers,
        plan.dst_layers,
        plan.num_tokens,
        device=0,
        stream=stream,
    )
    completion.synchronize()
    assert completion.done
    return launch


def _check(cupy: Any, plan: KVCopyPlan, src_host: np.ndarray, dst_host: np.ndarray, shifts: tuple[int, int]) -> str:
    """The id kernel, the table kernel and the reference land the same bytes; returns the id entry used."""
    expected = dst_host.copy()
    reference.copy_kv(src_host, expected, plan)
    stream = cupy.cuda.Stream(non_blocking=True)
    src, dst, tables = _Side(cupy, src_host, shifts[0]), _Side(cupy, dst_host, shifts[1]), _Side(cupy, dst_host, 0)
    launch = _id_copy(cupy, plan, src, dst, stream)
    kernels.copy_kv_pointers(src.ptr, src.nbytes, tables.ptr, tables.nbytes, plan, device=0, stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(dst.host(), expected, err_msg=launch.entry)
    np.testing.assert_array_equal(tables.host(), expected, err_msg="table path")
    np.testing.assert_array_equal(src.host(), src_host)
    return launch.entry


@pytest.mark.parametrize("seed", range(40))
def test_random_requests_match_reference_and_table_path(cupy: Any, seed: int) -> None:
    case = random_request(seed)
    rng = np.random.default_rng(seed)
    shifts = (0, 0) if seed % 3 else (int(rng.integers(0, 16)), int(rng.integers(0, 16)))
    _check(cupy, case.plan, case.src, case.dst, shifts)


def _llama(block_size: int, layout: str, heads: int, blocks: int, layers: int = 4) -> KVCacheSpec:
    return KVCacheSpec(
        num_layers=layers, num_blocks=blocks, block_size=block_size, num_kv_heads=heads, head_dim=128, layout=layout
    )


@pytest.mark.parametrize(
    "src_layout, dst_layout, src_block, dst_block, src_heads, dst_heads, tokens, shift",
    [
        ("HND", "HND", 16, 16, (0, 8), (0, 8), 512, 0),  # run entry, 16-byte vectors
        ("HND", "HND", 16, 16, (0, 8), (0, 8), 509, 8),  # an odd last block; 8-byte vectors
        ("NHD", "HND", 16, 32, (4, 8), (0, 4), 300, 0),  # TP 1 -> 2 re-tile: rows entry
        ("HND", "NHD", 32, 16, (0, 4), (4, 8), 333, 4),  # TP 2 -> 1; 4-byte vectors
        ("NHD", "NHD", 256, 256, (0, 8), (0, 8), 700, 2),  # 512 KiB blocks in pieces; 2-byte vectors
        ("HND", "HND", 16, 16, (2, 6), (0, 4), 100, 1),  # single bytes
    ],
)
def test_llama_shaped_requests_every_vector_width(
    cupy: Any,
    src_layout: str,
    dst_layout: str,
    src_block: int,
    dst_block: int,
    src_heads: tuple[int, int],
    dst_heads: tuple[int, int],
    tokens: int,
    shift: int,
) -> None:
    rng = np.random.default_rng(tokens)
    src_spec = _llama(src_block, src_layout, 8, -(-tokens // src_block) + 3)
    dst_spec = _llama(dst_block, dst_layout, 8, -(-tokens // dst_block) + 5)
    plan = kernels.plan_kv_copy(
        src_spec,
        dst_spec,
        rng.permutation(src_spec.num_blocks)[: -(-tokens // src_block)],
        rng.permutation(dst_spec.num_blocks)[: -(-tokens // dst_block)],
        num_tokens=tokens,
        src_layers=[3, 1, 0],
        dst_layers=[0, 2, 3],
        src_heads=src_heads,
        dst_heads=dst_heads,
    )
    entry = _check(cupy, plan, random_bytes(rng, src_spec.nbytes), random_bytes(rng, dst_spec.nbytes), (shift, 0))
    assert entry.endswith(f"_v{min(16, shift & -shift) if shift else 16}"), entry


def test_llama_4k_request_equals_the_table_path(cupy: Any) -> None:
    """Llama-3.1-8B shaped, 4096 tokens, shuffled ids, every layer: 16,384 boxes, a grid striding over them."""
    spec = KVCacheSpec(num_layers=32, num_blocks=300, block_size=16, num_kv_heads=8, head_dim=128)
    rng = np.random.default_rng(4)
    src = cupy.asarray(random_bytes(rng, spec.nbytes))
    by_ids, by_tables = cupy.zeros(spec.nbytes, cupy.uint8), cupy.zeros(spec.nbytes, cupy.uint8)
    plan = kernels.plan_kv_copy(spec, spec, rng.permutation(300)[:256], rng.permutation(300)[:256])
    stream = cupy.cuda.Stream(non_blocking=True)
    form = form_of(plan)
    assert form is not None
    launch = id_launch.prepare(form, src.data.ptr, by_ids.data.ptr, 0)
    assert launch.entry == "kvxfer_ids_run_v16" and launch.num_ctas(32 * 2 * 256) == 32 * 2 * 256  # a CTA per box
    id_launch.launch_ids(
        launch, plan.src_block_ids, plan.dst_block_ids, plan.src_layers, plan.dst_layers, 4096, device=0, stream=stream
    ).synchronize()
    kernels.copy_kv_pointers(src.data.ptr, src.nbytes, by_tables.data.ptr, by_tables.nbytes, plan, device=0)
    cupy.cuda.runtime.deviceSynchronize()
    assert bool((by_ids == by_tables).all()) and int(cupy.count_nonzero(by_ids)) > spec.nbytes // 3


def test_requests_queued_behind_busy_work_keep_their_own_ids(cupy: Any) -> None:
    """More requests than ring slots, queued without syncs behind milliseconds of work: no slot is refilled while
    its launch may still read it (the pool fallback runs too), and each completion fires after its own copy."""
    rng = np.random.default_rng(13)
    spec = _llama(16, "HND", 8, 128)
    src_host = random_bytes(rng, spec.nbytes)
    src = cupy.asarray(src_host)
    requests = 2 * table_ring.MAX_SLOTS + 5
    outputs = [cupy.zeros(spec.nbytes, dtype=cupy.uint8) for _ in range(requests)]
    cupy.cuda.runtime.deviceSynchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    busy = cupy.zeros(256 << 20, dtype=cupy.uint8)
    with stream:
        for _ in range(20):
            busy += 1
    work: list[tuple[KVCopyPlan, Any, Any]] = []
    for out in outputs:
        tokens = int(rng.integers(1, 64 * 16 + 1))
        blocks = -(-tokens // 16)
        plan = kernels.plan_kv_copy(
            spec, spec, rng.permutation(128)[:blocks], rng.permutation(128)[:blocks], num_tokens=tokens
        )
        form = form_of(plan)
        assert form is not None
        launch = id_launch.prepare(form, src.data.ptr, out.data.ptr, 0)
        completion = id_launch.launch_ids(
            launch,
            plan.src_block_ids,
            plan.dst_block_ids,
            plan.src_layers,
            plan.dst_layers,
            tokens,
            device=0,
            stream=stream,
        )
        if not work:
            assert not completion.done  # queued behind milliseconds of work
        work.append((plan, out, completion))
    work[-1][2].synchronize()
    assert all(completion.done for _, _, completion in work)
    for plan, out, _ in work:
        expected = np.zeros(spec.nbytes, dtype=np.uint8)
        reference.copy_kv(src_host, expected, plan)
        np.testing.assert_array_equal(cupy.asnumpy(out), expected)
