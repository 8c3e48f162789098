import dataclasses
import threading

import numpy as np
import pytest

import kvxfer
from kvxfer import (
    BackendUnavailableError,
    ConfigError,
    DescriptorError,
    Descs,
    HandshakeError,
    KVCacheSpec,
    PeerError,
    RegistrationError,
    TransferState,
    UsageError,
)
from kvxfer.backends.local import LocalBackend
from kvxfer.metadata import AgentMetadata
from tests.helpers import agent_pair, random_bytes


def ranges(region, offsets, nbytes):
    return Descs.from_ranges(region, np.asarray(offsets), nbytes)


def test_read_and_write_move_exact_bytes_and_notify_after_data():
    src_agent, dst_agent, src, dst, peer = agent_pair(1 << 16)
    with src_agent, dst_agent:
        local, remote = dst_agent.regions[0], peer.region("buf")
        offsets = np.random.default_rng(0).permutation(16)[:10] * 4096
        plan = dst_agent.plan(ranges(local, offsets, 4096), peer, ranges(remote, offsets, 4096))
        handle = dst_agent.read(plan, notify=b"req-1")
        assert handle.wait() is handle and handle.state is TransferState.DONE
        for offset in offsets:
            assert np.array_equal(dst[offset : offset + 4096], src[offset : offset + 4096])
        untouched = np.setdiff1d(np.arange(16) * 4096, offsets)
        assert all(not dst[o : o + 4096].any() for o in untouched)
        notes = src_agent.notifications(timeout=2)
        assert [(n.peer_name, n.payload) for n in notes] == [("dst", b"req-1")]
        # write: push fresh local bytes into the peer
        dst[:4096] = random_bytes(4096, 1)
        plan = dst_agent.plan(ranges(local, [0], 4096), peer, ranges(remote, [8192], 4096))
        dst_agent.write(plan, notify=b"pushed").wait()
        assert np.array_equal(src[8192:12288], dst[:4096])
        assert src_agent.notifications(timeout=2)[0].payload == b"pushed"


def test_kv_blocks_between_agents_and_select():
    spec = KVCacheSpec(4, 32, 16, 2, 64, dtype="float16")
    with kvxfer.Agent("p", backends=["local"]) as prefill, kvxfer.Agent("d", backends=["local"]) as decode:
        source = random_bytes(spec.nbytes).view(np.float16).reshape(spec.tensor_shape)
        target = np.zeros_like(source)
        prefill.register(source, name="kv")
        local = decode.register(target, name="kv")
        peer = decode.connect(prefill.metadata())
        all_blocks = np.arange(spec.num_blocks)
        plan = decode.plan(
            Descs.from_blocks(local, spec, all_blocks), peer, Descs.from_blocks(peer.region("kv"), spec, all_blocks)
        )
        assert len(plan) == 1  # a whole contiguous cache coalesces to one pair
        # per request: blocks 5, 9, 2 of the peer into local blocks 0, 1, 2 (descs are (layer, block, part))
        per_block = 2 * spec.num_layers
        remote_ids, local_ids = np.array([5, 9, 2]), np.array([0, 1, 2])

        def rows(ids):
            layers = np.arange(spec.num_layers)[:, None, None]
            return (layers * spec.num_blocks * 2 + ids[None, :, None] * 2 + np.arange(2)[None, None, :]).ravel()

        sub = plan.select(rows(local_ids), rows(remote_ids))
        assert sub.nbytes == 3 * per_block * spec.block_nbytes // 2
        decode.read(sub).wait()
        assert np.array_equal(target[:, local_ids].view(np.uint16), source[:, remote_ids].view(np.uint16))
        assert not target[:, 3:].any()


