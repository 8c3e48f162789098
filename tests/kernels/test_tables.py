"""Cached plan templates (kvxfer/kernels/tables.py TableTemplate) against tables computed from scratch.

A KV pipe plans every request with the same specs, layers, parts and heads and new block ids; plan_kv_copy then
reuses a template. Its tables must equal kernel_tables(plan) byte for byte, and its checks must raise what a fresh
plan raises.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvxfer.errors import ConfigError, DescriptorError, LayoutMismatchError
from kvxfer.kernels import copy_plan, plan_kv_copy, reference, staging_spec
from kvxfer.kernels.copy_plan import KVCopyPlan
from kvxfer.kernels.tables import MAX_BOX_BYTES, KernelTables, kernel_tables
from kvxfer.spec import KVCacheSpec
from tests.kernels.cases import random_spec

pytestmark = pytest.mark.timeout(120)

SPEC = KVCacheSpec(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=64, layout="HND")


@pytest.fixture(autouse=True)
def _no_templates() -> None:
    copy_plan._TEMPLATES.clear()


def assert_same_tables(actual: KernelTables, expected: KernelTables) -> None:
    """Every field equal, arrays with equal dtype, shape and bytes."""
    for field in dataclasses.fields(KernelTables):
        a, b = getattr(actual, field.name), getattr(expected, field.name)
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, field.name
            assert a.tobytes() == b.tobytes(), field.name
        else:
            assert type(a) is type(b) and a == b, (field.name, a, b)


def _random_ids(rng: np.random.Generator, spec: KVCacheSpec, tokens: int, unique: bool) -> np.ndarray:
    count = -(-tokens // spec.block_size)
    if unique:
        return rng.permutation(spec.num_blocks)[:count]
    return rng.integers(0, spec.num_blocks, size=count)


@pytest.mark.parametrize("seed", range(40))
def test_template_tables_equal_fresh_tables(seed: int) -> None:
    rng = np.random.default_rng(seed)
    itemsize, head_dim, parts = int(rng.choice([1, 2, 4])), int(rng.choice([1, 8, 64, 256])), int(rng.integers(1, 3))
    heads = int(rng.integers(1, 5))
    blocks = [int(rng.choice([1, 3, 4, 16, 64, 256])) for _ in range(2)]
    src_spec, dst_spec = (
        random_spec(
            rng,
            num_layers=3,
            num_blocks=40,
            block_size=b,
            num_kv_heads=heads,
            head_dim=head_dim,
            itemsize=itemsize,
            num_kv_parts=parts,
        )
        for b in blocks
    )
    moved = int(rng.integers(1, heads + 1))
    h0, g0 = int(rng.integers(0, heads - moved + 1)), int(rng.integers(0, heads - moved + 1))
    layers = rng.permutation(3)[: int(rng.integers(1, 4))]
    options = dict(
        src_layers=layers,
        dst_layers=rng.permutation(3)[: len(layers)],
        src_heads=(h0, h0 + moved),
        dst_heads=(g0, g0 + moved),
        parts=[parts - 1] if rng.integers(0, 2) else None,
    )
    capacity = min(40 * src_spec.block_size, 40 * dst_spec.block_size)
    # Token counts that start small, grow past the template's runs, come back and hit the edges.
    counts = [int(rng.integers(1, capacity + 1)) for _ in range(6)]
    counts += [0, 1, capacity, capacity // 2, min(blocks[0], capacity), counts[0]]
    templates = set()
    for tokens in counts:
        plan = plan_kv_copy(
            src_spec,
            dst_spec,
            _random_ids(rng, src_spec, tokens, False),
            _random_ids(rng, dst_spec, tokens, True),
            num_tokens=tokens,
            **options,
        )
        templates.add(id(plan._template))
        assert_same_tables(plan.tables, kernel_tables(plan))
    assert len(templates) == 1


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 255, 256, 600, 1024])
def test_block_size_changes_and_cut_runs(tokens: int) -> None:
    rng = np.random.default_rng(tokens)
    big = SPEC.replace(block_size=256, num_blocks=8)
    for src, dst in [
        (SPEC, SPEC.replace(block_size=48)),
        (big, SPEC),
        (SPEC.replace(block_size=5), big),
        (big, staging_spec(big, tokens)),
    ]:
        for _ in range(3):  # the first plan builds the template, the others reuse it
            plan = plan_kv_copy(
                src, dst, _random_ids(rng, src, tokens, False), _random_ids(rng, dst, tokens, True), num_tokens=tokens
            )
            assert_same_tables(plan.tables, kernel_tables(plan))
            assert plan.tables.max_count * plan.tables.unit_rows * plan.tables.row_nbytes <= MAX_BOX_BYTES
    # one cached template per (src, dst) pair, whatever the token count
    assert len(copy_plan._TEMPLATES) == 4


def test_head_slices_of_tp_ranks_share_nothing_but_are_each_cached() -> None:
    ranks = [SPEC.replace(num_kv_heads=4, tp_size=2, tp_rank=r) for r in range(2)]
    rng = np.random.default_rng(0)
    for _ in range(3):
        for rank in ranks:
            heads = rank.head_range()
            plan = plan_kv_copy(SPEC, rank, rng.permutation(64)[:4], rng.permutation(64)[:4], src_heads=heads)
            assert_same_tables(plan.tables, kernel_tables(plan))
            assert plan.src_heads == heads and plan.tables.src_base == heads[0] * 16 * 64 * 2
    assert len(copy_plan._TEMPLATES) == 2


def test_template_copies_are_read_only_and_callers_arrays_stay_theirs() -> None:
    layers = np.array([2, 0], dtype=np.int64)
    first = plan_kv_copy(SPEC, SPEC, [1], [2], src_layers=layers)
    layers[0] = 3  # the caller reuses its array: a different key, a different plan
    second = plan_kv_copy(SPEC, SPEC, [1], [2], src_layers=layers)
    assert first.src_layers.tolist() == [2, 0] and second.src_layers.tolist() == [3, 0]
    assert not first.src_layers.flags.writeable and not first.parts.flags.writeable
    again = plan_kv_copy(SPEC, SPEC, [4], [5], src_layers=np.array([2, 0]))
    assert again._template is first._template and again.src_layers is first.src_layers


def test_replaced_plans_fall_back_to_fresh_tables() -> None:
    plan = plan_kv_copy(SPEC, SPEC, [1, 2], [3, 4])
    other = dataclasses.replace(plan, dst_spec=SPEC.replace(layout="NHD"))
    assert not plan._template.describes(other)
    assert_same_tables(other.tables, kernel_tables(other))
    assert other.tables.unit_rows != plan.tables.unit_rows


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(src_block_ids=[64]), DescriptorError, "[0, 64)"),
        (dict(dst_block_ids=[-1]), DescriptorError, "[0, 64)"),
        (dict(src_block_ids=[[0]]), DescriptorError, "1-D"),
        (dict(src_block_ids=[0.5]), DescriptorError, "integers"),
        (dict(src_block_ids=[0, 1], dst_block_ids=[0, 1], num_tokens=16), DescriptorError, "need 1"),
        (dict(src_block_ids=[0, 1], dst_block_ids=[5, 5]), DescriptorError, "repeat"),
        (dict(num_tokens=-1), ConfigError, "num_tokens"),
        (dict(src_layers=[1.0, 2.0]), DescriptorError, "integers"),
        (dict(src_layers=[1, 2], dst_layers=[2, 2]), DescriptorError, "repeat"),
        (dict(src_heads=(0, 4), dst_heads=(0, 3)), LayoutMismatchError, "as many heads"),
        (dict(src_heads=(0.0, 4), dst_heads=(0, 4)), None, None),  # not a key type: planned from scratch, valid
    ],
)
def test_warm_cache_raises_what_a_fresh_plan_raises(kwargs: dict, error: type | None, words: str | None) -> None:
    arguments = dict(src_block_ids=[0], dst_block_ids=[1], src_layers=[1, 2]) | kwargs
    src_ids, dst_ids = arguments.pop("src_block_ids"), arguments.pop("dst_block_ids")
    for warm in (False, True):
        if warm:  # the same non-id arguments (with good ids), and those of the good base case, planned before
            good = {k: v for k, v in arguments.items() if k != "num_tokens"}
            for options in (good, dict(src_layers=[1, 2])):
                try:
                    plan_kv_copy(SPEC, SPEC, [0], [1], **options)
                except (DescriptorError, ConfigError):
                    pass
        if error is None:
            plan = plan_kv_copy(SPEC, SPEC, src_ids, dst_ids, **arguments)
            assert_same_tables(plan.tables, kernel_tables(plan))
            continue
        with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            plan_kv_copy(SPEC, SPEC, src_ids, dst_ids, **arguments)


def test_template_plans_copy_like_fresh_ones() -> None:
    rng = np.random.default_rng(5)
    nhd = SPEC.replace(layout="NHD", block_size=8, num_blocks=128)
    src = rng.integers(0, 256, SPEC.nbytes, dtype=np.uint8)
    for tokens in (40, 37, 40):
        src_ids, dst_ids = rng.permutation(64)[: -(-tokens // 16)], rng.permutation(128)[: -(-tokens // 8)]
        plan = plan_kv_copy(SPEC, nhd, src_ids, dst_ids, num_tokens=tokens, src_layers=[3, 1], dst_layers=[0, 2])
        fresh = KVCopyPlan(
            SPEC, nhd, src_ids, dst_ids, tokens, np.array([3, 1]), np.array([0, 2]), np.arange(2), (0, 8), (0, 8)
        )
        assert fresh._template is None and plan._template is not None
        expected, actual = np.zeros(nhd.nbytes, np.uint8), np.zeros(nhd.nbytes, np.uint8)
        reference.copy_kv(src, expected, fresh)
        reference.copy_kv(src, actual, plan)
        np.testing.assert_array_equal(actual, expected)
        assert_same_tables(plan.tables, fresh.tables)
