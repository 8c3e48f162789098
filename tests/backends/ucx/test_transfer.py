"""Two real processes on this host: READ and WRITE through every UCX data path, byte-exact, with notifications
observed only after the data."""

from __future__ import annotations

import numpy as np
import pytest

import kvxfer
from kvxfer.backends.ucx import UcxBackend
from kvxfer.backends.ucx.config import UcxConfig

from .remote import RemoteAgent, digest, random_fill

pytestmark = [pytest.mark.ucx, pytest.mark.timeout(180)]

REGION_NBYTES = 128 << 20
# path name -> (config, fragment sizes it is tested with)
PATHS = {
    "cma": (UcxConfig(), (4 << 10, 64 << 10, 1 << 20, 64 << 20)),
    "shm-staged": (UcxConfig(cma="off"), (4 << 10,)),
    "shm-direct": (UcxConfig(cma="off", stage_below=0), (4 << 10, 64 << 10, 1 << 20, 64 << 20)),
    "tcp": (UcxConfig(cma="off", error_mode="peer"), (4 << 10, 1 << 20, 64 << 20)),
}
EXPECTED_PATH = {"cma": "cma", "shm-staged": "staged", "shm-direct": "direct"}
CASES = [(path, size) for path, (_config, sizes) in PATHS.items() for size in sizes]


@pytest.fixture(scope="module")
def remote():
    with RemoteAgent("target", REGION_NBYTES) as agent:
        yield agent


def _total(fragment: int) -> int:
    """Bytes moved per case: enough fragments to mean something, small enough for CI."""
    return max(2 * fragment, min(4 << 20, 256 * fragment)) if fragment < (64 << 20) else fragment