def test_bad_input_raises_and_moves_no_byte():
    src_agent, dst_agent, _src, dst, peer = agent_pair(1 << 14)
    with src_agent, dst_agent:
        local, remote = dst_agent.regions[0], peer.region("buf")
        with pytest.raises(DescriptorError, match="outside"):
            ranges(remote, [1 << 14], 1)
        with pytest.raises(DescriptorError, match="local_descs has 2"):
            dst_agent.plan(ranges(local, [0, 64], 64), peer, ranges(remote, [0], 64))
        with pytest.raises(DescriptorError, match="nbytes"):
            dst_agent.plan(ranges(local, [0], 64), peer, ranges(remote, [0], 32))
        duplicate = dst_agent.plan(ranges(local, [0, 64], 64), peer, ranges(remote, [128, 128], 64))
        with pytest.raises(DescriptorError, match="overlap"):
            dst_agent.write(duplicate)
        with pytest.raises(DescriptorError, match="not of peer"):
            dst_agent.plan(ranges(local, [0], 8), peer, ranges(local, [0], 8))
        forged = ranges(remote, [0], 64)
        forged.addr[0] += np.uint64(1 << 14)  # hand-edited: now outside the peer's region
        with pytest.raises(DescriptorError, match="outside its region"):
            dst_agent.plan(ranges(local, [0], 64), peer, forged)
        with pytest.raises(PeerError, match="unknown peer"):
            dst_agent.plan(ranges(local, [0], 8), "nobody", ranges(remote, [0], 8))
        with pytest.raises(PeerError, match="no region"):
            peer.region("missing")
        with pytest.raises(UsageError, match="built by agent"):
            src_agent.read(duplicate)
        with pytest.raises(ConfigError, match="notify"):
            dst_agent.read(duplicate, notify="text")
        assert not dst.any()
        assert not src_agent.notifications()


def test_use_after_close_and_double_registration():
    agent = kvxfer.Agent("a", backends=["local"])
    array = np.zeros(64, np.uint8)
    region = agent.register(array, name="r")
    with pytest.raises(RegistrationError, match="already"):
        agent.register(region)
    with pytest.raises(RegistrationError, match="named 'r'"):
        agent.register(np.zeros(8, np.uint8), name="r")
    agent.close()
    for call in (lambda: agent.register(array), agent.metadata, lambda: agent.connect(b"")):
        with pytest.raises(UsageError, match="closed"):
            call()
    assert not region.registered


def test_deregister_refused_while_in_flight_then_allowed():
    src_agent, dst_agent, src, dst, peer = agent_pair(1 << 20, backend="mock")
    mock = dst_agent._backends[0]
    mock.on_post = lambda op, plan, notify: kvxfer.backends.mock.Fault.delay(0.3)
    with src_agent, dst_agent:
        local = dst_agent.regions[0]
        plan = dst_agent.plan(ranges(local, [0], 1 << 20), peer, ranges(peer.region("buf"), [0], 1 << 20))
        handle = dst_agent.read(plan)
        with pytest.raises(RegistrationError, match="in use"):
            dst_agent.deregister(local)
        with pytest.raises(RegistrationError, match="in use"):
            src_agent.deregister(src_agent.regions[0])  # the peer's side is pinned too
        dst_agent.deregister(local, timeout=10)
        assert handle.state is TransferState.DONE and np.array_equal(src, dst)


def test_explicit_unavailable_backend_names_what_is_available():
    with pytest.raises((BackendUnavailableError, ConfigError), match=r"available|unknown"):
        kvxfer.Agent("a", backends=["warp-drive"])


def test_standalone_notify_and_agent_connected_to_itself():
    with kvxfer.Agent("solo", backends=["local"]) as agent:
        data = random_bytes(4096)
        region = agent.register(data, name="r")
        myself = agent.connect(agent.metadata())
        plan = agent.plan(ranges(region, [2048], 1024), myself, ranges(myself.region("r"), [0], 1024))
        agent.read(plan).wait()
        assert np.array_equal(data[2048:3072], data[:1024])
        agent.notify("solo", b"hello")
        assert agent.notifications(timeout=1)[0].payload == b"hello"


class HostScopedLocal(LocalBackend):
    """The local backend claiming host scope: whether it reaches a peer then rests on host ids alone."""

    caps = dataclasses.replace(LocalBackend.caps, name="local-host", scope="host")


