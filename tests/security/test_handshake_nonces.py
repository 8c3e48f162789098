"""Authenticated handshakes carry single-use nonces (issue 14 item 4): a replayed side-channel request or signed
metadata envelope is refused, and the memory of seen nonces stays bounded."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import HandshakeError
from kvxfer.nonces import NonceBook, fresh_nonce
from kvxfer.sidechannel import HELLO, parse_address
from kvxfer.signature import hello_proof

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "s3cret"

# A client process that fetches the metadata once over the side channel and prints the request it sent (hex).
_CAPTURING_CLIENT = textwrap.dedent("""
    import socket, sys
    from kvxfer.sidechannel import fetch_metadata
    from kvxfer.metadata import AgentMetadata
    sent = []
    real = socket.socket.sendall
    socket.socket.sendall = lambda sock, data, *rest: (sent.append(bytes(data)), real(sock, data, *rest))[1]
    name = AgentMetadata.decode(fetch_metadata(sys.argv[1], sys.argv[2], 20.0)).name
    print(name, sent[0].hex(), flush=True)
""")


def _run(code: str, *arguments: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _ask(address: str, request: bytes) -> bytes:
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(1 << 16):
            reply += chunk
    return reply


def test_a_side_channel_request_captured_from_another_process_is_refused_when_replayed():
    with kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0", token=TOKEN) as prefill:
        address = prefill.listen_address
        assert address is not None
        name, request_hex = _run(_CAPTURING_CLIENT, address, TOKEN).split()
        assert name == "p"
        replayed = _ask(address, bytes.fromhex(request_hex))
        assert replayed.startswith(b"NO") and b"used before" in replayed
        stale_nonce = struct.pack("!Q", time.time_ns() - 700 * 10**9) + os.urandom(8)  # proof valid, stamp old
        stale = _ask(address, HELLO + stale_nonce + hello_proof(TOKEN.encode(), stale_nonce))
        assert stale.startswith(b"NO") and b"stamped" in stale
        fresh = fresh_nonce()
        assert _ask(address, HELLO + fresh + hello_proof(TOKEN.encode(), fresh)).startswith(b"OK")
        assert _run(_CAPTURING_CLIENT, address, TOKEN).split()[0] == "p"  # legitimate clients keep connecting


_SIGNING_PEER = textwrap.dedent("""
    import sys, numpy as np, kvxfer
    with kvxfer.Agent("prefill", backends=["ucx"]) as agent:
        agent.register(np.ones(4096, np.uint8), name="kv")
        for line in sys.stdin:
            print(agent.metadata(token=sys.argv[1]).hex(), flush=True)
""")


@pytest.mark.ucx
@pytest.mark.timeout(120)
def test_signed_metadata_from_another_process_connects_once():
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGNING_PEER, TOKEN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    assert child.stdin is not None and child.stdout is not None

    def envelope() -> bytes:
        child.stdin.write("\n")
        child.stdin.flush()
        return bytes.fromhex(child.stdout.readline().strip())

    try:
        with kvxfer.Agent("decode", backends=["ucx"]) as decode:
            signed = envelope()
            peer = decode.connect(signed, token=TOKEN)
            assert peer.region("kv").nbytes == 4096
            decode.disconnect(peer)
            with pytest.raises(HandshakeError, match="used before"):
                decode.connect(signed, token=TOKEN)
            assert decode.peers == {}
            assert decode.connect(envelope(), token=TOKEN).name == "prefill"  # a fresh envelope connects
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()


def test_an_agents_own_signed_metadata_cannot_be_replayed_to_it():
    with kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0", token=TOKEN) as agent:
        agent.register(np.ones(64, np.uint8), name="kv")
        signed = agent.metadata(token=TOKEN)
        agent.disconnect(agent.connect(signed, token=TOKEN))  # exactly what it publishes: accepted once
        with pytest.raises(HandshakeError, match="used before"):
            agent.connect(signed, token=TOKEN)
        served = kvxfer.sidechannel.fetch_metadata(agent.listen_address, TOKEN, 5.0)
        with pytest.raises(HandshakeError, match="not signed"):  # a side-channel answer is no envelope
            agent.connect(served, token=TOKEN)


def test_the_nonce_book_is_bounded_and_refuses_what_it_forgot():
    book = NonceBook(capacity=3, max_age=60.0)
    now = time.time_ns()
    nonces = [struct.pack("!Q", now - (10 - i) * 10**9) + os.urandom(8) for i in range(5)]
    assert [book.refusal(n) for n in nonces[:3]] == [None, None, None]
    assert "used before" in (book.refusal(nonces[1]) or "")
    assert book.refusal(nonces[3]) is None and len(book) == 3  # the oldest forgotten ...
    assert "older than" in (book.refusal(nonces[0]) or "")  # ... and still refused, by the floor
    assert book.refusal(nonces[4]) is None and len(book) == 3
    assert "stamped" in (book.refusal(struct.pack("!Q", now - 61 * 10**9) + bytes(8)) or "")
    assert "stamped" in (book.refusal(struct.pack("!Q", now + 120 * 10**9) + bytes(8)) or "")
    short = NonceBook(capacity=100, max_age=0.2)
    for _ in range(10):
        assert short.refusal(fresh_nonce()) is None
    time.sleep(0.3)
    assert short.refusal(fresh_nonce()) is None and len(short) == 1  # expired ones are dropped
