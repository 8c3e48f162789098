import socket

import numpy as np
import pytest

import kvxfer
from kvxfer import ConfigError, HandshakeError, PeerError
from kvxfer.sidechannel import fetch_metadata, parse_address


def test_connect_to_over_the_side_channel_with_token():
    with (
        kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0", token="s3cret") as prefill,
        kvxfer.Agent("d", backends=["local"]) as decode,
    ):
        prefill.register(np.ones(128, np.uint8), name="kv")
        address = prefill.listen_address
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        peer = decode.connect_to(address, token="s3cret")
        assert peer.region("kv").nbytes == 128
        with pytest.raises(HandshakeError, match="bad token"):
            decode.connect_to(address, token="guess")
        with pytest.raises(HandshakeError, match="bad token"):
            decode.connect_to(address)


def test_unreachable_and_garbage_servers():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with pytest.raises(PeerError, match="unreachable"):
        fetch_metadata(f"127.0.0.1:{free_port}", None, 1.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(PeerError, match="unreachable"):  # accepts, never answers: the deadline ends it
            fetch_metadata(f"127.0.0.1:{port}", None, 0.3)


def test_server_survives_a_bad_client():
    with kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0") as prefill:
        host, port = parse_address(prefill.listen_address)
        with socket.create_connection((host, port), timeout=2) as bad:
            bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert fetch_metadata(prefill.listen_address, None, 2.0)[:1] != b""


@pytest.mark.parametrize("address", ["nohost", "h:port", ":80", "h:70000"])
def test_bad_addresses(address):
    with pytest.raises(ConfigError):
        parse_address(address)
