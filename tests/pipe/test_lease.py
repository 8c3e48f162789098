"""Block leases (kvxfer/pipe/lease.py) under a KVPipe pull, with faults injected by the mock backend."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvxfer import KVPipe, TransferState
from kvxfer.backends.mock import Fault
from kvxfer.pipe.lease import LeaseLostError, Leases
from tests.helpers import PIPE_SPEC as SPEC
from tests.helpers import pipe_agents


def test_expired_lease_fails_the_receiver_and_frees_the_blocks():
    prefill, decode, _, target, peer, _ = pipe_agents(Fault.delay(1.0))
    ended = []
    with prefill, decode:
        Leases.of(prefill).grant(b"req-1", "d", [1, 2], ttl=0.3, on_end=lambda lease, why: ended.append(why))
        pipe = KVPipe(decode, SPEC, peer, SPEC, strategy="direct")
        handle = pipe.pull([4, 5], [1, 2], lease=b"req-1", renew_every=10.0)  # heartbeats too rare to keep it
        with pytest.raises(LeaseLostError):
            handle.wait(timeout=10)
        assert ended == ["expired"] and handle.state is TransferState.FAILED
        time.sleep(1.0)
        assert not target.any()  # the cancelled copy never landed
        pipe.close()


def test_renewed_lease_outlives_a_slow_transfer_and_is_released_after_it():
    prefill, decode, source, target, peer, _ = pipe_agents(Fault.delay(0.8))
    ended = []
    with prefill, decode:
        Leases.of(prefill).grant(b"req-2", "d", [1, 2], ttl=0.3, on_end=lambda lease, why: ended.append(why))
        pipe = KVPipe(decode, SPEC, peer, SPEC, strategy="direct")
        pipe.pull([4, 5], [1, 2], lease=b"req-2", renew_every=0.05).wait(timeout=10)
        assert np.array_equal(target[:, [4, 5]], source[:, [1, 2]])
        deadline = time.monotonic() + 5
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == ["released"] and not Leases.of(prefill).granted
        pipe.close()


def test_pull_after_the_lease_expired_is_refused():
    prefill, decode, _, _, peer, _ = pipe_agents()
    ended = []
    with prefill, decode:
        Leases.of(prefill).grant(b"late", "d", [1, 2], ttl=0.05, on_end=lambda lease, why: ended.append(why))
        time.sleep(0.3)
        assert ended == ["expired"]
        pipe = KVPipe(decode, SPEC, peer, SPEC, strategy="direct")
        with pytest.raises(LeaseLostError):
            pipe.pull([4, 5], [1, 2], lease=b"late").wait(timeout=10)
        pipe.close()
