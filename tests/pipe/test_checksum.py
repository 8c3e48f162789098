"""Verify mode (kvxfer/pipe/checksum.py): checksums across layouts, corruption caught, encoding."""

from __future__ import annotations

import numpy as np
import pytest

import kvxfer
from kvxfer import KVPipe, TransferError
from kvxfer.backends.mock import Fault
from kvxfer.pipe.checksum import Checksums, compute
from tests.helpers import PIPE_SPEC as SPEC
from tests.helpers import Cluster, pipe_agents


def test_verify_mode_catches_corruption():
    prefill, decode, _, _, peer, prefill_region = pipe_agents(Fault.corrupt(4))
    with prefill, decode:
        expected = {"p": compute(prefill_region, SPEC, [1, 2]).encode()}
        pipe = KVPipe(decode, SPEC, peer, SPEC, strategy="direct")
        with pytest.raises(TransferError, match="checksum mismatch"):
            pipe.pull([4, 5], [1, 2], expected=expected).wait(timeout=10)
        pipe.close()


@pytest.mark.parametrize("p_tp, d_tp, p_block, d_block", [(1, 2, 16, 32), (2, 1, 32, 16), (2, 4, 16, 16)])
def test_verify_mode_accepts_correct_data_across_layouts(p_tp, d_tp, p_block, d_block):
    cluster = Cluster(p_tp, d_tp, 8, p_block, d_block, "HND", "NHD", tokens=40)
    try:
        expected = {
            agent.name: compute(agent.regions[0], spec, cluster.p_ids, num_tokens=40)
            for agent, spec in zip(cluster.prefill, cluster.p_specs, strict=True)
        }
        for rank in range(d_tp):
            pipe = cluster.pipe(rank, strategy="staged")
            pipe.pull(cluster.d_ids, cluster.p_ids, num_tokens=40, expected=expected).wait(timeout=10)
            np.testing.assert_array_equal(cluster.d_caches[rank], cluster.expected(rank))
            pipe.close()
    finally:
        cluster.close()


def test_checksums_round_trip_and_reject_garbage():
    values = np.arange(12, dtype=np.uint32).reshape(3, 4)
    original = Checksums(values, 16, 4, 40)
    decoded = Checksums.decode(original.encode())
    assert np.array_equal(decoded.values, values) and decoded.first_head == 4 and decoded.num_tokens == 40
    with pytest.raises(kvxfer.HandshakeError):
        Checksums.decode(b"\x00garbage")
