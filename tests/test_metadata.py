import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvxfer
from kvxfer import HandshakeError
from kvxfer.memory import MemoryKind
from kvxfer.metadata import FORMAT_VERSION, MAX_METADATA_NBYTES, AgentMetadata, RegionMeta


def sample() -> AgentMetadata:
    regions = (
        RegionMeta("kv", 0, 4096, 1 << 20, MemoryKind.HOST, -1, {"local": b""}),
        RegionMeta("kv-gpu", 3, 1 << 40, 1 << 30, MemoryKind.CUDA, 1, {"ucx": b"\x01\x02"}),
    )
    return AgentMetadata(
        "prefill-0", "ab" * 16, "host/boot", 1234, "llama", {"local": b"", "ucx": b"addr"}, regions, "127.0.0.1:5000"
    )


def test_round_trip():
    meta = sample()
    assert AgentMetadata.decode(meta.encode()) == meta


def test_agent_metadata_round_trip_through_connect():
    with kvxfer.Agent("x", backends=["local"], compat="m") as a, kvxfer.Agent("y", backends=["local"], compat="m") as b:
        a.register(np.zeros(64, np.uint8), name="kv")
        peer = b.connect(a.metadata())
        assert peer.region("kv").nbytes == 64 and peer.meta.compat == "m"


def test_truncated_corrupted_oversized_and_wrong_version():
    data = sample().encode()
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(HandshakeError):
            AgentMetadata.decode(data[:cut])
    with pytest.raises(HandshakeError, match="cap"):
        AgentMetadata.decode(b"\x00" * (MAX_METADATA_NBYTES + 1))
    document = msgpack.unpackb(data, raw=False)
    document[1] = FORMAT_VERSION + 1
    with pytest.raises(HandshakeError, match="version"):
        AgentMetadata.decode(msgpack.packb(document, use_bin_type=True))
    document[1] = FORMAT_VERSION
    document[2]["regions"][0][3] = -1
    with pytest.raises(HandshakeError, match="out of range"):
        AgentMetadata.decode(msgpack.packb(document, use_bin_type=True))
    with pytest.raises(HandshakeError, match="bytes"):
        AgentMetadata.decode("not bytes")


def test_incompatible_peer_is_refused():
    with (
        kvxfer.Agent("x", backends=["local"], compat="llama") as a,
        kvxfer.Agent("y", backends=["local"], compat="qwen") as b,
    ):
        with pytest.raises(HandshakeError, match="compat"):
            b.connect(a.metadata())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_handshake_error(data):
    try:
        AgentMetadata.decode(data)
    except HandshakeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_metadata_only_ever_raises_handshake_error(data):
    original = bytearray(sample().encode())
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    try:
        decoded = AgentMetadata.decode(bytes(original))
    except HandshakeError:
        return
    assert isinstance(decoded, AgentMetadata)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_like)
def test_wrong_shapes_only_ever_raise_handshake_error(document):
    for candidate in (document, ["kvxfer", FORMAT_VERSION, document]):
        with pytest.raises(HandshakeError):
            AgentMetadata.decode(msgpack.packb(candidate, use_bin_type=True))
