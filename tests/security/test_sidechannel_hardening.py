"""The side channel under hostile peers (issue 14 items 2, 7, 8): total deadlines on both ends, bounded
connections that shed stalled clients and keep serving, and answers authenticated under the token before any byte
of them is decoded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import HandshakeError, PeerError
from kvxfer.limits import Limits
from kvxfer.metadata import AgentMetadata
from kvxfer.nonces import fresh_nonce
from kvxfer.sidechannel import REQUEST_NBYTES, fetch_metadata, parse_address

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code_or_module: list[str]) -> subprocess.Popen:
    environment = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, *code_or_module],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=ROOT,
    )


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.communicate()


def _fake_server(reply_script: str) -> tuple[subprocess.Popen, str]:
    """A real server process that reads one request and then runs ``reply_script`` (with ``connection``)."""
    code = (
        textwrap.dedent(f"""
        import socket, struct, sys, time
        server = socket.create_server(("127.0.0.1", 0))
        print(server.getsockname()[1], flush=True)
        while True:
            connection, _ = server.accept()
            connection.recv({REQUEST_NBYTES})
            try:
        """)
        + textwrap.indent(textwrap.dedent(reply_script), "        ")
        + "\n    except OSError:\n        pass\n"
    )
    process = _python(["-c", code])
    port = process.stdout.readline().strip()
    assert port.isdigit(), process.stderr.read()
    return process, f"127.0.0.1:{port}"


def test_a_dripping_server_cannot_stretch_the_client_deadline():
    process, address = _fake_server("""
        connection.sendall(b"OK" + struct.pack("!I", 40))
        for _ in range(40):
            connection.sendall(b"x")
            time.sleep(0.5)
    """)
    try:
        with kvxfer.Agent("d", backends=["local"]) as decode:
            start = time.monotonic()
            with pytest.raises(PeerError, match=r"within 1\.0 s"):
                decode.connect_to(address, timeout=1.0)
            elapsed = time.monotonic() - start
        assert elapsed < 4.0, f"a 1 s total deadline took {elapsed:.1f} s (per-recv deadlines would take ~20 s)"
    finally:
        _stop(process)


def test_a_forged_answer_never_reaches_the_decoder_or_a_backend(monkeypatch):
    with kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0", token="s3cret") as genuine:
        genuine.register(np.ones(64, np.uint8), name="kv")
        stolen = genuine.metadata()  # what an impostor could have captured: valid metadata, no valid MAC for us
    process, address = _fake_server(f"""
        body = {stolen!r}
        connection.sendall(b"OK" + struct.pack("!I", len(body)) + body + bytes(32))
    """)
    decoded = []
    original = AgentMetadata.decode
    monkeypatch.setattr(
        AgentMetadata, "decode", classmethod(lambda cls, data, *a: decoded.append(1) or original(data, *a))
    )
    try:
        with kvxfer.Agent("d", backends=["local"]) as decode:
            with pytest.raises(HandshakeError, match="did not prove it holds the token"):
                decode.connect_to(address, token="s3cret", timeout=5)
            assert decoded == [] and decode.peers == {}
    finally:
        _stop(process)


def test_a_server_without_the_token_cannot_pass_for_one():
    with (
        kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0") as impostor,
        kvxfer.Agent("d", backends=["local"]) as decode,
    ):
        impostor.register(np.ones(64, np.uint8))
        with pytest.raises(HandshakeError, match="did not prove"):
            decode.connect_to(impostor.listen_address, token="s3cret")
        assert decode.connect_to(impostor.listen_address).name == "p"  # without a token: the documented trust


def test_the_token_never_travels_and_answers_are_bound_to_the_request():
    with kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0", token="s3cret") as prefill:
        host, port = parse_address(prefill.listen_address)
        captured = []
        real_sendall = socket.socket.sendall

        def spy(sock, data, *args):
            captured.append(bytes(data))
            return real_sendall(sock, data, *args)

        socket.socket.sendall = spy
        try:
            body = fetch_metadata(prefill.listen_address, "s3cret", 5.0)
        finally:
            socket.socket.sendall = real_sendall
        assert AgentMetadata.decode(body).name == "p"
        assert captured and all(b"s3cret" not in c for c in captured)
        with socket.create_connection((host, port), timeout=5) as replay:  # the captured request, replayed
            replay.sendall(captured[0])
            answer = b""
            while chunk := replay.recv(1 << 16):
                answer += chunk
        assert answer.startswith(b"NO") and b"used before" in answer  # each request nonce is accepted once


def test_signed_metadata_for_connect():
    with kvxfer.Agent("p", backends=["local"]) as prefill, kvxfer.Agent("d", backends=["local"]) as decode:
        prefill.register(np.ones(64, np.uint8), name="kv")
        signed = prefill.metadata(token="s3cret")
        assert decode.connect(signed, token="s3cret").region("kv").nbytes == 64
        with pytest.raises(HandshakeError, match="does not authenticate"):
            decode.connect(signed, token="other")
        tampered = bytearray(signed)
        tampered[-3] ^= 1
        with pytest.raises(HandshakeError, match="does not authenticate"):
            decode.connect(bytes(tampered), token="s3cret")
        with pytest.raises(HandshakeError, match="not signed"):
            decode.connect(prefill.metadata(), token="s3cret")
        with pytest.raises(HandshakeError, match="pass the token"):
            decode.connect(signed)
    with (
        kvxfer.Agent("p", backends=["local"]) as prefill,
        kvxfer.Agent("d", backends=["local"], limits=Limits(metadata_max_age=0.2)) as decode,
    ):
        old = prefill.metadata(token="s3cret")
        time.sleep(0.5)
        with pytest.raises(HandshakeError, match="old"):
            decode.connect(old, token="s3cret")


def test_a_silent_client_is_cut_off_at_the_total_request_time():
    limits = Limits(side_channel_request_seconds=0.5)
    with kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0", limits=limits) as prefill:
        host, port = parse_address(prefill.listen_address)
        with socket.create_connection((host, port), timeout=5) as silent:
            start = time.monotonic()
            silent.sendall(b"K")
            time.sleep(0.2)
            silent.sendall(b"V")  # dripping does not extend it
            assert silent.recv(16) == b""
            assert time.monotonic() - start < 3.0


def _crowd_test(count: int, cap: int, legit_requests: int) -> None:
    limits = Limits(side_channel_connections=cap, side_channel_request_seconds=5.0)
    with kvxfer.Agent("p", backends=["local"], listen="127.0.0.1:0", limits=limits) as prefill:
        prefill.register(np.ones(64, np.uint8), name="kv")
        server = prefill._side_channel
        host, port = parse_address(prefill.listen_address)
        threads_before = threading.active_count()
        crowd = _python(["-m", "tests.security.slow_clients", host, str(port), str(count), "1.0", "600"])
        try:
            ready = crowd.stdout.readline().split()
            assert ready[:1] == ["ready"], crowd.stderr.read()
            assert int(ready[1]) >= count * 0.9
            served = 0
            for _ in range(legit_requests):
                served += AgentMetadata.decode(fetch_metadata(prefill.listen_address, None, 10.0)).name == "p"
            assert served == legit_requests
            assert server.open_connections <= cap
            assert server.shed >= count - cap
            assert threading.active_count() == threads_before  # no thread per connection
            assert crowd.poll() is None  # the crowd was still there
        finally:
            _stop(crowd)


def test_legitimate_requests_are_served_while_200_stalled_clients_hold_connections():
    _crowd_test(200, 64, 20)


@pytest.mark.slow
def test_legitimate_requests_are_served_while_2000_stalled_clients_hold_connections():
    _crowd_test(2000, 64, 200)


def test_a_large_answer_reaches_a_slow_reader_whole():
    from kvxfer.sidechannel import HELLO, SideChannelServer

    body = bytes(range(256)) * (12 << 10)  # 3 MiB: more than a socket buffer, so it goes out in pieces
    server = SideChannelServer("127.0.0.1:0", lambda: body, token="s3cret")
    try:
        assert fetch_metadata(server.address, "s3cret", 10.0) == body
        host, port = parse_address(server.address)
        with socket.create_connection((host, port), timeout=5) as slow:
            slow.sendall(HELLO + bytes(48))  # a bad proof: refused, whatever the pace
            assert slow.recv(2) == b"NO"
        with socket.create_connection((host, port), timeout=5) as slow:
            from kvxfer.signature import hello_proof

            nonce = fresh_nonce()
            slow.sendall(HELLO + nonce + hello_proof(b"s3cret", nonce))
            received = b""
            while chunk := slow.recv(65536):
                received += chunk
                time.sleep(0.001)
            assert received[:2] == b"OK" and received[6:-32] == body
    finally:
        server.close()
