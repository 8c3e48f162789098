"""csrc/kv_copy.cu compiled as host C++ and run serially (tests/kernels/host_shim.h) against the NumPy reference.

This checks, on a CPU machine, the kernel's index math, the tables and launch shapes from copy_plan.py, every
vector width, grid striding and group sizes; the shim also counts out-of-bounds and misaligned accesses.
"""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import pytest

import kvxfer.kernels as kernels
from kvxfer.kernels import reference
from kvxfer.kernels.copy_plan import KVCopyPlan, staging_spec
from kvxfer.kernels.launch import DEFAULT_TUNING, KernelTuning, LaunchShape, launch_shape
from tests.kernels import emulator as emulation
from tests.kernels.cases import random_bytes, random_case, random_spec

pytestmark = pytest.mark.timeout(300)


def _run(
    lib: ctypes.CDLL,
    plan: KVCopyPlan,
    src: np.ndarray,
    dst: np.ndarray,
    max_ctas: int | None,
    tuning: KernelTuning = DEFAULT_TUNING,
    wide: bool = False,
) -> LaunchShape:
    """Emulate one launch on host buffers; returns its shape. ``wide``: force the 64-bit rows entry."""
    src_addr, dst_addr = src.ctypes.data, dst.ctypes.data
    shape = launch_shape(plan.tables, src_addr, dst_addr, tuning, max_ctas=max_ctas)
    if wide:
        shape = dataclasses.replace(shape, entry=f"kvxfer_rows_wide_v{shape.vector_bytes}")
    violations = emulation.launch_shape(
        lib, shape, (src_addr, src_addr + src.nbytes), (dst_addr, dst_addr + dst.nbytes), plan.tables.table.ctypes.data
    )
    assert violations == 0, "out-of-bounds or misaligned accesses"
    return shape


