"""Layer streaming (kvxfer/pipe/layer_board.py): stalled, malformed and unclaimed announcements."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvxfer import TransferState, TransferTimeoutError
from kvxfer.control import PREFIX, VERSION
from kvxfer.pipe.layer_board import LayerBoard
from tests.helpers import Cluster, announcers, settle


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


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        b"\x92\xa3key\x91\x00",
        b"\x92\xc4\x00\x91\x00",
        b"\x92\xc4\x01k\x91\xff",
        b"\x92\xc4\x01k\x91\xc3",
        b"\x92\xc4\x01k\x00",
        b"\x93\xc4\x01k\x91\x00\x00",
        b"\x91\xc4\x01k",
        b"\x92\xc4\x01k\x91\xce\x00\x01\x00\x00",
    ],
)
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
