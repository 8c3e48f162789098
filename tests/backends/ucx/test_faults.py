"""Peer failures with real processes: SIGKILL mid-transfer, SIGSTOP (hung), and reconnecting afterwards."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

import kvxfer
from kvxfer.backends.ucx import UcxBackend
from kvxfer.backends.ucx.config import UcxConfig
from kvxfer.errors import KvxferError, PeerDisconnectedError, TransferError, TransferTimeoutError

from .remote import RemoteAgent, digest, random_fill

pytestmark = [pytest.mark.ucx, pytest.mark.timeout(180)]

REGION_NBYTES = 64 << 20
FRAGMENT = 4 << 10
DEADLINE = 5.0
CONFIGS = {
    "cma": UcxConfig(),
    "shm-staged": UcxConfig(cma="off"),
    "shm-direct": UcxConfig(cma="off", stage_below=0),
    "tcp": UcxConfig(cma="off", error_mode="peer"),
}


def _agent(path: str, name: str, transfer: float = DEADLINE):
    agent = kvxfer.Agent(
        name, backends=[UcxBackend(CONFIGS[path])], timeouts=kvxfer.Timeouts(transfer=transfer, close=2.0)
    )
    local = np.zeros(REGION_NBYTES, dtype=np.uint8)
    random_fill(local, seed=3)
    region = agent.register(local, name="buf")
    return agent, local, region


def _plan(agent, region, peer, fragments: int = REGION_NBYTES // FRAGMENT):
    offsets = np.random.default_rng(1).permutation(REGION_NBYTES // FRAGMENT)[:fragments] * FRAGMENT
    return agent.plan(
        kvxfer.Descs.from_ranges(region, offsets, FRAGMENT),
        peer,
        kvxfer.Descs.from_ranges(peer.region("buf"), offsets[::-1].copy(), FRAGMENT),
    ), offsets


def _wait_for(condition, seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _warm(agent, plan) -> None:
    """The first transfer to a fresh peer pays page faults and connection set-up; with a short backend deadline
    a loaded machine can make it miss that deadline. Warm-up is not what these tests check: retry it."""
    for attempt in range(5):
        try:
            agent.write(plan).wait(30)
            return
        except TransferTimeoutError:
            if attempt == 4:
                raise


def _check_healthy(agent, local, region, path: str) -> None:
    """The survivor reconnects to a fresh process under the old name and moves bytes exactly."""
    with RemoteAgent("target", REGION_NBYTES) as fresh:
        peer = agent.connect(fresh.metadata)
        assert peer.connected
        plan, offsets = _plan(agent, region, peer, fragments=256)
        _warm(agent, plan)  # a fresh peer under a short backend deadline on a loaded machine (see _warm)
        agent.write(plan, notify=b"again").wait(30)
        assert fresh.call("digest", offsets[::-1].copy(), FRAGMENT) == digest(local, offsets, FRAGMENT)
        assert fresh.call("notes", 5.0) == [(agent.name, b"again")]


@pytest.mark.parametrize("path", list(CONFIGS))
def test_sigkill_mid_transfer_fails_within_deadline(path: str) -> None:
    agent, local, region = _agent(path, f"survivor-{path}")
    with agent:
        with RemoteAgent("target", REGION_NBYTES) as victim:
            peer = agent.connect(victim.metadata)
            plan, _offsets = _plan(agent, region, peer)
            agent.write(plan).wait(30)  # warm: the first transfer pays page faults
            killer = threading.Timer(0.05, victim.kill, (signal.SIGKILL,))
            killer.start()
            outcomes, started = [], time.monotonic()
            try:
                while time.monotonic() - started < 3 * DEADLINE:
                    begun = time.monotonic()
                    try:
                        handle = agent.write(plan)
                        handle.wait(2 * DEADLINE)
                        outcomes.append("done")
                    except KvxferError as error:
                        outcomes.append(type(error).__name__)
                        assert time.monotonic() - begun <= DEADLINE + 1.0, "failure took longer than the deadline"
                        break
            finally:
                killer.join()
            assert outcomes and outcomes[-1] != "done", f"no transfer failed after the kill: {outcomes}"
            assert _wait_for(lambda: not peer.connected, DEADLINE), "the dead peer was not marked disconnected"
            with pytest.raises(KvxferError):
                agent.write(plan).wait(DEADLINE)
        _check_healthy(agent, local, region, path)


@pytest.mark.parametrize("path", ["shm-staged", "tcp"])
def test_stopped_peer_fails_by_deadline_and_recovers(path: str) -> None:
    """A hung peer cannot be told from a slow one: its transfers fail at their deadline, the agent stays usable,
    and once the peer runs again it is reachable again."""
    agent, local, region = _agent(path, f"patient-{path}")
    with agent:
        with RemoteAgent("target", REGION_NBYTES) as sleeper:
            peer = agent.connect(sleeper.metadata)
            plan, offsets = _plan(agent, region, peer, fragments=1024)
            agent.write(plan).wait(30)
            sleeper.stop()
            try:
                began = time.monotonic()
                handle = agent.write(plan, timeout=1.0)
                with pytest.raises(TransferTimeoutError):
                    handle.wait(3 * DEADLINE)
                assert time.monotonic() - began < 1.0 + 2.0, "the deadline was not kept"
                assert handle.poll() is kvxfer.TransferState.FAILED
            finally:
                sleeper.kill(signal.SIGCONT)
            random_fill(local, seed=11)
            agent.write(plan, notify=b"awake").wait(30)
            assert sleeper.call("digest", offsets[::-1].copy(), FRAGMENT) == digest(local, offsets, FRAGMENT)
            assert (agent.name, b"awake") in sleeper.call("notes", 5.0)
        _check_healthy(agent, local, region, path)


def test_stopped_peer_does_not_block_cross_memory_transfers() -> None:
    """One-sided copies need nothing from the target: a stopped process still receives the bytes."""
    agent, local, region = _agent("cma", "one-sided")
    with agent:
        with RemoteAgent("target", REGION_NBYTES) as sleeper:
            peer = agent.connect(sleeper.metadata)
            plan, offsets = _plan(agent, region, peer, fragments=1024)
            sleeper.stop()
            try:
                agent.write(plan).wait(DEADLINE)
            finally:
                sleeper.kill(signal.SIGCONT)
            assert sleeper.call("digest", offsets[::-1].copy(), FRAGMENT) == digest(local, offsets, FRAGMENT)


def test_cancel_cross_memory_transfer_lands_nothing_afterwards() -> None:
    agent, local, region = _agent("cma", "canceller")
    with agent:
        with RemoteAgent("target", REGION_NBYTES) as target:
            peer = agent.connect(target.metadata)
            plan, offsets = _plan(agent, region, peer)
            handle = agent.write(plan)
            handle.cancel()
            after_cancel = target.call("digest", offsets[::-1].copy(), FRAGMENT)
            time.sleep(0.2)
            assert target.call("digest", offsets[::-1].copy(), FRAGMENT) == after_cancel
            with pytest.raises(TransferError):
                handle.wait(1.0)
            agent.write(plan).wait(30)  # the link is still healthy
            assert target.call("digest", offsets[::-1].copy(), FRAGMENT) == digest(local, offsets, FRAGMENT)


@pytest.mark.parametrize("path", ["shm-staged", "tcp"])
def test_stopped_peer_times_out_at_its_deadline_and_stays_connected(path: str) -> None:
    """docs/backends.md, "Error handling mode and liveness": a hung (SIGSTOPped) peer's transfers end FAILED with
    the timeout error at their deadline, not before and not much after, and the peer stays connected (a hung peer
    cannot be told from a slow one) as long as no cancel comes after the backend's own deadline."""
    handle_deadline = 1.0  # well inside the backend's deadline (Timeouts.transfer = DEADLINE)
    agent, _local, region = _agent(path, f"timed-{path}")
    with agent:
        with RemoteAgent("target", REGION_NBYTES) as sleeper:
            peer = agent.connect(sleeper.metadata)
            plan, _offsets = _plan(agent, region, peer, fragments=1024)
            agent.write(plan).wait(30)
            lost: list = []
            sleeper.stop()
            try:
                for attempt in range(2):  # the second shows the first left the link usable, not lost
                    began = time.monotonic()
                    handle = agent.write(plan, timeout=handle_deadline)
                    with pytest.raises(TransferTimeoutError, match="missed its deadline") as caught:
                        handle.wait(3 * DEADLINE)
                    elapsed = time.monotonic() - began
                    assert handle_deadline <= elapsed <= handle_deadline + 1.0, f"attempt {attempt}: {elapsed:.3f} s"
                    assert handle.poll() is kvxfer.TransferState.FAILED
                    assert handle.error is caught.value
                    assert not isinstance(caught.value.__cause__, PeerDisconnectedError)
                    handle.release()
                    if _wait_for(lambda: not peer.connected, 0.3):
                        lost.append(attempt)
                assert not lost, f"the stopped peer was marked disconnected after attempts {lost}"
                assert peer.connected
            finally:
                sleeper.kill(signal.SIGCONT)


