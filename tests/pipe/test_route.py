"""Routes (kvxfer/pipe/route.py): the Strategy enum and the choice of strategy per rank pair."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvxfer import ConfigError, KVCacheSpec
from kvxfer.pipe.ranks import HeadRoute
from kvxfer.pipe.route import Strategy, choose_route, same_fragments


def spec(block_size=16, layout="HND", heads=4):
    return KVCacheSpec(
        num_layers=2,
        num_blocks=8,
        block_size=block_size,
        num_kv_heads=heads,
        head_dim=8,
        dtype="float32",
        layout=layout,
    )


HEADS = HeadRoute(remote=0, global_heads=(0, 4), local_heads=(0, 4), remote_heads=(0, 4))
PEER, REGION = SimpleNamespace(name="p"), SimpleNamespace(index=0)


class Mapping:
    """A backend that maps peer memory (at a fixed address)."""

    caps = SimpleNamespace(name="maps")

    def map_remote(self, peer, region_index, device):
        return 0x1000


NO_MAPPING = SimpleNamespace(caps=SimpleNamespace(name="nomap"))  # like ucx: moves bytes, maps nothing


@pytest.mark.parametrize("value", ["auto", "kernel", "direct", "staged", Strategy.STAGED])
def test_strategy_accepts_names_and_members(value):
    parsed = Strategy.parse(value)
    assert parsed == value and str(parsed) == parsed.value and f"{parsed}" == parsed.value


@pytest.mark.parametrize("value", ["fast", "", None, 3, "KERNEL"])
def test_strategy_refuses_anything_else(value):
    with pytest.raises(ConfigError, match="strategy must be one of"):
        Strategy.parse(value)


def test_same_fragments_needs_same_block_size_and_head_order():
    assert same_fragments(spec(), (0, 4), spec(), (0, 4))
    assert not same_fragments(spec(), (0, 4), spec(block_size=8), (0, 4))
    assert not same_fragments(spec(layout="HND"), (0, 4), spec(layout="NHD"), (0, 4))
    assert same_fragments(spec(heads=8), (2, 6), spec(), (0, 4))  # a head slice of a wider HND cache


@pytest.mark.parametrize(
    "local, remote, backend, device, expected",
    [
        (spec(), spec(), Mapping(), -1, Strategy.DIRECT),  # on the CPU a memcpy beats the reference kernel
        (spec(), spec(), Mapping(), 0, Strategy.KERNEL),  # on a GPU one launch does it all
        (spec(), spec(block_size=8), Mapping(), -1, Strategy.KERNEL),
        (spec(), spec(), NO_MAPPING, 0, Strategy.DIRECT),
        (spec(), spec(layout="NHD"), NO_MAPPING, 0, Strategy.STAGED),
    ],
)
def test_auto_choice(local, remote, backend, device, expected):
    route = choose_route(HEADS, SimpleNamespace(), local, device, PEER, remote, REGION, backend, Strategy.AUTO)
    assert route.strategy is expected and route.reason
    assert (route.mapped is not None) == (expected is Strategy.KERNEL)


def test_requested_strategies_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="maps peer memory"):
        choose_route(HEADS, SimpleNamespace(), spec(), 0, PEER, spec(), REGION, NO_MAPPING, Strategy.KERNEL)
    with pytest.raises(ConfigError, match="same fragments"):
        choose_route(HEADS, SimpleNamespace(), spec(), 0, PEER, spec(block_size=8), REGION, Mapping(), Strategy.DIRECT)
    route = choose_route(HEADS, SimpleNamespace(), spec(), 0, PEER, spec(), REGION, Mapping(), Strategy.STAGED)
    assert route.strategy is Strategy.STAGED and route.reason == "requested" and route.mapped is None
