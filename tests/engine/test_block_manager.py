"""BlockManager: reference counts, prefix caching by hash chain, LRU eviction, errors."""

from __future__ import annotations

import pytest

from kvxfer.engine.block_manager import BlockManager, OutOfBlocksError, block_hashes
from kvxfer.errors import KvxferError, UsageError

pytestmark = pytest.mark.timeout(60)


def test_hash_chain_covers_whole_prefix_and_only_full_blocks() -> None:
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # tokens 8, 9 form a partial block: no hash
    assert a == block_hashes(list(range(10)), 4)
    changed_first = block_hashes([99, *list(range(1, 10))], 4)
    assert changed_first[0] != a[0] and changed_first[1] != a[1]  # block 1 depends on block 0's tokens
    changed_second = block_hashes([*list(range(7)), 99, 8, 9], 4)
    assert changed_second[0] == a[0] and changed_second[1] != a[1]
    assert block_hashes(list(range(4, 8)), 4, previous=a[0]) == a[1:]


def test_allocate_free_refcounts() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    first = manager.allocate(3)
    assert len(set(first)) == 3 and manager.num_free == 5
    assert all(manager.ref_count(b) == 1 for b in first)
    manager.free(first)
    assert manager.num_free == 8 and all(manager.ref_count(b) == 0 for b in first)
    with pytest.raises(UsageError, match="double free"):
        manager.free(first[:1])


def test_out_of_blocks_is_all_or_nothing() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    held = manager.allocate(3)
    with pytest.raises(OutOfBlocksError, match="need 2 free blocks, 1 available") as info:
        manager.allocate(2)
    assert isinstance(info.value, KvxferError) and (info.value.needed, info.value.available) == (2, 1)
    assert manager.num_free == 1
    manager.free(held)
    assert manager.num_free == 4


def test_prefix_match_after_commit_and_shared_refcount() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(11))  # two full blocks + 3 tokens
    blocks = manager.allocate(3)
    assert manager.match_prefix(tokens) == []  # nothing committed yet: K/V not computed
    manager.commit(blocks, tokens, num_tokens=11)
    assert manager.match_prefix(tokens) == blocks[:2]
    assert manager.match_prefix([*tokens[:8], 500, 501, 502, 503]) == blocks[:2]
    assert manager.match_prefix(tokens, max_tokens=7) == blocks[:1]  # whole blocks within the first 7 tokens
    assert manager.match_prefix([1, *tokens[1:]]) == []
    shared = manager.allocate(1, prefix=blocks[:2])
    assert shared[:2] == blocks[:2] and manager.ref_count(blocks[0]) == 2
    manager.free(blocks)
    assert manager.ref_count(blocks[0]) == 1 and manager.num_free == 8 - 3
    manager.free(shared)
    assert manager.num_free == 8 and manager.num_cached == 2  # the two full blocks stay findable
    assert manager.match_prefix(tokens) == blocks[:2]


def test_reviving_cached_blocks_counts_against_free_space() -> None:
    manager = BlockManager(num_blocks=3, block_size=2)
    blocks = manager.allocate(2)
    manager.commit(blocks, [1, 2, 3, 4], 4)
    manager.free(blocks)
    prefix = manager.match_prefix([1, 2, 3, 4, 5])
    assert prefix == blocks
    with pytest.raises(OutOfBlocksError):
        manager.allocate(2, prefix=prefix)  # 3 free, but 2 of them are the prefix being revived
    assert manager.allocate(1, prefix=prefix)[:2] == blocks


def test_eviction_prefers_empty_blocks_then_least_recently_used() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    a = manager.allocate(1)
    manager.commit(a, [1, 2], 2)
    b = manager.allocate(1)
    manager.commit(b, [3, 4], 2)
    manager.free(a)
    manager.free(b)  # cached, LRU order: a then b
    fresh = manager.allocate(2)
    assert set(fresh).isdisjoint(a + b) and manager.num_evictions == 0
    assert manager.match_prefix([1, 2]) == a and manager.match_prefix([3, 4]) == b
    evicted = manager.allocate(1)
    assert evicted == a and manager.num_evictions == 1
    assert manager.match_prefix([1, 2]) == [] and manager.match_prefix([3, 4]) == b


def test_free_order_evicts_tail_blocks_before_prefix() -> None:
    manager = BlockManager(num_blocks=3, block_size=1)
    blocks = manager.allocate(3)
    manager.commit(blocks, [7, 8, 9], 3)
    manager.free(blocks)
    assert manager.allocate(1) == [blocks[2]]  # the tail went back first, so it is the oldest
    assert manager.match_prefix([7, 8, 9]) == blocks[:2]


def test_duplicate_prefix_keeps_first_and_frees_second_as_empty() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    first, second = manager.allocate(1), manager.allocate(1)
    manager.commit(first, [5, 6], 2)
    manager.commit(second, [5, 6], 2)  # computed concurrently
    manager.free(second)
    assert manager.num_cached == 0 and manager.match_prefix([5, 6]) == first
    manager.free(first)
    assert manager.num_cached == 1


def test_disabled_prefix_caching_never_matches() -> None:
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    blocks = manager.allocate(2)
    manager.commit(blocks, [1, 2, 3, 4], 4)
    manager.free(blocks)
    assert manager.match_prefix([1, 2, 3, 4]) == [] and manager.num_cached == 0


def test_append_grows_to_cover_tokens() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    blocks = manager.allocate(1)
    manager.append(blocks, 4)
    assert len(blocks) == 1
    manager.append(blocks, 5)
    assert len(blocks) == 2 and manager.num_free == 2
    with pytest.raises(OutOfBlocksError):
        manager.append(blocks, 17)
    assert len(blocks) == 2
