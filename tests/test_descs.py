import numpy as np
import pytest

import kvxfer
from kvxfer import ConfigError, DescriptorError, Descs, KVCacheSpec, RegistrationError
from kvxfer.descs import check_no_overlap, coalesce_pairs


@pytest.fixture
def agent():
    with kvxfer.Agent("a", backends=["local"]) as agent:
        yield agent


def test_from_ranges_and_indexing(agent):
    region = agent.register(np.zeros(1000, np.uint8), name="r")
    descs = Descs.from_ranges(region, np.array([0, 100, 500]), np.array([10, 20, 500]))
    assert len(descs) == 3 and descs.total_nbytes == 530
    assert list(descs.addr - np.uint64(region.addr)) == [0, 100, 500]
    assert len(descs[1:]) == 2 and len(descs[[2, 0]]) == 2 and int(descs[-1].nbytes[0]) == 500
    assert len(Descs.from_ranges(region, [0, 8], 8)) == 2
    with pytest.raises(DescriptorError, match="out of range"):
        descs[[3]]


@pytest.mark.parametrize(
    "offsets, nbytes, match",
    [
        ([990], [11], "outside region"),
        ([-1], [1], "offsets must be >= 0"),
        ([0], [0], "nbytes must be > 0"),
        ([0], [-5], "nbytes must be > 0"),
        ([2**62], [2**62], "outside region"),
        (np.array([2**63 + 5], dtype=np.uint64), [1], "overflows"),
        ([0, 1], [1, 2, 3], "one per offset"),
        ([[0]], [1], "1-D"),
        ([0.5], [1], "integer"),
    ],
)
def test_from_ranges_rejects_bad_spans(agent, offsets, nbytes, match):
    region = agent.register(np.zeros(1000, np.uint8), name="r")
    with pytest.raises(DescriptorError, match=match):
        Descs.from_ranges(region, offsets, nbytes)


def test_from_blocks_checks_ids_and_fit(agent):
    spec = KVCacheSpec(2, 8, 4, 2, 8, dtype="float32")
    region = agent.register(np.zeros(spec.nbytes, np.uint8), name="kv")
    descs = Descs.from_blocks(region, spec, [3, 4])
    assert len(descs) == 2 * 2 * 2 and descs.total_nbytes == 2 * 2 * spec.block_nbytes
    with pytest.raises(DescriptorError, match="block_ids"):
        Descs.from_blocks(region, spec, [8])
    small = agent.register(np.zeros(spec.nbytes - 4, np.uint8), name="small")
    with pytest.raises(ConfigError, match="needs"):
        Descs.from_blocks(small, spec, [0])


def test_unregistered_region_is_refused():
    with pytest.raises(RegistrationError, match="not registered"):
        Descs.from_ranges(kvxfer.Region.from_array(np.zeros(8, np.uint8)), [0], [8])


def test_coalesce_pairs_merges_only_runs_adjacent_on_both_sides(agent):
    region = agent.register(np.zeros(1 << 12, np.uint8), name="r")
    local = Descs.from_ranges(region, [0, 16, 32, 100, 116], 16)
    remote = Descs.from_ranges(region, [1000, 1016, 2000, 3000, 3016], 16)
    merged_local, merged_remote = coalesce_pairs(local, remote)
    assert list(merged_local.nbytes) == [32, 16, 32]
    assert list(merged_remote.addr - np.uint64(region.addr)) == [1000, 2000, 3000]
    assert merged_local.total_nbytes == local.total_nbytes


def test_overlap_detection(agent):
    region = agent.register(np.zeros(1 << 12, np.uint8), name="r")
    check_no_overlap(Descs.from_ranges(region, [64, 0, 32], 32), "ok")
    with pytest.raises(DescriptorError, match="overlap"):
        check_no_overlap(Descs.from_ranges(region, [64, 0, 90], 32), "dst")
    with pytest.raises(DescriptorError, match="overlap"):
        check_no_overlap(Descs.from_ranges(region, [0, 0], 8), "dst")


BF16 = KVCacheSpec(2, 4, 4, 2, 8, dtype="bfloat16")


def test_from_blocks_refuses_a_region_of_another_element_size():
    with kvxfer.Agent("p", backends=["local"]) as prefill, kvxfer.Agent("d", backends=["local"]) as decode:
        prefill.register(np.ones(BF16.nbytes, np.uint8), name="kv")
        target = np.full(BF16.nbytes // 4, -7.0, np.float32)
        local = decode.register(target, name="kv")
        peer = decode.connect(prefill.metadata())
        with pytest.raises(
            ConfigError,
            match=r"^spec: KVCacheSpec dtype 'bfloat16' has 2-byte elements, region 'kv' "
            r"holds 4-byte elements",
        ):
            decode.read(
                decode.plan(
                    Descs.from_blocks(local, BF16, [0, 1]), peer, Descs.from_blocks(peer.region("kv"), BF16, [2, 3])
                )
            ).wait()
        assert (target == -7.0).all()


@pytest.mark.parametrize("storage", ["uint8", "uint16", "pointer"])
def test_from_blocks_accepts_bytes_same_size_elements_and_raw_pointers(agent, storage):
    backing = np.zeros(BF16.nbytes, np.uint8)
    array = {
        "uint8": backing,
        "uint16": backing.view(np.uint16),
        "pointer": kvxfer.Region.from_ptr(backing.ctypes.data, backing.nbytes, owner=backing),
    }[storage]
    region = agent.register(array, name="kv")
    assert region.itemsize == {"uint8": 1, "uint16": 2, "pointer": None}[storage]
    assert Descs.from_blocks(region, BF16, [1, 3]).total_nbytes == 2 * BF16.num_layers * BF16.block_nbytes


def test_peer_regions_carry_no_element_size_so_only_the_owner_checks():
    with kvxfer.Agent("p", backends=["local"]) as prefill, kvxfer.Agent("d", backends=["local"]) as decode:
        prefill.register(np.zeros(BF16.nbytes // 4, np.float32), name="kv")
        remote = decode.connect(prefill.metadata()).region("kv")
        assert remote.itemsize is None
        assert len(Descs.from_blocks(remote, BF16, [0])) == 2 * BF16.num_layers