@pytest.mark.parametrize("path", ["shm-staged", "tcp"])
def test_default_deadline_times_out_a_stopped_peer_and_keeps_it_connected(path: str) -> None:
    """With no timeout given, the handle's deadline and the backend's are the same Timeouts.transfer, taken
    microseconds apart: the expiry must still leave the peer connected, every time (transfer.LOST_GRACE)."""
    agent, _local, region = _agent(path, f"default-{path}", transfer=1.0)
    with agent:
        with RemoteAgent("target", REGION_NBYTES) as sleeper:
            peer = agent.connect(sleeper.metadata)
            plan, _offsets = _plan(agent, region, peer, fragments=1024)
            _warm(agent, plan)
            sleeper.stop()
            try:
                for attempt in range(4):
                    handle = agent.write(plan)  # the default deadline: Timeouts.transfer
                    with pytest.raises(TransferTimeoutError, match="missed its deadline"):
                        handle.wait(10.0)
                    handle.release()
                    assert not _wait_for(lambda: not peer.connected, 0.3), f"marked lost after attempt {attempt}"
            finally:
                sleeper.kill(signal.SIGCONT)


@pytest.mark.parametrize("path", ["shm-staged", "tcp"])
def test_cancel_after_the_backend_deadline_marks_a_stopped_peer_lost(path: str) -> None:
    """docs/backends.md: a cancel that comes after the backend's deadline (Timeouts.transfer) with UCX operations
    outstanding presumes the peer hung: it is marked lost, new posts fail with PeerDisconnectedError, and
    connecting again (to a live process) works."""
    backend_deadline = 2.0  # Timeouts.transfer, shorter than DEADLINE to keep the test quick
    agent, local, region = _agent(path, f"hung-{path}", transfer=backend_deadline)
    with agent:
        with RemoteAgent("target", REGION_NBYTES) as sleeper:
            peer = agent.connect(sleeper.metadata)
            plan, _offsets = _plan(agent, region, peer, fragments=1024)
            _warm(agent, plan)
            sleeper.stop()
            try:
                handle = agent.write(plan, timeout=10 * backend_deadline)  # the handle outlives the backend's
                with pytest.raises(TransferTimeoutError, match="still in flight"):
                    handle.wait(backend_deadline + 0.3)
                assert handle.poll() is kvxfer.TransferState.PENDING
                assert peer.connected, "the peer was marked lost before any cancel"
                handle.cancel()
                assert handle.state is kvxfer.TransferState.CANCELLED
                assert _wait_for(lambda: not peer.connected, 2.0), "the hung peer was not marked disconnected"
                assert "missed its deadline" in (peer.lost_reason or ""), peer.lost_reason
                # The agent refuses a plan to the lost peer before the backend sees it (the backend's own
                # PeerDisconnectedError is behind that check).
                with pytest.raises(KvxferError, match="disconnected"):
                    agent.write(plan).wait(backend_deadline)
            finally:
                sleeper.kill(signal.SIGCONT)
        _check_healthy(agent, local, region, path)
