"""KVPipe on CPU: every TP pair, block-size changes, NHD <-> HND, replicated heads, MLA, streaming, errors.

The expected decode caches are built independently of the kernels: each token's K/V is written through a NumPy
strided view of the spec (the same view the spec tests check), from one full-head "sequence" array.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import kvxfer
from kvxfer import ConfigError, DescriptorError, KVPipe, LayoutMismatchError, TransferState
from kvxfer.pipe.ranks import rank_pairs
from tests.helpers import BLOCKS, Cluster, announcers, make_spec, run_pull, settle, wait_until


@pytest.mark.parametrize("p_tp, d_tp", list(itertools.product([1, 2, 4, 8], repeat=2)))
def test_every_tp_pair(p_tp, d_tp):
    cluster = Cluster(p_tp, d_tp, heads=8, p_block=16, d_block=16, p_layout="HND", d_layout="HND", tokens=40)
    try:
        run_pull(cluster)
        routes = rank_pairs(p_tp, d_tp, 8)
        assert sorted({h for _, _, heads in routes for h in range(*heads)}) == list(range(8))
    finally:
        cluster.close()


@pytest.mark.parametrize("strategy", ["auto", "staged"])
@pytest.mark.parametrize("p_block, d_block", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("p_layout, d_layout", [("HND", "NHD"), ("NHD", "HND"), ("NHD", "NHD")])
@pytest.mark.parametrize("p_tp, d_tp", [(1, 2), (2, 1), (2, 4)])
def test_block_size_and_layout_changes(p_tp, d_tp, p_layout, d_layout, p_block, d_block, strategy):
    cluster = Cluster(p_tp, d_tp, 8, p_block, d_block, p_layout, d_layout, tokens=37, seed=p_block + d_block)
    try:
        run_pull(cluster, strategy)
    finally:
        cluster.close()


@pytest.mark.parametrize("p_tp, d_tp", [(1, 1), (2, 2), (4, 2), (1, 4)])
def test_direct_strategy_when_fragments_match(p_tp, d_tp):
    cluster = Cluster(p_tp, d_tp, 8, 16, 16, "HND", "HND", tokens=48)  # HND: head slices stay contiguous
    try:
        pipe = cluster.pipe(0, strategy="direct")
        assert {r.strategy for r in pipe.routes} == {"direct"}
        pipe.close()
        run_pull(cluster, "direct")
    finally:
        cluster.close()


@pytest.mark.parametrize("p_tp, d_tp, heads", [(1, 8, 2), (8, 1, 2), (4, 8, 2), (8, 2, 1)])
def test_replicated_heads(p_tp, d_tp, heads):
    cluster = Cluster(p_tp, d_tp, heads, 16, 32, "HND", "NHD", tokens=33)
    try:
        run_pull(cluster, "staged")
    finally:
        cluster.close()


def test_mla_single_latent_reads_one_rank_only():
    cluster = Cluster(4, 2, heads=1, p_block=16, d_block=16, p_layout="HND", d_layout="HND", tokens=20, parts=1)
    try:
        for rank in range(2):
            pipe = cluster.pipe(rank)
            assert len(pipe.routes) == 1
            pipe.close()
        run_pull(cluster)
    finally:
        cluster.close()


def test_push_streams_layers_as_they_become_ready():
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=32)
    try:
        agent, spec = cluster.prefill[0], cluster.p_specs[0]
        peer = agent.connect(cluster.decode[0].metadata())
        pipe = KVPipe(agent, spec, peer, cluster.d_specs[0], strategy="direct")
        handle = pipe.push(cluster.p_ids, cluster.d_ids, notify=b"pushed", stream_layers=True)
        handle.ready(0)
        time_limit = 50
        while handle.poll() is TransferState.PENDING and time_limit:
            time_limit -= 1
            import time

            time.sleep(0.01)
        assert handle.state is TransferState.PENDING  # layer 1 not ready yet: not done
        expected = cluster.expected(0)
        np.testing.assert_array_equal(cluster.d_caches[0][0], expected[0])
        assert (cluster.d_caches[0][1] == -7).all()
        with pytest.raises(DescriptorError, match="not awaited"):
            handle.ready([0])
        handle.ready(range(1, 2))
        handle.wait(timeout=10)
        np.testing.assert_array_equal(cluster.d_caches[0], expected)
        assert [n.payload for n in cluster.decode[0].notifications(timeout=2)] == [b"pushed"]
        pipe.close()
    finally:
        cluster.close()


def test_bad_requests_move_nothing():
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=32)
    try:
        pipe = cluster.pipe(0)
        with pytest.raises(DescriptorError, match="remote_block_ids: 16 tokens in blocks of 16 need 1 ids, got 2"):
            pipe.pull(cluster.d_ids[:1], cluster.p_ids)
        with pytest.raises(DescriptorError, match="must lie in"):
            pipe.pull([0, BLOCKS], cluster.p_ids)
        with pytest.raises(DescriptorError, match="repeat"):
            pipe.pull([3, 3], cluster.p_ids)
        with pytest.raises(ConfigError, match="strategy"):
            cluster.pipe(0, strategy="teleport")
        assert (cluster.d_caches[0] == -7).all()
        pipe.close()
    finally:
        cluster.close()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(dtype="float16"), "dtype"),
        (dict(head_dim=8), "head_dim"),
        (dict(model="other"), "model"),
        (dict(num_layers=3), "num_layers"),
    ],
)
def test_incompatible_specs_are_refused_before_any_byte_moves(change, match):
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=16)
    try:
        wrong = cluster.p_specs[0].replace(**change)
        with pytest.raises(LayoutMismatchError, match=match):
            KVPipe(cluster.decode[0], cluster.d_specs[0], cluster.peers[0], [wrong])
        assert (cluster.d_caches[0] == -7).all()
    finally:
        cluster.close()


def test_push_fills_every_replica_of_a_replicated_head():
    cluster = Cluster(1, 4, heads=2, p_block=16, d_block=16, p_layout="HND", d_layout="NHD", tokens=30)
    try:
        agent, spec = cluster.prefill[0], cluster.p_specs[0]
        peers = [agent.connect(d.metadata()) for d in cluster.decode]
        pipe = KVPipe(agent, spec, peers, cluster.d_specs)
        assert len(pipe.routes) == 2 and len(pipe.write_routes) == 4  # each head: read one replica, write both
        pipe.push(cluster.p_ids, cluster.d_ids, num_tokens=30).wait(timeout=10)
        for rank in range(4):
            np.testing.assert_array_equal(cluster.d_caches[rank], cluster.expected(rank))
        pipe.close()
    finally:
        cluster.close()


def test_local_spec_over_an_array_of_another_element_size_is_refused_before_any_byte_moves():
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=16)  # float32 caches
    try:
        local, remote = (specs[0].replace(dtype="bfloat16") for specs in (cluster.d_specs, cluster.p_specs))
        with pytest.raises(
            ConfigError,
            match=r"^local_spec: KVCacheSpec dtype 'bfloat16' has 2-byte elements, "
            r"region 'kv' holds 4-byte elements",
        ):
            KVPipe(cluster.decode[0], local, cluster.peers[0], [remote])
        assert (cluster.d_caches[0] == -7).all()
    finally:
        cluster.close()


@pytest.mark.parametrize("storage", ["uint8", "uint16", "pointer"])
def test_bf16_spec_over_bytes_uint16_or_a_raw_pointer_pulls(storage):
    spec = make_spec(0, 1, 4, 4, "NHD").replace(dtype="bfloat16")
    source = np.random.default_rng(1).integers(0, 1 << 16, spec.tensor_shape, dtype=np.uint16)
    backing = np.zeros(spec.nbytes, np.uint8)
    target = {
        "uint8": backing,
        "uint16": backing.view(np.uint16),
        "pointer": kvxfer.Region.from_ptr(backing.ctypes.data, backing.nbytes, owner=backing),
    }[storage]
    with kvxfer.Agent("p", backends=["local"]) as prefill, kvxfer.Agent("d", backends=["local"]) as decode:
        prefill.register(source, name="kv")
        decode.register(target, name="kv")
        pipe = KVPipe(decode, spec, decode.connect(prefill.metadata()), spec)
        handle = pipe.pull([5, 0], [2, 7])
        handle.wait(timeout=30)
        assert handle.state is TransferState.DONE
        pipe.close()
    cache = backing.view(np.uint16).reshape(spec.tensor_shape)
    np.testing.assert_array_equal(cache[:, [5, 0]], source[:, [2, 7]])
    assert not np.delete(cache, [5, 0], axis=1).any()


@pytest.mark.parametrize("strategy", ["auto", "direct", "staged"])
def test_pull_streams_layers_as_the_prefill_side_announces_them(strategy):
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=40)
    try:
        (announcer,) = announcers(cluster)
        pipe, cache, expected = cluster.pipe(0, strategy=strategy), cluster.d_caches[0], cluster.expected(0)
        handle = pipe.pull(
            cluster.d_ids, cluster.p_ids, notify=b"pulled", num_tokens=40, stream_layers=True, stream_key=b"req-7"
        )
        announcer.announce("d0", b"another-request", [0, 1])  # not this pull's key: nothing moves
        settle(handle)
        assert (cache == -7).all()
        announcer.announce("d0", b"req-7", 0)
        wait_until(lambda: np.array_equal(cache[0], expected[0]))
        settle(handle)
        assert (cache[1] == -7).all()  # layer 1 not announced: untouched
        announcer.announce(["d0"], b"req-7", range(1, 2))
        handle.wait(timeout=10)
        np.testing.assert_array_equal(cache, expected)
        assert [n.payload for n in cluster.prefill[0].notifications(timeout=2)] == [b"pulled"]
        assert kvxfer.pipe.LayerBoard.of(cluster.decode[0]).listened == []
        pipe.close()
        announcer.close()
    finally:
        cluster.close()


def test_pull_honours_layers_announced_before_it():
    cluster = Cluster(1, 1, 8, 16, 32, "HND", "NHD", tokens=33)
    try:
        (announcer,) = announcers(cluster)
        board = kvxfer.pipe.LayerBoard.of(cluster.decode[0])
        pipe, cache, expected = cluster.pipe(0), cluster.d_caches[0], cluster.expected(0)
        announcer.announce("d0", b"early", [0])
        announcer.announce("d0", b"narrow", [0, 1])
        assert sorted(board.keys) == [b"early", b"narrow"] and (cache == -7).all()
        handle = pipe.pull(cluster.d_ids, cluster.p_ids, num_tokens=33, stream_layers=True, stream_key=b"early")
        wait_until(lambda: np.array_equal(cache[0], expected[0]))
        assert handle.poll() is TransferState.PENDING and (cache[1] == -7).all()
        announcer.announce("d0", b"early", [1])
        handle.wait(timeout=10)
        np.testing.assert_array_equal(cache, expected)
        assert board.keys == [b"narrow"]  # the ended pull's announcements are dropped
        cache[:] = -7
        pipe.pull(
            cluster.d_ids, cluster.p_ids, num_tokens=33, layers=[1], stream_layers=True, stream_key=b"narrow"
        ).wait(timeout=10)
        np.testing.assert_array_equal(cache[1], expected[1])
        assert (cache[0] == -7).all() and board.keys == []
        pipe.close()
        announcer.close()
    finally:
        cluster.close()


@pytest.mark.parametrize("strategy", ["auto", "staged"])
def test_pull_from_two_prefill_ranks_moves_a_layer_once_both_announced_it(strategy):
    cluster = Cluster(2, 1, 8, 16, 16, "HND", "NHD", tokens=40)
    try:
        first, second = announcers(cluster)
        pipe, cache, expected = cluster.pipe(0, strategy=strategy), cluster.d_caches[0], cluster.expected(0)
        assert len({r.peer.name for r in pipe.routes}) == 2
        handle = pipe.pull(cluster.d_ids, cluster.p_ids, num_tokens=40, stream_layers=True, stream_key=b"tp")
        first.announce("d0", b"tp", [0, 1])
        settle(handle)
        assert (cache == -7).all()  # p1 announced nothing: not even p0's heads move
        second.announce("d0", b"tp", 0)
        wait_until(lambda: np.array_equal(cache[0], expected[0]))
        settle(handle)
        assert (cache[1] == -7).all()
        second.announce("d0", b"tp", 1)
        handle.wait(timeout=10)
        np.testing.assert_array_equal(cache, expected)
        pipe.close()
        first.close()
        second.close()
    finally:
        cluster.close()


def test_streamed_pull_arguments_are_checked():
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=16)
    try:
        pipe = cluster.pipe(0)
        with pytest.raises(ConfigError, match="stream_key"):
            pipe.pull(cluster.d_ids, cluster.p_ids, stream_layers=True)
        with pytest.raises(ConfigError, match="stream_key"):
            pipe.pull(cluster.d_ids, cluster.p_ids, stream_key=b"k")
        with pytest.raises(ConfigError, match="stream_key must be"):
            pipe.pull(cluster.d_ids, cluster.p_ids, stream_layers=True, stream_key="text")
        handle = pipe.pull(cluster.d_ids, cluster.p_ids, stream_layers=True, stream_key=b"k")
        with pytest.raises(ConfigError, match="already streams"):
            pipe.pull(cluster.d_ids, cluster.p_ids, stream_layers=True, stream_key=b"k")
        handle.cancel()
        assert handle.state is TransferState.CANCELLED and (cluster.d_caches[0] == -7).all()
        pipe.pull(cluster.d_ids, cluster.p_ids, stream_layers=True, stream_key=b"k").cancel()  # the key is free again
        pipe.close()
    finally:
        cluster.close()
