"""A notification's sender name is bound to the agent that speaks under it (issue 14 item 9, second half): a peer
connected under one name cannot have its notifications delivered under another connected peer's name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import kvxfer
from kvxfer.senders import BYE, DATA, HELLO, SenderBook, SenderKeys, uid_tag

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A child agent: connects to the receiver over UCX, then obeys one command a line:
#   "say TEXT"            notify TEXT under its own name
#   "as NAME TEXT"        notify TEXT with NAME as the sender name on the wire (its own frame)
#   "forge NAME UID TEXT" notify TEXT under NAME, framed with NAME's uid tag and a guessed key
_CHILD = textwrap.dedent("""
    import os, sys, kvxfer
    from kvxfer.senders import uid_tag
    name, address, token = sys.argv[1], sys.argv[2], (sys.argv[3:] or [None])[0]
    with kvxfer.Agent(name, backends=["ucx"]) as agent:
        if address.startswith("meta="):  # metadata handed over out of band, connected without a token
            peer = agent.connect(bytes.fromhex(address[5:]))
        else:
            peer = agent.connect_to(address, token=token, timeout=30)
        backend = peer.backends[0]
        print(agent.uid, flush=True)
        for line in sys.stdin:
            verb, _, rest = line.strip().partition(" ")
            if verb == "say":
                agent.notify(peer, rest.encode())
            elif verb == "as":
                claimed, _, text = rest.partition(" ")
                backend.context.agent_name = claimed
                agent.notify(peer, text.encode())
                backend.context.agent_name = name
            elif verb == "forge":
                claimed, uid, text = rest.split(" ", 2)
                backend.context.agent_name = claimed
                frame = b"KVN\\x00" + uid_tag(uid) + os.urandom(16) + bytes(16) + text.encode()
                peer.connections[0].notify(frame)
                backend.context.agent_name = name
            print("ok", flush=True)
