"""The local backend with CUDA memory: agents of one process, cupy copies within a GPU and across two."""

from __future__ import annotations

import numpy as np
import pytest

import kvxfer
from kvxfer import Descs, TransferState


@pytest.mark.parametrize(
    "devices",
    [
        pytest.param((0, 0), marks=pytest.mark.gpu),
        pytest.param((0, 1), marks=pytest.mark.multi_gpu),
        pytest.param(("host", 0), marks=pytest.mark.gpu),
    ],
)
def test_local_copies_with_cuda_memory(devices):
    import cupy

    nbytes = 8 << 20
    if devices[0] == "host":
        source = np.frombuffer(np.random.default_rng(0).bytes(nbytes), np.uint8).copy()
        expected = source
    else:
        with cupy.cuda.Device(devices[0]):
            source = cupy.random.default_rng(0).integers(1, 256, nbytes, dtype=cupy.uint8)
        expected = source.get()
    with cupy.cuda.Device(devices[1]):
        target = cupy.zeros(nbytes, dtype=cupy.uint8)
    with kvxfer.Agent("a", backends=["local"]) as a, kvxfer.Agent("b", backends=["local"]) as b:
        a.register(source, name="buf")
        region = b.register(target, name="buf")
        peer = b.connect(a.metadata())
        offsets = np.random.default_rng(1).permutation(nbytes // 4096)[:300] * 4096
        plan = b.plan(
            Descs.from_ranges(region, offsets, 4096),
            peer,
            Descs.from_ranges(peer.region("buf"), offsets[::-1].copy(), 4096),
        )
        handle = b.read(plan, notify=b"n")
        handle.wait(timeout=30)
        assert handle.state is TransferState.DONE
        got = target.get()
        for mine, theirs in zip(offsets, offsets[::-1], strict=True):
            assert np.array_equal(got[mine : mine + 4096], expected[theirs : theirs + 4096])
        untouched = np.setdiff1d(np.arange(nbytes // 4096), offsets // 4096)
        assert not got.reshape(-1, 4096)[untouched].any()
        assert a.notifications(timeout=2)[0].payload == b"n"
