"""KVPipe leases and verify mode, with faults injected by the mock backend."""

from __future__ import annotations

import time

import numpy as np
import pytest

import kvxfer
from kvxfer import KVCacheSpec, KVPipe, TransferError, TransferState, TransferTimeoutError
from kvxfer.backends.mock import Fault, MockBackend
from kvxfer.pipe.checksum import Checksums, compute
from kvxfer.pipe.lease import LeaseLostError, Leases
from kvxfer.control import PREFIX, VERSION
from kvxfer.pipe.layer_board import LayerBoard
from tests.test_pipe import Cluster, announcers, settle, wait_until

SPEC = KVCacheSpec(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=4, head_dim=8, dtype="float32")


def pair(fault=None):
    """Prefill and decode agents (mock backends) connected both ways, prefill cache random."""
    prefill = kvxfer.Agent("p", backends=[MockBackend()])
    decode = kvxfer.Agent("d", backends=[MockBackend(on_post=lambda *a: fault)])
    source = np.random.default_rng(0).standard_normal(SPEC.tensor_shape).astype(np.float32)
    target = np.zeros(SPEC.tensor_shape, np.float32)
    prefill_region = prefill.register(source, name="kv")
    decode.register(target, name="kv")
    peer = decode.connect(prefill.metadata())
    prefill.connect(decode.metadata())
    return prefill, decode, source, target, peer, prefill_region


def test_expired_lease_fails_the_receiver_and_frees_the_blocks():
    prefill, decode, source, target, peer, _ = pair(Fault.delay(1.0))
    ended = []
    with prefill, decode:
        Leases.of(prefill).grant(b"req-1", "d", [1, 2], ttl=0.3, on_end=lambda lease, why: ended.append(why))
        pipe = KVPipe(decode, SPEC, peer, SPEC, strategy="direct")
        handle = pipe.pull([4, 5], [1, 2], lease=b"req-1", renew_every=10.0)  # heartbeats too rare to keep it
        with pytest.raises(LeaseLostError):
            handle.wait(timeout=10)
        assert ended == ["expired"] and handle.state is TransferState.FAILED
        time.sleep(1.0)
        assert not target.any()  # the cancelled copy never landed
        pipe.close()


def test_renewed_lease_outlives_a_slow_transfer_and_is_released_after_it():
    prefill, decode, source, target, peer, _ = pair(Fault.delay(0.8))
    ended = []
    with prefill, decode:
        Leases.of(prefill).grant(b"req-2", "d", [1, 2], ttl=0.3, on_end=lambda lease, why: ended.append(why))
        pipe = KVPipe(decode, SPEC, peer, SPEC, strategy="direct")
        pipe.pull([4, 5], [1, 2], lease=b"req-2", renew_every=0.05).wait(timeout=10)
        assert np.array_equal(target[:, [4, 5]], source[:, [1, 2]])
        deadline = time.monotonic() + 5
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == ["released"] and not Leases.of(prefill).granted
        pipe.close()


def test_verify_mode_catches_corruption():
    prefill, decode, source, target, peer, prefill_region = pair(Fault.corrupt(4))
    with prefill, decode:
        expected = {"p": compute(prefill_region, SPEC, [1, 2]).encode()}
        pipe = KVPipe(decode, SPEC, peer, SPEC, strategy="direct")
        with pytest.raises(TransferError, match="checksum mismatch"):
            pipe.pull([4, 5], [1, 2], expected=expected).wait(timeout=10)
        pipe.close()


@pytest.mark.parametrize("p_tp, d_tp, p_block, d_block", [(1, 2, 16, 32), (2, 1, 32, 16), (2, 4, 16, 16)])
def test_verify_mode_accepts_correct_data_across_layouts(p_tp, d_tp, p_block, d_block):
    cluster = Cluster(p_tp, d_tp, 8, p_block, d_block, "HND", "NHD", tokens=40)
    try:
        expected = {agent.name: compute(agent.regions[0], spec, cluster.p_ids, num_tokens=40)
                    for agent, spec in zip(cluster.prefill, cluster.p_specs)}
        for rank in range(d_tp):
            pipe = cluster.pipe(rank, strategy="staged")
            pipe.pull(cluster.d_ids, cluster.p_ids, num_tokens=40, expected=expected).wait(timeout=10)
            np.testing.assert_array_equal(cluster.d_caches[rank], cluster.expected(rank))
            pipe.close()
    finally:
        cluster.close()


def test_checksums_round_trip_and_reject_garbage():
    values = np.arange(12, dtype=np.uint32).reshape(3, 4)
    original = Checksums(values, 16, 4, 40)
    decoded = Checksums.decode(original.encode())
    assert np.array_equal(decoded.values, values) and decoded.first_head == 4 and decoded.num_tokens == 40
    with pytest.raises(kvxfer.HandshakeError):
        Checksums.decode(b"\x00garbage")