""")


class _Child:
    def __init__(self, name: str, address: str, token: str | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, name, address, *([token] if token else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
            cwd=ROOT,
        )
        self.uid = self._line()

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def do(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self._line() == "ok"

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _collect(receiver: kvxfer.Agent, until: bytes, seconds: float = 20.0) -> list[tuple[str, bytes]]:
    notes: list[tuple[str, bytes]] = []
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up and until not in [payload for _, payload in notes]:
        notes += [(n.peer_name, n.payload) for n in receiver.notifications(timeout=0.2)]
    return notes


@pytest.mark.ucx
@pytest.mark.timeout(120)
def test_a_peer_cannot_speak_under_another_connected_peers_name():
    with kvxfer.Agent("receiver", backends=["ucx"], listen="127.0.0.1:0") as receiver:
        receiver.register(np.zeros(4096, np.uint8), name="kv")
        address = receiver.listen_address
        assert address is not None
        y = _Child("y", address)
        x = _Child("x", address)
        try:
            y.do("say y-1")
            assert _collect(receiver, b"y-1") == [("y", b"y-1")]
            x.do("say x-1")
            x.do("as y forged-with-x-frame")
            x.do(f"forge y {y.uid} forged-with-y-uid")
            x.do("say x-2")
            y.do("say y-2")
            notes = _collect(receiver, b"y-2")
            notes += _collect(receiver, b"x-2", seconds=5.0) if (("x", b"x-2") not in notes) else []
        finally:
            x.close()
            y.close()
        assert not [n for n in notes if n[1].startswith(b"forged")], notes
        assert sorted(notes) == [("x", b"x-1"), ("x", b"x-2"), ("y", b"y-2")]
        assert receiver.dropped_notifications.get("sender mismatch") == 2


def test_a_receiver_connected_to_a_name_accepts_only_that_peers_uid_there():
    with (
        kvxfer.Agent("receiver", backends=["local"]) as receiver,
        kvxfer.Agent("y", backends=["local"]) as y,
        kvxfer.Agent("x", backends=["local"]) as x,
    ):
        receiver.register(np.zeros(64, np.uint8), name="kv")
        receiver.connect(y.metadata())  # the receiver knows y's uid from metadata it accepted
        to_receiver = x.connect(receiver.metadata())
        x_backend = to_receiver.backends[0]
        keys = SenderKeys(y.uid)  # y's uid tag (public: it is in y's metadata) with a key of x's choosing
        forged = keys.header(receiver.uid)[:20] + bytes(32) + b"forged"
        x_backend.attached_context.agent_name = "y"
        to_receiver.connections[0].notify(to_receiver.notify_header + b"forged-x-frame")
        x_backend.attached_context.agent_name = "x"
        y.notify(y.connect(receiver.metadata()), b"y-1")
        x_backend.attached_context.agent_name = "y"
        to_receiver.connections[0].notify(forged)
        x_backend.attached_context.agent_name = "x"
        x.notify(to_receiver, b"x-1")
        notes = [(n.peer_name, n.payload) for n in receiver.notifications()]
        assert notes == [("y", b"y-1"), ("x", b"x-1")]
        assert receiver.dropped_notifications == {"sender mismatch": 2}


def test_the_book_binds_releases_and_rebinds_only_as_documented():
    dropped: list[str] = []
    connected: dict[str, bytes] = {}
    book = SenderBook(2, connected.get, dropped.append)
    first, second = SenderKeys("uid-1"), SenderKeys("uid-2")
    assert book.open("a", first.header("me") + b"p") == b"p"
    assert book.open("a", second.header("me") + b"q") is None  # another instance: refused
    assert book.open("a", first.header("other-receiver") + b"r") is None  # a key meant for someone else
    assert dropped == ["sender mismatch", "sender mismatch"]
    assert book.open("a", second.header("me", kind=BYE)) is None and book.bound("a")  # only the holder releases
    assert book.open("a", first.header("me", kind=BYE)) is None and not book.bound("a")
    assert book.open("a", second.header("me", kind=HELLO)) is None and book.bound("a")
    assert book.open("a", second.header("me", kind=DATA) + b"s") == b"s"
    connected["a"] = uid_tag("uid-1")  # we reconnected to "a" and its metadata says uid-1: it may rebind
    assert book.open("a", first.header("me") + b"t") == b"t"
    assert book.open("a", second.header("me") + b"u") is None
    assert book.open("b", SenderKeys("uid-3").header("me") + b"v") == b"v"
    assert book.open("c", SenderKeys("uid-4").header("me") + b"w") is None  # capacity 2: new names refused
    assert book.open("d", b"no frame") is None
    assert dropped[-3:] == ["sender mismatch", "senders full", "unframed"]


def test_a_same_process_agent_that_closes_releases_its_name():
    with kvxfer.Agent("receiver", backends=["local"]) as receiver:
        for round_ in range(3):  # a new agent under the same name each time, e.g. a restarted worker
            with kvxfer.Agent("worker", backends=["local"]) as worker:
                worker.notify(worker.connect(receiver.metadata()), b"round %d" % round_)
        assert [n.payload for n in receiver.notifications()] == [b"round 0", b"round 1", b"round 2"]
        assert receiver.dropped_notifications == {}


def test_with_a_token_certified_speakers_outrank_uncertified_ones():
    dropped: list[str] = []
    book = SenderBook(16, lambda name: None, dropped.append, token_key=b"s3cret")
    squatter, owner, other = SenderKeys("uid-1"), SenderKeys("uid-2"), SenderKeys("uid-3")
    assert book.open("a", squatter.header("me") + b"p") == b"p"  # no certificate: bound first-come
    assert book.open("a", owner.header("me", "a", b"other") + b"q") is None  # certified under another token
    assert book.open("a", owner.header("me", "b", b"s3cret") + b"q") is None  # certified for another name
    assert book.open("a", owner.header("me", "a", b"s3cret") + b"r") == b"r"  # the token holder takes it back
    assert book.open("a", squatter.header("me") + b"s") is None  # and keeps it
    assert book.open("a", other.header("me", "a", b"s3cret") + b"t") is None  # even from another token holder
    assert book.open("a", owner.header("me") + b"u") == b"u"  # bound: the key alone identifies it from now on
    assert dropped == ["sender mismatch"] * 4


@pytest.mark.ucx
@pytest.mark.timeout(120)
def test_with_a_token_a_peer_without_it_cannot_take_a_token_holders_name():
    token = "s3cret"
    with kvxfer.Agent("receiver", backends=["ucx"], listen="127.0.0.1:0", token=token) as receiver:
        receiver.register(np.zeros(4096, np.uint8), name="kv")
        address = receiver.listen_address
        assert address is not None
        w = _Child("w", "meta=" + receiver.metadata().hex())  # has the metadata, not the token
        w.do("as x squatting-as-x")  # before x ever spoke: bound to w's instance, first-come
        assert _collect(receiver, b"squatting-as-x") == [("x", b"squatting-as-x")]  # the documented window
        x = _Child("x", address, token)  # x's certified HELLO takes its name back
        try:
            x.do("say x-1")
            w.do("as x forged-as-x")
            w.do("say w-1")  # w's own name works: a receiver with a token still hears peers without one
            x.do("say x-2")
            notes = _collect(receiver, b"x-2")
            notes += _collect(receiver, b"w-1", seconds=5.0) if ("w", b"w-1") not in notes else []
        finally:
            x.close()
            w.close()
        assert sorted(notes) == [("w", b"w-1"), ("x", b"x-1"), ("x", b"x-2")]  # the forgery never as x
        assert receiver.dropped_notifications == {"sender mismatch": 1}


def test_reconnecting_to_the_same_receiver_keeps_the_name_bound():
    with kvxfer.Agent("receiver", backends=["local"]) as receiver, kvxfer.Agent("y", backends=["local"]) as y:
        y.connect(receiver.metadata())
        peer = y.connect(receiver.metadata())  # the same receiver again: no BYE in between
        assert receiver._senders.bound("y")
        y.notify(peer, b"after reconnect")
        assert [(n.peer_name, n.payload) for n in receiver.notifications()] == [("y", b"after reconnect")]
        y.disconnect(peer)
        assert not receiver._senders.bound("y")  # an explicit disconnect releases the name
