"""PrefixIndex: the engine's hash chain, longest cached prefix, LRU eviction by total entries, forget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.errors import ConfigError
from kvxfer.serve.prefix_index import PrefixIndex, block_hashes


def chain(seed: int, num_blocks: int, block_size: int = 4) -> list[bytes]:
    rng = random.Random(seed)
    return block_hashes([rng.randrange(50_000) for _ in range(num_blocks * block_size)], block_size)


def test_block_hashes_equal_the_engines() -> None:
    engine = pytest.importorskip("kvxfer.engine")
    rng = random.Random(7)
    for length, block_size in [(0, 16), (15, 16), (16, 16), (2000, 16), (37, 1), (100, 7)]:
        tokens = [rng.randrange(100_000) for _ in range(length)]
        assert block_hashes(tokens, block_size) == engine.block_hashes(tokens, block_size)
    numpy = pytest.importorskip("numpy")
    tokens = [rng.randrange(150_000) for _ in range(256)]
    for variant in (
        tokens,
        numpy.array(tokens),
        numpy.array(tokens, dtype=numpy.int32),
        [300_000 + t for t in tokens],
        [-t for t in tokens],
        [float(t) for t in tokens],
        [str(t) for t in tokens],
        [True, False] * 64,
    ):
        assert block_hashes(variant, 16) == engine.block_hashes(variant, 16)  # type: ignore[arg-type]
    tokens = list(range(64))
    start = b"\x01" * 16
    assert block_hashes(tokens, 16, start) == engine.block_hashes(tokens, 16, start)
    assert block_hashes(tokens, 16)[1] != block_hashes(tokens[16:], 16)[0]  # chained: position matters


def test_matched_blocks_is_the_longest_cached_prefix() -> None:
    index = PrefixIndex()
    a = chain(1, 10)
    index.record("w0", a[:6])
    assert index.matched_blocks("w0", a) == 6
    assert index.matched_blocks("w0", a[:3]) == 3
    assert index.matched_blocks("w1", a) == 0
    assert index.matched_blocks("w0", chain(2, 10)) == 0
    assert index.matched_blocks("w0", []) == 0
    # a sibling sharing 4 blocks: its hashes diverge after the shared tokens
    sibling = a[:4] + chain(3, 5)
    assert index.matched_blocks("w0", sibling) == 4
    assert index.matched(["w0", "w1"], a) == {"w0": 6, "w1": 0}


def test_lru_evicts_tails_first_and_keeps_the_bound() -> None:
    index = PrefixIndex(max_entries=10)
    a, b = chain(1, 6), chain(2, 6)
    index.record("w0", a)
    index.record("w1", b)  # 12 entries > 10: the two oldest go, which are a's last blocks
    assert len(index) == 10 and index.num_evictions == 2
    assert index.matched_blocks("w0", a) == 4 and index.matched_blocks("w1", b) == 6
    index.record("w0", a[:2])  # touch a's head: oldest first now a[3], a[2], b[5], ...
    index.record("w2", chain(3, 3))  # 3 more: a[3], a[2], b[5] go
    assert len(index) == 10 and index.num_evictions == 5
    assert index.matched_blocks("w1", b) == 5 and index.matched_blocks("w0", a) == 2
    assert index.num_blocks("w0") == 2 and index.num_blocks("w2") == 3


def test_forget_drops_one_worker() -> None:
    index = PrefixIndex()
    a = chain(1, 5)
    index.record("w0", a)
    index.record("w1", a)
    assert index.workers() == ["w0", "w1"] and index.num_blocks("w0") == 5
    assert index.forget("w0") == 5 and index.forget("w0") == 0
    assert index.matched_blocks("w0", a) == 0 and index.matched_blocks("w1", a) == 5
    assert len(index) == 5 and index.workers() == ["w1"]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="max_entries"):
        PrefixIndex(0)
    with pytest.raises(ConfigError, match="block_size"):
        block_hashes([1, 2], 0)


@settings(max_examples=100, deadline=None)
@given(
    bound=st.integers(1, 40),
    records=st.lists(
        st.tuples(st.sampled_from(["w0", "w1", "w2"]), st.integers(0, 5), st.integers(0, 12)), max_size=30
    ),
)
def test_matched_blocks_agrees_with_a_linear_scan(bound: int, records: list[tuple[str, int, int]]) -> None:
    """Whatever was evicted, binary search finds what a block-by-block scan of the kept entries finds."""
    chains = {seed: chain(seed, 12) for seed in range(6)}
    index = PrefixIndex(max_entries=bound)
    for name, seed, length in records:
        index.record(name, chains[seed][:length])
        assert len(index) <= bound
    for name in ("w0", "w1", "w2"):
        for hashes in chains.values():
            linear = 0
            while linear < len(hashes) and index.matched_blocks(name, hashes[: linear + 1]) == linear + 1:
                linear += 1
            assert index.matched_blocks(name, hashes) == linear


def test_eviction_order_matches_a_reference_lru_over_many_records() -> None:
    """3000 records (the event log compacts several times) against a plain model: each record stamps its chain;
    eviction takes the oldest stamp first and, within a stamp, the chain's tail first."""
    rng = random.Random(11)
    roots = [chain(seed, 8) for seed in range(6)]
    chains = [
        root[:cut] + block_hashes(list(range(seed, seed + 8)), 4, root[cut - 1] if cut else b"x")
        for root in roots
        for cut, seed in ((0, 1), (3, 2), (8, 3))
    ]
    index = PrefixIndex(max_entries=40)
    model: dict[tuple[str, bytes], tuple[int, int]] = {}
    for stamp in range(1, 3001):
        name, hashes = rng.choice(["w0", "w1", "w2"]), rng.choice(chains)[: rng.randrange(1, 11)]
        if rng.random() < 0.01:
            index.forget(name)
            model = {key: value for key, value in model.items() if key[0] != name}
        index.record(name, list(hashes))
        for position, digest in enumerate(hashes):
            model[(name, digest)] = (stamp, -position)
        while len(model) > 40:
            del model[min(model, key=model.__getitem__)]
        assert len(index) == len(model)
    for name in ("w0", "w1", "w2"):
        expected = {digest for (owner, digest) in model if owner == name}
        for hashes in chains:
            linear = 0
            while linear < len(hashes) and hashes[linear] in expected:
                linear += 1
            assert index.matched_blocks(name, hashes) == linear
        assert index.num_blocks(name) == len(expected)
