import gc
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import (
    BackendError,
    Descs,
    Timeouts,
    TransferCancelledError,
    TransferState,
    TransferTimeoutError,
    UsageError,
)
from kvxfer.backends.mock import Fault
from tests.helpers import agent_pair

NBYTES = 8 << 20


def mocked(fault, **kwargs):
    src_agent, dst_agent, src, dst, peer = agent_pair(NBYTES, backend="mock", **kwargs)
    dst_agent._backends[0].on_post = lambda op, plan, notify: fault
    remote, local = peer.region("buf"), dst_agent.regions[0]
    offsets = np.arange(0, NBYTES, 4096)
    plan = dst_agent.plan(Descs.from_ranges(local, offsets, 4096), peer, Descs.from_ranges(remote, offsets, 4096))
    return src_agent, dst_agent, src, dst, plan


def test_dropped_transfer_fails_at_its_deadline():
    src_agent, dst_agent, _src, dst, plan = mocked(Fault.drop(), timeouts=Timeouts(transfer=0.2))
    with src_agent, dst_agent:
        handle = dst_agent.read(plan, notify=b"never")
        with pytest.raises(TransferTimeoutError, match="deadline"):
            handle.wait(timeout=5)
        assert handle.state is TransferState.FAILED and isinstance(handle.error, TransferTimeoutError)
        assert not dst.any() and not src_agent.notifications()


def test_wait_timeout_leaves_transfer_in_flight():
    src_agent, dst_agent, src, dst, plan = mocked(Fault.delay(0.3))
    with src_agent, dst_agent:
        handle = dst_agent.read(plan)
        with pytest.raises(TransferTimeoutError, match="still in flight"):
            handle.wait(timeout=0.01)
        assert handle.poll() is TransferState.PENDING
        handle.wait(timeout=10)
        assert np.array_equal(src, dst)


def test_cancel_stops_bytes_landing():
    src_agent, dst_agent, _src, dst, plan = mocked(Fault.delay(0.2))
    with src_agent, dst_agent:
        handle = dst_agent.read(plan, notify=b"x")
        handle.cancel()
        assert handle.state is TransferState.CANCELLED
        with pytest.raises(TransferCancelledError):
            handle.wait()
        time.sleep(0.4)
        assert not dst.any() and not src_agent.notifications()


def test_cancel_mid_copy_lands_nothing_after_it_returns():
    src_agent, dst_agent = kvxfer.Agent("src", backends=["local"]), kvxfer.Agent("dst", backends=["local"])
    src, dst = np.full(256 << 20, 7, np.uint8), np.zeros(256 << 20, np.uint8)  # filled fast: size matters here
    src_agent.register(src, name="buf")
    dst_agent.register(dst, name="buf")
    peer = dst_agent.connect(src_agent.metadata())
    with src_agent, dst_agent:
        offsets = np.arange(0, 256 << 20, 4096)
        plan = dst_agent.plan(
            Descs.from_ranges(dst_agent.regions[0], offsets[::-1], 4096),
            peer,
            Descs.from_ranges(peer.region("buf"), offsets[::-1], 4096),
        )
        handle = dst_agent.read(plan)
        while not dst[-1]:  # the first chunk (the region's tail: offsets run backwards) has landed
            time.sleep(1e-4)
        handle.cancel()
        snapshot = dst.copy()
        time.sleep(0.3)
        assert np.array_equal(snapshot, dst)
        assert handle.state is TransferState.CANCELLED
        assert 0 < np.count_nonzero(dst) < dst.size  # it was stopped mid-copy, not before or after


def test_injected_failure_and_corruption():
    src_agent, dst_agent, src, dst, plan = mocked(Fault.fail("disk on fire"))
    with src_agent, dst_agent:
        handle = dst_agent.read(plan)
        with pytest.raises(BackendError, match="disk on fire"):
            handle.wait()
        assert handle.state is TransferState.FAILED and not dst.any()
    src_agent, dst_agent, src, dst, plan = mocked(Fault.corrupt(3))
    with src_agent, dst_agent:
        dst_agent.read(plan, notify=b"done").wait()
        differ = np.flatnonzero(src != dst)
        assert list(differ) == [0, 1, 2]
        assert src_agent.notifications(timeout=1)[0].payload == b"done"


def test_released_handle_is_unusable_and_forgotten_handle_warns_at_close():
    src_agent, dst_agent, _src, _dst, plan = mocked(Fault.delay(0.2))
    with src_agent:
        with dst_agent.read(plan) as handle:
            pass
        assert handle.state is TransferState.CANCELLED
        with pytest.raises(UsageError, match="released"):
            handle.poll()
        forgotten = dst_agent.read(plan)
        with pytest.warns(ResourceWarning, match="never waited"):
            dst_agent.close()
        assert forgotten.state is TransferState.DONE  # close waited for it within Timeouts.close


def test_unclosed_agent_warns():
    with pytest.warns(ResourceWarning, match="not closed"):
        kvxfer.Agent("leak", backends=["local"])
        gc.collect()


@pytest.mark.parametrize("timeout", ["x", float("nan"), -1, True, float("inf")])
def test_wait_refuses_a_timeout_that_is_not_a_finite_number_of_seconds(timeout):
    with kvxfer.Agent("a", backends=["local"]) as a, kvxfer.Agent("b", backends=["local"]) as b:
        a.register(np.arange(64, dtype=np.uint8), name="kv")
        destination = np.zeros(64, np.uint8)
        local = b.register(destination, name="kv")
        peer = b.connect(a.metadata())
        remote = kvxfer.Descs.from_ranges(peer.region("kv"), [0], 64)
        handle = b.read(b.plan(kvxfer.Descs.from_ranges(local, [0], 64), peer, remote))
        with pytest.raises(kvxfer.ConfigError, match="timeout"):
            handle.wait(timeout=timeout)
        handle.wait(timeout=5.0)  # the refused wait left the transfer alone
        assert destination.tolist() == list(range(64))
