"""The staging pool (kvxfer/pipe/staging.py): sizes, reuse, and deregistration at close."""

from __future__ import annotations

import kvxfer
from kvxfer.pipe.staging import StagingPool, staging_spec_for


def test_pool_rounds_up_reuses_and_deregisters():
    with kvxfer.Agent("a", backends=["local"]) as agent:
        pool = StagingPool(agent, device=-1)
        small = pool.acquire(1000)
        assert small.nbytes == 1 << 20 and small.registered  # at least 1 MiB
        big = pool.acquire((3 << 20) + 1)
        assert big.nbytes == 4 << 20 and big is not small
        assert pool.acquire(10) is not small  # taken until given back
        pool.give_back([small, small])
        assert pool.acquire(10) is small  # the smallest free buffer that fits
        pool.give_back([big])
        assert pool.acquire(2 << 20) is big
        names = {r.name for r in agent.regions}
        pool.close()
        assert not small.registered and not big.registered
        assert not names & {r.name for r in agent.regions}


def test_staging_spec_keeps_the_peer_fragment_order():
    remote = kvxfer.KVCacheSpec(
        num_layers=4, num_blocks=8, block_size=16, num_kv_heads=8, head_dim=4, dtype="float32", layout="NHD"
    )
    stage = staging_spec_for(remote, (2, 6), num_blocks=3, num_layers=2)
    assert (stage.num_blocks, stage.num_layers, stage.num_kv_heads, stage.block_size) == (3, 2, 4, 16)
    assert stage.layout is kvxfer.KVLayout.NHD
    assert stage.nbytes == 2 * 3 * 2 * 16 * 4 * 4 * 4
