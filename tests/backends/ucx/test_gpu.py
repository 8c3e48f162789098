"""CUDA memory through the UCX backend between two processes (GPU0 -> GPU0, and GPU0 -> GPU1 on two GPUs).

UCX moves device memory with its cuda_ipc (same host) or cuda_copy transports; the backend posts one put/get per
fragment ("direct" path). Run on a GPU machine: ``pytest -m "gpu and ucx" tests/backends/ucx``.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvxfer

from .remote import RemoteAgent, digest, random_fill

pytestmark = [pytest.mark.ucx, pytest.mark.gpu, pytest.mark.timeout(300)]

NBYTES = 32 << 20


@pytest.mark.parametrize("fragment", [4 << 10, 64 << 10, 2 << 20])
@pytest.mark.parametrize("remote_device", [0, pytest.param(1, marks=pytest.mark.multi_gpu)])
def test_cuda_write_and_read_between_processes(remote_device: int, fragment: int) -> None:
    cupy = pytest.importorskip("cupy")
    with RemoteAgent("gpu-target", NBYTES, device=remote_device) as remote:
        cupy.cuda.Device(0).use()
        local = cupy.zeros(NBYTES, dtype=cupy.uint8)
        staging = np.empty(NBYTES, dtype=np.uint8)
        random_fill(staging, seed=fragment)
        local.set(staging)
        with kvxfer.Agent("gpu-initiator", backends=["ucx"]) as agent:
            region = agent.register(local, name="buf")
            peer = agent.connect(remote.metadata)
            lanes = {transport for transport, _device in peer.backends[0].transports(peer)}
            assert lanes & {"cuda_ipc", "cuda_copy"}, f"no CUDA transport among the UCX lanes {lanes}"
            rng = np.random.default_rng(fragment)
            count = min(256, NBYTES // fragment // 2)
            local_offsets = rng.choice(NBYTES // fragment, count, replace=False) * fragment
            remote_offsets = rng.choice(NBYTES // fragment, count, replace=False) * fragment
            plan = agent.plan(kvxfer.Descs.from_ranges(region, local_offsets, fragment), peer,
                              kvxfer.Descs.from_ranges(peer.region("buf"), remote_offsets, fragment))
            assert plan.backend.data_path(plan) == "direct"

            agent.write(plan, notify=b"gpu-written").wait(60)
            assert remote.call("digest", remote_offsets, fragment) == digest(cupy.asnumpy(local), local_offsets,
                                                                              fragment)
            assert remote.call("notes", 10.0) == [("gpu-initiator", b"gpu-written")]

            remote.call("fill", fragment + 1)
            local.fill(0)
            agent.read(plan, notify=b"gpu-read").wait(60)
            assert digest(cupy.asnumpy(local), local_offsets, fragment) == remote.call("digest", remote_offsets,
                                                                                       fragment)
            assert remote.call("notes", 10.0) == [("gpu-initiator", b"gpu-read")]
