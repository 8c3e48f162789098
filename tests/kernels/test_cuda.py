"""The CUDA kernel against the NumPy reference, bit for bit (marked gpu: skipped without cupy and a GPU).

Every case starts from fresh random bytes on both sides (the destination's are the poison: the whole destination
buffer is compared, so bytes the plan does not name must come back unchanged).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import kvxfer.kernels as kernels
from kvxfer.kernels import reference
from kvxfer.spec import KVCacheSpec
from tests.kernels.cases import random_bytes, random_case, random_spec

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

TOTAL_HEADS = 8
TP_PAIRS = [(1, 2), (2, 1), (2, 4), (4, 2), (1, 8)]
LAYOUTS = [("NHD", "NHD"), ("NHD", "HND"), ("HND", "NHD"), ("HND", "HND"), ("padded", "padded")]


@pytest.fixture(scope="module")
def cupy() -> Any:
    return pytest.importorskip("cupy")


def _rank_spec(
    rng: np.random.Generator,
    layout: str,
    tp_size: int,
    rank: int,
    *,
    block_size: int,
    num_blocks: int,
    itemsize: int,
    head_dim: int,
    layers: int,
) -> KVCacheSpec:
    padded = layout == "padded"
    return random_spec(
        rng,
        num_layers=layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=TOTAL_HEADS // tp_size,
        head_dim=head_dim,
        itemsize=itemsize,
        layout=None if padded else layout,
        padded=padded,
        offset=None if padded else 0,
        total_kv_heads=TOTAL_HEADS,
        tp_size=tp_size,
        tp_rank=rank,
    )


def _head_overlap(src: KVCacheSpec, dst: KVCacheSpec) -> tuple[tuple[int, int], tuple[int, int]] | None:
    (a0, a1), (b0, b1) = src.head_range(), dst.head_range()
    low, high = max(a0, b0), min(a1, b1)
    if low >= high:
        return None
    return (low - a0, high - a0), (low - b0, high - b0)


def _check_retile(
    cupy: Any,
    seed: int,
    layouts: tuple[str, str],
    itemsize: int,
    block_size: int,
    tp_pair: tuple[int, int],
    block_change: bool,
) -> None:
    rng = np.random.default_rng(seed)
    head_dim = 64
    dst_block = block_size if not block_change else (block_size * 2 if block_size < 64 else block_size // 4)
    tokens = int(rng.integers(1, 3 * max(block_size, dst_block) + 2))
    layers = 3
    n_src, n_dst = -(-tokens // block_size), -(-tokens // dst_block)
    senders = [
        _rank_spec(
            rng,
            layouts[0],
            tp_pair[0],
            r,
            block_size=block_size,
            num_blocks=n_src + 3,
            itemsize=itemsize,
            head_dim=head_dim,
            layers=layers,
        )
        for r in range(tp_pair[0])
    ]
    receivers = [
        _rank_spec(
            rng,
            layouts[1],
            tp_pair[1],
            r,
            block_size=dst_block,
            num_blocks=n_dst + 3,
            itemsize=itemsize,
            head_dim=head_dim,
            layers=layers,
        )
        for r in range(tp_pair[1])
    ]
    host_src = [random_bytes(rng, s.nbytes) for s in senders]
    host_dst = [random_bytes(rng, s.nbytes) for s in receivers]
    device_src = [cupy.asarray(b) for b in host_src]
    device_dst = [cupy.asarray(b) for b in host_dst]
    src_ids = [rng.permutation(s.num_blocks)[:n_src] for s in senders]
    dst_ids = [rng.permutation(s.num_blocks)[:n_dst] for s in receivers]
    for i, sender in enumerate(senders):
        for j, receiver in enumerate(receivers):
            heads = _head_overlap(sender, receiver)
            if heads is None:
                continue
            plan = kernels.plan_kv_copy(
                sender, receiver, src_ids[i], dst_ids[j], num_tokens=tokens, src_heads=heads[0], dst_heads=heads[1]
            )
            reference.copy_kv(host_src[i], host_dst[j], plan)
            kernels.copy_kv(device_src[i], device_dst[j], plan)
    cupy.cuda.get_current_stream().synchronize()
    for j in range(len(receivers)):
        np.testing.assert_array_equal(cupy.asnumpy(device_dst[j]), host_dst[j], err_msg=f"receiver {j}")
    for i in range(len(senders)):
        np.testing.assert_array_equal(cupy.asnumpy(device_src[i]), host_src[i], err_msg=f"sender {i} changed")


@pytest.mark.parametrize("tp_pair", TP_PAIRS, ids=lambda p: f"tp{p[0]}to{p[1]}")
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_retile_matches_reference(cupy: Any, itemsize: int, block_size: int, tp_pair: tuple[int, int]) -> None:
    for k, layouts in enumerate(LAYOUTS):
        for block_change in (False, True):
            seed = hash((itemsize, block_size, tp_pair, k, block_change)) % 2**32
            _check_retile(cupy, seed, layouts, itemsize, block_size, tp_pair, block_change)


@pytest.mark.parametrize("seed", range(40))
def test_random_shapes_and_alignments_match_reference(cupy: Any, seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    itemsize = int(rng.choice([1, 2, 4, 8]))
    head_dim = int(rng.choice([1, 3, 8, 40, 64, 128, 192]))
    parts, layers = int(rng.integers(1, 3)), int(rng.integers(1, 5))
    src_spec = random_spec(
        rng,
        num_layers=layers,
        num_blocks=int(rng.integers(4, 40)),
        block_size=int(rng.choice([1, 3, 16, 64])),
        num_kv_heads=int(rng.integers(1, 9)),
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    dst_spec = random_spec(
        rng,
        num_layers=layers,
        num_blocks=int(rng.integers(8, 40)),
        block_size=int(rng.choice([1, 5, 16, 32])),
        num_kv_heads=int(rng.integers(1, 9)),
        head_dim=head_dim,
        itemsize=itemsize,
        num_kv_parts=parts,
    )
    capacity = min(src_spec.num_blocks * src_spec.block_size, dst_spec.num_blocks * dst_spec.block_size)
    case = random_case(
        rng, src_spec=src_spec, dst_spec=dst_spec, num_tokens=int(rng.integers(1, capacity + 1)), slack=64
    )
    shift_src = int(rng.integers(0, 2)) * int(rng.integers(1, 16))
    src = cupy.asarray(case.src)
    dst = cupy.asarray(case.dst)
    expected = case.dst.copy()
    reference.copy_kv(case.src, expected, case.plan)
    if shift_src:  # run from an unaligned start: same bytes, base moved by shift_src
        moved = cupy.zeros(case.src.nbytes + 16, dtype=cupy.uint8)
        moved[shift_src : shift_src + case.src.nbytes] = src
        src = moved[shift_src : shift_src + case.src.nbytes]
    kernels.copy_kv(src, dst, case.plan, stream=[None, 0][seed % 2])
    cupy.cuda.runtime.deviceSynchronize()
    np.testing.assert_array_equal(cupy.asnumpy(dst), expected)
    np.testing.assert_array_equal(cupy.asnumpy(src), case.src)


def _llama_like(layout: str = "NHD", **change: Any) -> KVCacheSpec:
    """A small Llama-shaped cache; ``change`` overrides any field (num_blocks, block_size, dtype, ...)."""
    fields: dict[str, Any] = dict(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=128)
    return KVCacheSpec(layout=layout, **(fields | change))


def test_torch_tensors_on_a_side_stream() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    spec, staging_layout = _llama_like(), kernels.staging_spec(_llama_like(), 100)
    cache = torch.randn(spec.tensor_shape, dtype=torch.bfloat16, device="cuda")
    staging = torch.full((staging_layout.nbytes // 2,), 7.0, dtype=torch.bfloat16, device="cuda")
    back = torch.zeros_like(cache)
    blocks = [40, 3, 17, 60, 9, 22, 31]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.gather_blocks(cache, spec, blocks, staging, num_tokens=100)  # torch's current stream: the side one
    kernels.scatter_blocks(staging, staging_layout, back, spec, blocks, stream=stream)  # an explicit torch stream
    stream.synchronize()
    expected = np.zeros(back.numel() * 2, dtype=np.uint8)
    plan = kernels.plan_kv_copy(spec, spec, blocks, blocks, num_tokens=100)
    reference.copy_kv(cache.cpu(), expected, plan)
    np.testing.assert_array_equal(back.cpu().view(torch.uint8).numpy().ravel(), expected)


def test_cupy_stream_pointer_entry_and_uploaded_plan(cupy: Any) -> None:
    rng = np.random.default_rng(5)
    src_spec, dst_spec = _llama_like("NHD"), _llama_like("HND", num_blocks=32, block_size=32)
    plan = kernels.upload_plan(
        kernels.plan_kv_copy(src_spec, dst_spec, rng.permutation(64)[:20], rng.permutation(32)[:10]), device=0
    )
    src_host, dst_host = random_bytes(rng, src_spec.nbytes), random_bytes(rng, dst_spec.nbytes)
    expected = dst_host.copy()
    reference.copy_kv(src_host, expected, plan)
    src, dst = cupy.asarray(src_host), cupy.asarray(dst_host)
    cupy.cuda.runtime.deviceSynchronize()  # the non-blocking stream below does not wait for the uploads
    stream = cupy.cuda.Stream(non_blocking=True)
    for _ in range(2):  # the uploaded tables serve every call
        kernels.copy_kv_pointers(src.data.ptr, src.nbytes, dst.data.ptr, dst.nbytes, plan, device=0, stream=stream)
    kernels.copy_kv(src, dst, plan, stream=stream.ptr)  # a raw cudaStream_t
    stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(dst), expected)


def test_gather_scatter_round_trip_fp8_and_mla(cupy: Any) -> None:
    fp8 = KVCacheSpec(num_layers=3, num_blocks=16, block_size=64, num_kv_heads=4, head_dim=128, dtype="float8_e4m3fn")
    mla = KVCacheSpec(num_layers=3, num_blocks=16, block_size=64, num_kv_heads=1, head_dim=576, num_kv_parts=1)
    for spec in (fp8, mla):
        original = cupy.asarray(random_bytes(np.random.default_rng(9), spec.nbytes))
        layout = kernels.staging_spec(spec, 150)
        staging = cupy.zeros(layout.nbytes, dtype=cupy.uint8)
        kernels.gather_blocks(original, spec, [11, 2, 7], staging, num_tokens=150)
        back = cupy.zeros_like(original)
        kernels.scatter_blocks(staging, layout, back, spec, [11, 2, 7])
        expected = np.zeros(spec.nbytes, dtype=np.uint8)
        plan = kernels.plan_kv_copy(spec, spec, [11, 2, 7], [11, 2, 7], num_tokens=150)
        reference.copy_kv(cupy.asnumpy(original), expected, plan)
        np.testing.assert_array_equal(cupy.asnumpy(back), expected)


def _entry_plans() -> dict[str, kernels.KVCopyPlan]:
    """Plans whose launches take each kernel entry (the run entry, rows with folded tokens, plain rows)."""
    rng = np.random.default_rng(11)
    hnd, nhd = _llama_like("HND"), _llama_like("NHD")
    half = hnd.replace(num_kv_heads=4, tp_size=2, tp_rank=1)
    return {
        "run: NHD -> NHD, partial block": kernels.plan_kv_copy(
            nhd, nhd, rng.permutation(64)[:7], rng.permutation(64)[:7], num_tokens=100
        ),
        "run: HND -> HND TP half, whole blocks": kernels.plan_kv_copy(
            hnd, half, rng.permutation(64)[:8], rng.permutation(64)[:8], src_heads=(4, 8)
        ),
        "rows: HND gather, whole blocks": kernels.plan_kv_copy(
            hnd, kernels.staging_spec(hnd, 64 * 16), rng.permutation(64), [0]
        ),
        "rows: HND gather, partial block": kernels.plan_kv_copy(
            hnd, kernels.staging_spec(hnd, 1000), rng.permutation(64)[:63], [0]
        ),
        "rows: NHD -> HND": kernels.plan_kv_copy(
            nhd, hnd, rng.permutation(64)[:9], rng.permutation(64)[:9], num_tokens=140
        ),
    }


@pytest.mark.parametrize("name", list(_entry_plans()))
def test_every_entry_and_tuning_gives_the_same_bytes(cupy: Any, name: str) -> None:
    from kvxfer.kernels import _cuda
    from kvxfer.kernels.launch import KernelTuning

    plan = _entry_plans()[name]
    rng = np.random.default_rng(12)
    src = cupy.asarray(random_bytes(rng, plan.src_spec.nbytes))
    poison = random_bytes(rng, plan.dst_spec.nbytes)
    expected = poison.copy()
    reference.copy_kv(cupy.asnumpy(src), expected, plan)
    dst = cupy.asarray(poison)
    form = name.split(":")[0]  # "run" or "rows"
    assert _cuda.launch_of(plan, src.data.ptr, dst.data.ptr, 0).entry == f"kvxfer_{form}_v16"
    tunings = [
        KernelTuning(),
        KernelTuning(waves=1.0),
        KernelTuning(waves=0.01),
        KernelTuning(waves=4.0),
        KernelTuning(waves=1.0, prefetch=False),
        KernelTuning(unroll=8),
        KernelTuning(unroll=2),
        KernelTuning(threads=128),
        KernelTuning(runs=False),
        KernelTuning(streaming=True),
    ]
    for tuning in tunings:
        dst = cupy.asarray(poison)
        _cuda.copy_kv(src, dst, plan, tuning=tuning)
        np.testing.assert_array_equal(cupy.asnumpy(dst), expected, err_msg=str(tuning))
    # the 64-bit rows entry (taken only by boxes spanning >= 2 GiB) on the same plan
    dst = cupy.asarray(poison)
    shape = _cuda.launch_of(plan, src.data.ptr, dst.data.ptr, 0, KernelTuning(runs=False))
    wide = _cuda.kernel(shape.entry.replace("rows_v", "rows_wide_v"), 0)
    table = cupy.asarray(plan.tables.table)
    wide(
        (shape.num_ctas,),
        (shape.threads,),
        (
            np.uint64(src.data.ptr + plan.tables.src_base),
            np.uint64(dst.data.ptr + plan.tables.dst_base),
            table,
            *shape.scalars,
        ),
    )
    cupy.cuda.runtime.deviceSynchronize()
    np.testing.assert_array_equal(cupy.asnumpy(dst), expected, err_msg="rows_wide")


def test_requests_queued_behind_busy_work_keep_their_own_tables(cupy: Any) -> None:
    """A pipe's case: one template, fresh block ids per request, launches queued without syncs. Table slots of
    launches still in flight must not be refilled (more requests than slots: the pool fallback runs too)."""
    from kvxfer.kernels import table_ring

    rng = np.random.default_rng(13)
    spec = _llama_like("HND", num_blocks=128, block_size=16)
    src_host = random_bytes(rng, spec.nbytes)
    src = cupy.asarray(src_host)
    requests = 2 * table_ring.MAX_SLOTS + 5
    outputs = [cupy.zeros(spec.nbytes, dtype=cupy.uint8) for _ in range(requests)]
    cupy.cuda.runtime.deviceSynchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    busy = cupy.zeros(256 << 20, dtype=cupy.uint8)
    with stream:
        for _ in range(20):  # some milliseconds of work ahead of the copies
            busy += 1
    plans = []
    for out in outputs:
        tokens = int(rng.integers(1, 64 * 16 + 1))
        blocks = -(-tokens // 16)
        plan = kernels.plan_kv_copy(
            spec,
            spec,
            rng.permutation(128)[:blocks],
            rng.permutation(128)[:blocks],
            num_tokens=tokens,
            src_layers=[3, 0, 2],
            dst_heads=(0, 8),
        )
        kernels.copy_kv_pointers(src.data.ptr, src.nbytes, out.data.ptr, out.nbytes, plan, device=0, stream=stream)
        plans.append(plan)
    stream.synchronize()
    assert len({id(plan._template) for plan in plans}) == 1
    for plan, out in zip(plans, outputs, strict=True):
        expected = np.zeros(spec.nbytes, dtype=np.uint8)
        reference.copy_kv(src_host, expected, plan)
        np.testing.assert_array_equal(cupy.asnumpy(out), expected)