def _blocks(fragment: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random distinct block offsets on each side (int64[n] byte offsets)."""
    rng = np.random.default_rng(seed)
    count = _total(fragment) // fragment
    slots = REGION_NBYTES // fragment
    return (rng.choice(slots, count, replace=False) * fragment, rng.choice(slots, count, replace=False) * fragment)


def _setup(path: str, remote: RemoteAgent, name: str):
    config, _sizes = PATHS[path]
    agent = kvxfer.Agent(name, backends=[UcxBackend(config)])
    local = np.zeros(REGION_NBYTES, dtype=np.uint8)
    region = agent.register(local, name="buf")
    peer = agent.connect(remote.metadata)
    return agent, local, region, peer


def _plan(agent, region, peer, fragment: int, local_offsets, remote_offsets):
    local_descs = kvxfer.Descs.from_ranges(region, local_offsets, fragment)
    remote_descs = kvxfer.Descs.from_ranges(peer.region("buf"), remote_offsets, fragment)
    return agent.plan(local_descs, peer, remote_descs)


@pytest.mark.parametrize("path,fragment", CASES, ids=[f"{p}-{s >> 10}KiB" for p, s in CASES])
def test_write_then_read_byte_exact(remote: RemoteAgent, path: str, fragment: int) -> None:
    agent, local, region, peer = _setup(path, remote, f"writer-{path}-{fragment}")
    with agent:
        local_offsets, remote_offsets = _blocks(fragment, seed=fragment)
        plan = _plan(agent, region, peer, fragment, local_offsets, remote_offsets)
        if path in EXPECTED_PATH:
            assert plan.backend.data_path(plan) == EXPECTED_PATH[path]
        random_fill(local, seed=fragment + 1)
        agent.write(plan, notify=b"written").wait(60)
        assert remote.call("digest", remote_offsets, fragment) == digest(local, local_offsets, fragment)
        assert remote.call("notes", 5.0) == [(agent.name, b"written")]

        remote.call("fill", fragment + 2)
        local[:] = 0
        agent.read(plan, notify=b"read").wait(60)
        assert digest(local, local_offsets, fragment) == remote.call("digest", remote_offsets, fragment)
        untouched = np.ones(REGION_NBYTES // fragment, dtype=bool)
        untouched[local_offsets // fragment] = False
        assert not local.reshape(-1, fragment)[untouched].any(), "a READ wrote outside its destination blocks"
        assert remote.call("notes", 5.0) == [(agent.name, b"read")]


@pytest.mark.parametrize("path", ["cma", "shm-staged", "shm-direct", "tcp"])
def test_write_notification_follows_data(remote: RemoteAgent, path: str) -> None:
    fragment = 4 << 10 if path != "shm-direct" else 64 << 10
    agent, local, region, peer = _setup(path, remote, f"ordering-w-{path}")
    with agent:
        local_offsets, remote_offsets = _blocks(fragment, seed=7)
        plan = _plan(agent, region, peer, fragment, local_offsets, remote_offsets)
        for round_ in range(3):
            random_fill(local, seed=100 + round_)
            # The child digests its blocks the moment it sees the notification: the data must already be there.
            remote.send("digest_on_note", remote_offsets, fragment, 30.0)
            handle = agent.write(plan, notify=b"round-%d" % round_)
            payloads, seen = remote.answer()
            handle.wait(30)
            assert payloads == [b"round-%d" % round_]
            assert seen == digest(local, local_offsets, fragment)


@pytest.mark.parametrize("path", ["cma", "shm-staged", "tcp"])
def test_read_notification_follows_data(remote: RemoteAgent, path: str) -> None:
    fragment = 4 << 10
    agent, local, region, peer = _setup(path, remote, f"ordering-r-{path}")
    with agent:
        local_offsets, remote_offsets = _blocks(fragment, seed=8)
        plan = _plan(agent, region, peer, fragment, local_offsets, remote_offsets)
        remote.call("fill", 9)
        expected = remote.call("digest", remote_offsets, fragment)
        # The child overwrites its blocks as soon as it is told they were read: the read must be complete by then.
        remote.send("scribble_on_note", remote_offsets, fragment, 30.0)
        handle = agent.read(plan, notify=b"blocks-read")
        assert remote.answer() == [b"blocks-read"]
        handle.wait(30)
        assert digest(local, local_offsets, fragment) == expected


def test_standalone_notifications_both_ways(remote: RemoteAgent) -> None:
    agent, _local, _region, peer = _setup("cma", remote, "chatty")
    with agent:
        agent.notify(peer, b"hello")
        big = bytes(range(256)) * 4096  # 1 MiB: large enough for UCX's rendezvous form of active messages
        agent.notify(peer, big)
        notes = remote.call("notes", 5.0)
        while len(notes) < 2:
            more = remote.call("notes", 5.0)
            assert more, f"only {len(notes)} of 2 notifications arrived"
            notes += more
        assert notes == [("chatty", b"hello"), ("chatty", big)]
        remote.call("connect", agent.metadata())
        remote.call("notify", b"back")
        assert [(n.peer_name, n.payload) for n in agent.notifications(timeout=5.0)] == [("target", b"back")]


@pytest.mark.parametrize("path", ["cma", "tcp"])
def test_notifications_of_every_size_arrive_whole(path: str) -> None:
    """Small, medium and large payloads reach the peer in UCX's plain, data and rendezvous forms; all arrive."""
    with RemoteAgent("listener", 1 << 16) as remote:
        agent, _local, _region, peer = _setup(path, remote, f"sizes-{path}")
        with agent:
            payloads = [bytes([i % 251]) * size for i, size in enumerate((1, 100, 9000, 20000, 70000, 3 << 20))]
            for payload in payloads:
                agent.notify(peer, payload)
            received: list = []
            while len(received) < len(payloads):
                more = remote.call("notes", 10.0)
                assert more, f"{len(received)} of {len(payloads)} notifications arrived"
                received += more
            assert sorted(p for _name, p in received) == sorted(payloads)
            forms = remote.call("forms")
            assert forms.get("rndv", 0) >= 1 and forms.get("plain", 0) >= 1, forms


def test_transports_reported_and_shared_memory_on_one_host(remote: RemoteAgent) -> None:
    agent, _local, _region, peer = _setup("cma", remote, "lanes")
    with agent:
        lanes = peer.backends[0].transports(peer)
        assert lanes, "ucp_ep_query reported no lanes"
        assert "tcp" not in {transport for transport, _device in lanes}, lanes


def test_same_host_tcp_is_warned(remote: RemoteAgent, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="kvxfer.ucx"):
        agent, _local, _region, peer = _setup("tcp", remote, "warned")
        with agent:
            assert {transport for transport, _device in peer.backends[0].transports(peer)} == {"tcp"}
    assert any("reached over tcp" in record.getMessage() for record in caplog.records)