def _shifted(data: np.ndarray, shift: int) -> np.ndarray:
    """A copy of ``data`` placed ``shift`` bytes past a 64-byte boundary."""
    raw = np.empty(data.nbytes + 128, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + shift
    view = raw[start : start + data.nbytes]
    view[:] = data
    return view


@pytest.mark.parametrize("seed", range(60))
def test_emulated_kernel_matches_reference(emulator: ctypes.CDLL, seed: int) -> None:
    _check_random_case(emulator, seed, DEFAULT_TUNING)


def test_random_cases_reach_every_entry(emulator: ctypes.CDLL) -> None:
    entries = {_check_random_case(emulator, seed, DEFAULT_TUNING).entry.rsplit("_v", 1)[0] for seed in range(60)}
    assert entries == {"kvxfer_run", "kvxfer_rows"}  # kvxfer_rows_wide: forced below (needs >= 2 GiB boxes)


@pytest.mark.parametrize("seed", range(200, 230))
def test_emulated_wide_entry_and_rows_for_runs_match_reference(emulator: ctypes.CDLL, seed: int) -> None:
    _check_random_case(emulator, seed, DEFAULT_TUNING, wide=seed % 2 == 0)
    _check_random_case(emulator, seed, KernelTuning(runs=False))


@pytest.mark.parametrize(
    "tuning",
    [
        KernelTuning(waves=1.0),
        KernelTuning(waves=1.0, prefetch=False),
        KernelTuning(unroll=8),
        KernelTuning(unroll=1),
        KernelTuning(threads=128),
        KernelTuning(threads=32, unroll=2),
        KernelTuning(streaming=True),
    ],
    ids=str,
)
def test_emulated_tunings_match_reference(tmp_path_factory: pytest.TempPathFactory, tuning: KernelTuning) -> None:
    lib = emulation.build(tmp_path_factory.mktemp("tuned"), tuning)
    if lib is None:
        pytest.skip("needs a C++ compiler (g++)")
    for seed in range(100, 115):
        _check_random_case(lib, seed, tuning)


def _check_random_case(emulator: ctypes.CDLL, seed: int, tuning: KernelTuning, wide: bool = False) -> LaunchShape:
    rng = np.random.default_rng(seed)
    itemsize = int(rng.choice([1, 2, 4, 8]))
    head_dim = int(rng.choice([1, 3, 8, 16, 64]))
    parts, layers = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    src_spec = random_spec(
        rng,
        num_layers=layers,
        num_blocks=int(rng.integers(3, 10)),
        block_size=int(rng.choice([1, 2, 5, 16])),
        num_kv_heads=int(rng.integers(1, 5)),
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    same = seed % 4 == 1  # same layout and block size: whole blocks fold into runs
    dst_spec = random_spec(
        rng,
        num_layers=layers + int(rng.integers(0, 2)),
        num_blocks=int(rng.integers(6, 12)),
        block_size=src_spec.block_size if same else int(rng.choice([1, 3, 8, 32])),
        num_kv_heads=src_spec.num_kv_heads if same else int(rng.integers(1, 5)),
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
        layout=src_spec.layout.value if same else None,
        padded=False if same else None,
    )
    capacity = min(src_spec.num_blocks * src_spec.block_size, dst_spec.num_blocks * dst_spec.block_size)
    tokens = int(rng.integers(1, capacity + 1))
    if same and seed % 8 == 1:
        tokens = max(1, tokens // src_spec.block_size) * src_spec.block_size
    case = random_case(
        rng, src_spec=src_spec, dst_spec=dst_spec, num_tokens=tokens, num_heads=src_spec.num_kv_heads if same else None
    )
    shift_src, shift_dst = (0, 0) if seed % 3 else (int(rng.integers(0, 16)), int(rng.integers(0, 16)))
    src, dst = _shifted(case.src, shift_src), _shifted(case.dst, shift_dst)
    expected = case.dst.copy()
    reference.copy_kv(case.src, expected, case.plan)
    shape = _run(emulator, case.plan, src, dst, max_ctas=[None, 1, 3][seed % 3], tuning=tuning, wide=wide)
    np.testing.assert_array_equal(dst, expected)
    np.testing.assert_array_equal(src, case.src)
    return shape


def test_emulated_vector_width_is_16_bytes_for_aligned_bf16(emulator: ctypes.CDLL) -> None:
    rng = np.random.default_rng(7)
    cache = random_spec(
        rng,
        num_layers=2,
        num_blocks=8,
        block_size=16,
        num_kv_heads=4,
        head_dim=128,
        itemsize=2,
        layout="NHD",
        padded=False,
        offset=0,
    )
    staging = staging_spec(cache, 40, heads=(1, 3))
    plan = kernels.plan_kv_copy(cache, staging, [5, 0, 7], [0], num_tokens=40, src_heads=(1, 3))
    src, dst = _shifted(random_bytes(rng, cache.nbytes), 0), _shifted(random_bytes(rng, staging.nbytes), 0)
    expected = dst.copy()
    reference.copy_kv(src, expected, plan)
    assert _run(emulator, plan, src, dst, max_ctas=None).vector_bytes == 16
    np.testing.assert_array_equal(dst, expected)


def test_emulated_odd_address_falls_back_to_bytes(emulator: ctypes.CDLL) -> None:
    rng = np.random.default_rng(8)
    cache = random_spec(
        rng,
        num_layers=1,
        num_blocks=4,
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        itemsize=2,
        layout="HND",
        padded=False,
        offset=0,
    )
    plan = kernels.plan_kv_copy(cache, cache, [0, 1], [3, 2])
    data = _shifted(random_bytes(rng, cache.nbytes), 1)
    out = _shifted(random_bytes(rng, cache.nbytes), 3)
    expected = out.copy()
    reference.copy_kv(data, expected, plan)
    assert _run(emulator, plan, data, out, max_ctas=2).vector_bytes == 1
    np.testing.assert_array_equal(out, expected)


def test_emulated_big_blocks_cut_into_boxes(emulator: ctypes.CDLL) -> None:
    rng = np.random.default_rng(9)
    cache = random_spec(
        rng,
        num_layers=1,
        num_blocks=3,
        block_size=256,
        num_kv_heads=4,
        head_dim=128,
        itemsize=2,
        layout="NHD",
        padded=False,
        offset=0,
    )
    staging = staging_spec(cache, 300, layout="HND")
    plan = kernels.plan_kv_copy(cache, staging, [2, 0], [0], num_tokens=300)
    assert plan.tables.num_segments > 2
    src, dst = _shifted(random_bytes(rng, cache.nbytes), 0), _shifted(random_bytes(rng, staging.nbytes), 0)
    expected = dst.copy()
    reference.copy_kv(src, expected, plan)
    assert _run(emulator, plan, src, dst, max_ctas=5).vector_bytes == 16
    np.testing.assert_array_equal(dst, expected)
