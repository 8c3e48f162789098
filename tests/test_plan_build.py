"""The fast paths of plan building (spec offsets, coalescing, region checks) agree with plain reference code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer import ConfigError, DescriptorError, Descs, KVCacheSpec
from kvxfer.descs import coalesce_pairs
from kvxfer.plan import RegionTable
from kvxfer.spec import outer_sum
from kvxfer.tuning import keep_freed_memory


def _reference_coalesce(local: Descs, remote: Descs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pre-optimisation algorithm: merge i, i+1 when adjacent on both sides within one region each."""
    runs: list[list[int]] = []
    for i in range(len(local)):
        if runs:
            j = runs[-1][-1]
            if (
                int(local.addr[j]) + int(local.nbytes[j]) == int(local.addr[i])
                and int(remote.addr[j]) + int(remote.nbytes[j]) == int(remote.addr[i])
                and local.region[j] == local.region[i]
                and remote.region[j] == remote.region[i]
            ):
                runs[-1].append(i)
                continue
        runs.append([i])
    return (
        np.array([local.addr[r[0]] for r in runs], np.uint64),
        np.array([remote.addr[r[0]] for r in runs], np.uint64),
        np.array([sum(int(local.nbytes[k]) for k in r) for r in runs], np.uint64),
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 3), st.booleans(), st.booleans(), st.integers(0, 1), st.integers(0, 1)),
        min_size=1,
        max_size=40,
    )
)
def test_coalesce_matches_the_reference(steps: list[tuple[int, bool, bool, int, int]]) -> None:
    local_addr, remote_addr, sizes, local_region, remote_region = [], [], [], [], []
    la, ra = 1 << 20, 1 << 30
    for size_units, local_gap, remote_gap, lregion, rregion in steps:
        size = size_units * 64
        la += 64 if local_gap else 0
        ra += 128 if remote_gap else 0
        local_addr.append(la), remote_addr.append(ra), sizes.append(size)
        local_region.append(lregion), remote_region.append(rregion)
        la, ra = la + size, ra + size
    local = Descs(np.array(local_addr), np.array(sizes), np.zeros(len(sizes)), np.array(local_region), "local")
    remote = Descs(np.array(remote_addr), np.array(sizes), np.zeros(len(sizes)), np.array(remote_region), "remote")
    merged_local, merged_remote = coalesce_pairs(local, remote)
    expected_local, expected_remote, expected_sizes = _reference_coalesce(local, remote)
    assert merged_local.addr.tolist() == expected_local.tolist()
    assert merged_remote.addr.tolist() == expected_remote.tolist()
    assert merged_local.nbytes.tolist() == merged_remote.nbytes.tolist() == expected_sizes.tolist()


def test_a_backwards_neighbour_is_not_merged() -> None:
    local = Descs(np.array([4096, 0]), np.array([4096, 4096]), np.zeros(2), np.zeros(2), "l")
    remote = Descs(np.array([0, 4096]), np.array([4096, 4096]), np.zeros(2), np.zeros(2), "r")
    assert len(coalesce_pairs(local, remote)[0]) == 2


@pytest.mark.parametrize("outer_n,inner_n", [(5, 1), (5, 3), (3, 20), (0, 4), (7, 0)])
def test_outer_sum_is_a_broadcast_add(outer_n: int, inner_n: int) -> None:
    outer = np.arange(outer_n, dtype=np.int64) * 1000
    inner = np.arange(inner_n, dtype=np.int64) * 7
    assert outer_sum(outer, inner).tolist() == (outer[:, None] + inner[None, :]).ravel().tolist()


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_block_offsets_with_a_start_are_addresses(layout: str) -> None:
    spec = KVCacheSpec(
        num_layers=3, num_blocks=10, block_size=4, num_kv_heads=4, head_dim=8, dtype="float16", layout=layout
    )
    ids = [7, 2, 9]
    offsets, piece = spec.block_offsets(ids, heads=(1, 3))
    addresses, same_piece = spec.block_offsets(ids, heads=(1, 3), start=1 << 40)
    assert piece == same_piece and addresses.dtype == np.uint64
    assert addresses.tolist() == [(1 << 40) + int(o) for o in offsets]


def test_region_table_fast_path_still_refuses_what_lies_outside() -> None:
    table = RegionTable([0], [1 << 20], [1 << 16])
    inside = Descs(np.array([1 << 20, (1 << 20) + 4096]), np.array([4096, 4096]), np.zeros(2), np.zeros(2), "p")
    assert table.check(inside, "d", "me") == set()
    for addr, nbytes in (((1 << 20) - 1, 4096), ((1 << 20) + (1 << 16) - 4095, 4096), (1 << 20, 2**64 - 1)):
        bad = Descs(
            np.array([1 << 20, addr], np.uint64), np.array([4096, nbytes], np.uint64), np.zeros(2), np.zeros(2), "p"
        )
        with pytest.raises(DescriptorError, match=r"d\[1\]"):
            table.check(bad, "d", "me")
    other = Descs(np.array([1 << 20]), np.array([16]), np.zeros(1), np.array([3]), "p")
    with pytest.raises(DescriptorError, match="unknown"):
        table.check(other, "d", "me")


def test_keep_freed_memory_in_a_fresh_process() -> None:
    code = "from kvxfer.tuning import keep_freed_memory; print(keep_freed_memory())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == ("True" if sys.platform == "linux" else result.stdout.strip())
    with pytest.raises(ConfigError, match="trim_nbytes"):
        keep_freed_memory(trim_nbytes=0)