def test_host_scope_reaches_only_peers_with_our_host_id(monkeypatch):
    monkeypatch.setenv("KVXFER_HOST_ID", "node-a")
    with (
        kvxfer.Agent("src", backends=[HostScopedLocal()]) as src_agent,
        kvxfer.Agent("dst", backends=[HostScopedLocal()], host_id="node-b") as dst_agent,
    ):
        assert (src_agent.host_id, dst_agent.host_id) == ("node-a", "node-b")
        src_agent.register(random_bytes(4096), name="buf")
        with pytest.raises(HandshakeError, match="no backend reaches peer 'src'") as caught:
            dst_agent.connect(src_agent.metadata())
        assert "'node-a'" in str(caught.value) and caught.value.peer_name == "src"
        assert not dst_agent.peers
    with (
        kvxfer.Agent("src", backends=[HostScopedLocal()], host_id="node-a") as src_agent,
        kvxfer.Agent("dst", backends=[HostScopedLocal()]) as dst_agent,
    ):
        source, destination = random_bytes(1 << 16), np.zeros(1 << 16, np.uint8)
        src_agent.register(source, name="buf")
        local = dst_agent.register(destination, name="buf")
        # Another process of the same host: host scope still reaches it, process scope would not.
        meta = AgentMetadata.decode(src_agent.metadata())
        other_process = dataclasses.replace(meta, pid=meta.pid + 1).encode()
        peer = dst_agent.connect(other_process)
        assert [b.caps.scope for b in peer.backends] == ["host"]
        plan = dst_agent.plan(ranges(local, [0], 1 << 16), peer, ranges(peer.region("buf"), [0], 1 << 16))
        assert dst_agent.read(plan).wait().state is TransferState.DONE
        assert np.array_equal(destination, source)
    with kvxfer.Agent("src", backends=["local"]) as src_agent, kvxfer.Agent("dst", backends=["local"]) as dst_agent:
        meta = AgentMetadata.decode(src_agent.metadata())
        with pytest.raises(HandshakeError, match="no backend reaches"):
            dst_agent.connect(dataclasses.replace(meta, pid=meta.pid + 1).encode())


@pytest.mark.parametrize("op", ["write", "read"])
def test_notification_is_observed_only_after_all_the_data(op):
    """64 MiB in 16384 shuffled 4 KiB fragments (16 chunks over the copy threads); the notification goes to the
    target (the peer written to, or read from) and its subscriber looks at the bytes the moment it arrives."""
    fragment, count = 4096, 16384
    rng = np.random.default_rng(5)
    local_ids, remote_ids = rng.permutation(count), rng.permutation(count)
    data, empty = random_bytes(fragment * count, 6), np.zeros(fragment * count, np.uint8)
    mine, theirs = (data, empty) if op == "write" else (empty, data)
    (source, source_ids), (destination, destination_ids) = (
        ((mine, local_ids), (theirs, remote_ids)) if op == "write" else ((theirs, remote_ids), (mine, local_ids))
    )
    expected = np.zeros_like(destination)
    expected.reshape(count, fragment)[destination_ids] = source.reshape(count, fragment)[source_ids]
    handles, posted, arrived, seen = [], threading.Event(), threading.Event(), []

    def observe(note):  # on the initiator's copy thread
        posted.wait(10)
        seen.append((note.peer_name, note.payload, np.array_equal(destination, expected), handles[0].poll()))
        if op == "read":
            theirs[:] = 0  # "your blocks were read": the target may reuse them at once
        arrived.set()

    with (
        kvxfer.Agent("initiator", backends=["local"]) as initiator,
        kvxfer.Agent("target", backends=["local"]) as target,
    ):
        local = initiator.register(mine, name="buf")
        target.register(theirs, name="buf")
        target.subscribe(b"order:", observe)
        peer = initiator.connect(target.metadata())
        plan = initiator.plan(
            ranges(local, local_ids * fragment, fragment),
            peer,
            ranges(peer.region("buf"), remote_ids * fragment, fragment),
        )
        assert len(plan) == count  # nothing coalesced: every fragment is its own copy
        handles.append(getattr(initiator, op)(plan, notify=b"order:1"))
        posted.set()
        assert arrived.wait(30)
        handles[0].wait(timeout=30)
        assert seen == [("initiator", b"order:1", True, TransferState.DONE)]
        if op == "read":
            assert np.array_equal(destination, expected)  # nothing was read after the notification
        assert not target.notifications()  # the subscriber took it


def test_agent_owns_and_closes_its_services():
    import threading

    from kvxfer.pipe import LayerBoard, Leases

    before = set(threading.enumerate())
    agent = kvxfer.Agent("owner", backends=["local"])
    leases = Leases.of(agent)
    assert Leases.of(agent) is leases is agent.service(Leases)  # one per agent
    board = LayerBoard.of(agent)
    assert any(t.name == "kvxfer-leases-owner" for t in threading.enumerate())
    agent.close()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]  # no thread outlives close
    assert agent.service(Leases) is leases and agent.service(LayerBoard) is board  # still reachable, closed
    with pytest.raises(kvxfer.UsageError):
        agent.service(dict)  # nothing new starts on a closed agent
