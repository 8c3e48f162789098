"""csrc/id_copy.cu compiled as host C++ (after kv_copy.cu, as the launcher compiles it) and run serially
(tests/kernels/host_shim.h): every entry, vector width and grid against the NumPy reference copy, with every access
checked for bounds and alignment; and its header enum against id_copy.HEADER."""

from __future__ import annotations

import ctypes
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

import kvxfer.kernels as kernels
from kvxfer.kernels import KVCopyPlan, reference
from kvxfer.kernels.id_copy import HEADER
from kvxfer.kernels.id_launch import IdLaunch, id_launch
from kvxfer.spec import KVCacheSpec
from tests.kernels import emulator as emulation
from tests.kernels.cases import random_bytes
from tests.kernels.id_cases import form_of, random_request
from tests.kernels.id_copy_run import run_emulated

pytestmark = pytest.mark.timeout(300)


def test_header_enum_lists_the_python_header() -> None:
    source = (Path(kernels.__file__).parent / "csrc" / "id_copy.cu").read_text()
    body = re.search(r"enum kvxfer_ids_field \{(.*?)\};", source, re.S)
    assert body is not None
    names = [name.strip() for name in body.group(1).split(",") if name.strip()]
    assert names == [f"KVXFER_IDS_{field.upper()}" for field in HEADER] + ["KVXFER_IDS_HEADER_LEN"]


def _shifted(data: np.ndarray, shift: int) -> np.ndarray:
    """A copy of ``data`` placed ``shift`` bytes past a 64-byte boundary."""
    raw = np.empty(data.nbytes + 128, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + shift
    view = raw[start : start + data.nbytes]
    view[:] = data
    return view


def _emulate(
    lib: ctypes.CDLL, plan: KVCopyPlan, src: np.ndarray, dst: np.ndarray, max_ctas: int, wide: bool
) -> IdLaunch:
    form = form_of(plan)
    assert form is not None
    launch = id_launch(form, src.ctypes.data, dst.ctypes.data, max_ctas)
    if wide:
        launch = dataclasses.replace(launch, entry=launch.entry.replace("_v", "_wide_v"))
    run_emulated(lib, launch, plan, src, dst)
    return launch


@pytest.mark.parametrize("seed", range(40))
def test_emulated_kernel_matches_reference(id_emulator: ctypes.CDLL, seed: int) -> None:
    case = random_request(seed)
    rng = np.random.default_rng(1000 + seed)
    shift_src, shift_dst = (0, 0) if seed % 3 else (int(rng.integers(0, 16)), int(rng.integers(0, 16)))
    src, dst = _shifted(case.src, shift_src), _shifted(case.dst, shift_dst)
    expected = case.dst.copy()
    reference.copy_kv(case.src, expected, case.plan)
    _emulate(id_emulator, case.plan, src, dst, max_ctas=[2**31 - 1, 1, 3][seed % 3], wide=seed % 4 == 1)
    np.testing.assert_array_equal(dst, expected)
    np.testing.assert_array_equal(src, case.src)


@pytest.mark.parametrize(
    "src_layout, dst_layout, src_block, dst_block, src_heads, dst_heads, tokens",
    [
        ("HND", "HND", 16, 16, (0, 8), (0, 8), 64),  # one contiguous run per box, 16-byte vectors
        ("HND", "HND", 16, 16, (0, 8), (0, 8), 61),  # and an odd last block
        ("NHD", "HND", 16, 32, (4, 8), (0, 4), 100),  # TP 1 -> 2, re-tiled, block size doubled
        ("HND", "NHD", 32, 16, (0, 4), (4, 8), 95),  # TP 2 -> 1
        ("NHD", "NHD", 256, 256, (0, 8), (0, 8), 300),  # 512 KiB blocks cut into pieces
    ],
)
def test_emulated_llama_shaped(
    id_emulator: ctypes.CDLL,
    src_layout: str,
    dst_layout: str,
    src_block: int,
    dst_block: int,
    src_heads: tuple[int, int],
    dst_heads: tuple[int, int],
    tokens: int,
) -> None:
    rng = np.random.default_rng(tokens)
    src_spec = KVCacheSpec(
        num_layers=2,
        num_blocks=-(-tokens // src_block) + 2,
        block_size=src_block,
        num_kv_heads=8,
        head_dim=128,
        layout=src_layout,
    )
    dst_spec = src_spec.replace(num_blocks=-(-tokens // dst_block) + 3, block_size=dst_block, layout=dst_layout)
    plan = kernels.plan_kv_copy(
        src_spec,
        dst_spec,
        rng.permutation(src_spec.num_blocks)[: -(-tokens // src_block)],
        rng.permutation(dst_spec.num_blocks)[: -(-tokens // dst_block)],
        num_tokens=tokens,
        src_heads=src_heads,
        dst_heads=dst_heads,
    )
    src = _shifted(random_bytes(rng, src_spec.nbytes), 0)
    dst = _shifted(random_bytes(rng, dst_spec.nbytes), 0)
    expected = dst.copy()
    reference.copy_kv(src, expected, plan)
    launch = _emulate(id_emulator, plan, src, dst, max_ctas=7, wide=False)
    assert launch.vector == 16
    np.testing.assert_array_equal(dst, expected)


def test_emulation_builds_with_other_tunings(tmp_path: Path) -> None:
    from kvxfer.kernels.launch import KernelTuning

    lib = emulation.build_ids(tmp_path, KernelTuning(unroll=8, threads=256))
    if lib is None:
        pytest.skip("needs a C++ compiler (g++)")
    case = random_request(5)
    expected = case.dst.copy()
    reference.copy_kv(case.src, expected, case.plan)
    _emulate(lib, case.plan, case.src, case.dst, max_ctas=2, wide=False)
    np.testing.assert_array_equal(case.dst, expected)


def test_prepared_grids_one_group_per_box_for_runs_one_wave_for_rows(
    emulator: ctypes.CDLL, id_emulator: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvxfer.devices
    from kvxfer.kernels import _cuda, id_launch
    from tests.pipe.emulated_gpu import EmulatedCupy

    gpu = EmulatedCupy(emulator, id_emulator)
    monkeypatch.setattr(kvxfer.devices, "cupy_module", lambda: gpu)
    monkeypatch.setattr(_cuda, "cupy_module", lambda: gpu)
    id_launch.clear_caches()
    spec = KVCacheSpec(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=128)
    run = form_of(kernels.plan_kv_copy(spec, spec, [1], [2]))
    rows = form_of(kernels.plan_kv_copy(spec, spec.replace(layout="NHD"), [1], [2]))
    assert run is not None and rows is not None
    by_box = id_launch.prepare(run, 1 << 20, 1 << 21, 0)
    wave = id_launch.prepare(rows, 1 << 20, 1 << 21, 0)
    assert by_box.entry == "kvxfer_ids_run_v16" and by_box.num_ctas(10_000) == 10_000
    resident = 2 * min(65536 // (40 * 32 * 8), 2048 // 256)  # the emulated 2-SM device at 40 registers
    assert wave.entry == "kvxfer_ids_rows_v16" and wave.num_ctas(10_000) == resident
    assert by_box.function is not None and by_box.pointers == (np.uint64(by_box.src_addr), np.uint64(by_box.dst_addr))
    id_launch.clear_caches()