def test_pull_after_the_lease_expired_is_refused():
    prefill, decode, source, target, peer, _ = pair()
    ended = []
    with prefill, decode:
        Leases.of(prefill).grant(b"late", "d", [1, 2], ttl=0.05, on_end=lambda lease, why: ended.append(why))
        time.sleep(0.3)
        assert ended == ["expired"]
        pipe = KVPipe(decode, SPEC, peer, SPEC, strategy="direct")
        with pytest.raises(LeaseLostError):
            pipe.pull([4, 5], [1, 2], lease=b"late").wait(timeout=10)
        pipe.close()


def test_streamed_pull_whose_announcements_stop_fails_at_its_deadline():
    cluster = Cluster(2, 1, 8, 16, 16, "HND", "HND", tokens=32)
    try:
        first, second = announcers(cluster)
        pipe, cache, expected = cluster.pipe(0), cluster.d_caches[0], cluster.expected(0)
        started = time.monotonic()
        handle = pipe.pull(cluster.d_ids, cluster.p_ids, timeout=0.6, stream_layers=True, stream_key=b"stalls")
        for announcer in (first, second):
            announcer.announce("d0", b"stalls", 0)
        first.announce("d0", b"stalls", 1)  # p1 never announces layer 1
        with pytest.raises(TransferTimeoutError, match="deadline"):
            handle.wait(timeout=10)
        assert handle.state is TransferState.FAILED and time.monotonic() - started >= 0.6
        np.testing.assert_array_equal(cache[0], expected[0])
        second.announce("d0", b"stalls", 1)  # too late: moves nothing, is not buffered for ever
        time.sleep(0.2)
        assert (cache[1] == -7).all()
        assert LayerBoard.of(cluster.decode[0]).listened == []
        pipe.close()
        first.close()
        second.close()
    finally:
        cluster.close()


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\xa3key\x91\x00", b"\x92\xc4\x00\x91\x00",
                                  b"\x92\xc4\x01k\x91\xff", b"\x92\xc4\x01k\x91\xc3", b"\x92\xc4\x01k\x00",
                                  b"\x93\xc4\x01k\x91\x00\x00", b"\x91\xc4\x01k", b"\x92\xc4\x01k\x91\xce\x00\x01\x00\x00"])
def test_malformed_layer_announcements_are_logged_and_ignored(body, caplog):
    """``body``: the fields of a layers control message, [key, [layer ids]], each one malformed."""
    cluster = Cluster(1, 1, 8, 16, 16, "HND", "HND", tokens=32)
    try:
        (announcer,) = announcers(cluster)
        pipe, cache = cluster.pipe(0), cluster.d_caches[0]
        handle = pipe.pull(cluster.d_ids, cluster.p_ids, stream_layers=True, stream_key=b"k")
        with caplog.at_level("WARNING", logger="kvxfer"):
            cluster.prefill[0].notify("d0", PREFIX + b"\x93" + bytes([VERSION]) + b"\xa6layers" + body)
        assert "malformed control message from p0" in caplog.text
        assert "subscriber" not in caplog.text  # handled, not raised into the delivering thread
        settle(handle)
        assert (cache == -7).all() and cluster.decode[0].notifications() == []
        assert LayerBoard.of(cluster.decode[0]).keys == [b"k"]
        announcer.announce("d0", b"k", [0, 1])  # the pull still works
        handle.wait(timeout=10)
        np.testing.assert_array_equal(cache, cluster.expected(0))
        pipe.close()
        announcer.close()
    finally:
        cluster.close()


def test_unclaimed_announcements_are_bounded_and_expire(monkeypatch):
    from kvxfer import Agent
    from kvxfer.control import LayersReady, encode
    from kvxfer.handle import Timeouts
    from kvxfer.pipe import layer_board

    monkeypatch.setattr(layer_board, "MAX_UNCLAIMED", 3)
    agent = Agent("d", backends=["local"], timeouts=Timeouts(transfer=0.3))
    board = LayerBoard.of(agent)

    def receive(key, layers):
        agent.control.deliver("p", encode(LayersReady(key, tuple(layers))))

    for key in (b"a", b"b", b"c", b"d"):
        receive(key, [0])
    assert sorted(board.keys) == [b"b", b"c", b"d"]  # the oldest went first
    got = []
    board.listen(b"d", ["p"], got.append)
    assert got == [[0]]
    time.sleep(0.4)
    receive(b"e", [1])
    assert sorted(board.keys) == [b"d", b"e"]  # stale unclaimed keys expired; a listened key stays
    agent.close()
    assert board.keys == []  # the agent closed its board
