"""The sweep's grid, workloads and byte checks (no transfers)."""

from __future__ import annotations

import numpy as np
import pytest

from kvxfer.bench.cases import Case, Pool, expand, parse_bytes, parse_ints, parse_memory, parse_sizes, sample_windows
from kvxfer.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def test_parse_bytes_and_sizes() -> None:
    assert parse_bytes("4K") == 4096 and parse_bytes("64MiB") == 64 << 20 and parse_bytes("1g") == 1 << 30
    assert parse_sizes("4K-64M") == [4096 << i for i in range(15)]
    assert parse_sizes("2M,4K,4096") == [4096, 2 << 20]
    for bad in ("", "4X", "-1", "0"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)
    with pytest.raises(ConfigError):
        parse_sizes("64M-4K")


def test_parse_memory_and_ints() -> None:
    assert parse_memory("host") == [("host", "host")]
    assert parse_memory("host:cuda,cuda:cuda") == [("host", "cuda"), ("cuda", "cuda")]
    assert len(parse_memory("all")) == 4
    assert parse_ints("1,16", "--batch") == [1, 16]
    for bad in ("gpu", "host:host:host", "host:"):
        with pytest.raises(ConfigError):
            parse_memory(bad)
    with pytest.raises(ConfigError):
        parse_ints("0", "--batch")


def test_expand_orders_sizes_innermost_and_rejects_unknown_ops() -> None:
    cases = expand(["local"], [("host", "host")], ["READ", "WRITE"], [4096, 8192], [1, 4], [1])
    assert len(cases) == 8
    assert [c.fragment for c in cases[:2]] == [4096, 8192] and cases[0].op == "READ" and cases[-1].op == "WRITE"
    with pytest.raises(ConfigError):
        expand(["local"], [("host", "host")], ["PUT"], [4096], [1], [1])


def test_offsets_are_distinct_shuffled_slots_and_the_same_for_every_backend() -> None:
    case = Case("ucx", "host", "host", "READ", 4096, 64, 2)
    local, remote = case.offsets()
    assert len(local) == 2 and all(len(part) == 64 for part in local + remote)
    for side in (np.concatenate(local), np.concatenate(remote)):
        assert sorted(side.tolist()) == [i * 4096 for i in range(128)]  # every slot once, inside nbytes
        assert side.tolist() != sorted(side.tolist())  # shuffled, so fragments are not contiguous
    assert not np.array_equal(np.concatenate(local), np.concatenate(remote))
    again = Case("nixl", "host", "host", "READ", 4096, 64, 2).offsets()
    assert all(np.array_equal(a, b) for a, b in zip(local + remote, again[0] + again[1], strict=True))


def test_pool_is_random_never_zero_and_scramble_changes_the_digest() -> None:
    pool = Pool("host", 1 << 16, seed=3)
    assert pool.array.min() >= 1 and len(np.unique(pool.array)) > 200
    offsets = np.array([0, 8192])
    before = pool.digest(offsets, 4096)
    assert before == Pool("host", 1 << 16, seed=3).digest(offsets, 4096)
    pool.scramble(offsets, 4096, seed=9)
    assert pool.digest(offsets, 4096) != before and pool.array.min() >= 1
    assert pool.digest([4096], 4096) == Pool("host", 1 << 16, seed=3).digest([4096], 4096)  # outside: untouched


def test_sample_windows_stay_inside_paired_fragments() -> None:
    case = Case("local", "host", "host", "WRITE", 1 << 20, 8, 1)
    local, remote = case.offsets()
    local_windows, remote_windows, width = sample_windows(case, local, remote, 3, seed=1)
    assert width == 64 << 10 and len(local_windows) == 3
    pairs = dict(zip(local[0].tolist(), remote[0].tolist(), strict=True))
    for start_local, start_remote in zip(local_windows.tolist(), remote_windows.tolist(), strict=True):
        fragment = start_local - start_local % case.fragment
        assert start_local + width <= fragment + case.fragment
        assert start_remote - pairs[fragment] == start_local - fragment
