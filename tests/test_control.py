"""Control messages: round trips, strict decoding, the channel's dispatch, and the prefix Agent.subscribe refuses."""

from __future__ import annotations

import logging

import msgpack
import pytest

import kvxfer
from kvxfer.control import (
    PREFIX,
    VERSION,
    BlocksExpired,
    ControlChannel,
    LayersReady,
    LeaseMessage,
    LeaseVerb,
    PushOutcome,
    decode,
    encode,
)
from kvxfer.errors import ConfigError, HandshakeError

MESSAGES = [
    LeaseMessage(LeaseVerb.RENEW, b"lease-1"),
    LeaseMessage(LeaseVerb.EXPIRED, b"k"),
    LayersReady(b"req", (0, 3, 65535)),
    LayersReady(b"req", ()),
    BlocksExpired(b"req-7:0"),
    PushOutcome("req-7", True, 42, 1234.5),
    PushOutcome("", False, -1, 0.0),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    payload = encode(message)
    assert payload.startswith(PREFIX)
    assert decode(payload) == message


def raw(*items):
    return PREFIX + msgpack.packb(list(items), use_bin_type=True)


@pytest.mark.parametrize(
    "payload",
    [
        b"kvx",
        PREFIX,
        PREFIX + b"\xc1",
        PREFIX + msgpack.packb({"a": 1}),
        raw(VERSION, "lease"),
        raw(VERSION + 1, "lease", ["renew", b"k"]),
        raw("1", "lease", ["renew", b"k"]),
        raw(VERSION, "nope", []),
        raw(VERSION, 7, []),
        raw(VERSION, "lease", "renew"),
        raw(VERSION, "lease", ["renew"]),
        raw(VERSION, "lease", ["evict", b"k"]),
        raw(VERSION, "lease", ["renew", "k"]),
        raw(VERSION, "lease", ["renew", b""]),
        raw(VERSION, "lease", ["renew", b"k" * 1025]),
        raw(VERSION, "layers", [b"k", [1 << 16]]),
        raw(VERSION, "layers", [b"k", [-1]]),
        raw(VERSION, "layers", [b"k", [True]]),
        raw(VERSION, "layers", [b"k", 3]),
        raw(VERSION, "conn.expired", []),
        raw(VERSION, "conn.pushed", ["r", 1, 2, 3.0]),
        raw(VERSION, "conn.pushed", ["r", True, 2.5, 3.0]),
        raw(VERSION, "conn.pushed", ["r" * 2000, True, 2, 3.0]),
    ],
)
def test_malformed_payloads_raise_handshake_error(payload):
    with pytest.raises(HandshakeError):
        decode(payload)


def test_channel_dispatches_by_type_and_drops_malformed(caplog):
    sent = []
    channel = ControlChannel("a", lambda peer, payload: sent.append((peer, payload)))
    leases, layers = [], []
    channel.on(LeaseMessage, lambda peer, message: leases.append((peer, message)))
    channel.on(LayersReady, lambda peer, message: layers.append((peer, message)))
    channel.send("b", LeaseMessage(LeaseVerb.ACK, b"k"))
    assert sent == [("b", encode(LeaseMessage(LeaseVerb.ACK, b"k")))]
    channel.deliver("b", sent[0][1])
    channel.deliver("b", encode(LayersReady(b"k", (1,))))
    with caplog.at_level(logging.WARNING, logger="kvxfer"):
        channel.deliver("c", PREFIX + b"\xc1")
    assert leases == [("b", LeaseMessage(LeaseVerb.ACK, b"k"))] and layers == [("b", LayersReady(b"k", (1,)))]
    assert "malformed control message from c" in caplog.text
    channel.close()
    channel.deliver("b", encode(LayersReady(b"k", (2,))))
    assert len(layers) == 1


def test_agents_exchange_control_messages_and_keep_them_out_of_notifications():
    with kvxfer.Agent("a", backends=["local"]) as a, kvxfer.Agent("b", backends=["local"]) as b:
        a.connect(b.metadata())
        got = []
        b.control.on(BlocksExpired, lambda peer, message: got.append((peer, message)))
        a.control.send("b", BlocksExpired(b"key"))
        a.notify("b", PREFIX + b"garbage")  # a malformed control message is dropped, never a notification
        assert got == [("a", BlocksExpired(b"key"))]
        assert b.notifications() == []


@pytest.mark.parametrize("prefix", [b"kvx:", b"kvx:lease:", b"kv"])
def test_subscribe_refuses_the_control_prefix(prefix):
    with kvxfer.Agent("a", backends=["local"]) as agent:
        with pytest.raises(ConfigError, match="control"):
            agent.subscribe(prefix, lambda note: None)
