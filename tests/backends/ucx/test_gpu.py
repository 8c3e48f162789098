"""CUDA memory through the UCX backend between two processes (GPU0 -> GPU0, and GPU0 -> GPU1 on two GPUs).

UCX moves device memory with its cuda_ipc (same host) or cuda_copy transports; the backend posts one put/get per
fragment ("direct" path), or stages many small fragments through GPU slots ("staged": one gather kernel, one
get/put, one scatter kernel per chunk). Run on a GPU machine: ``pytest -m "gpu and ucx" tests/backends/ucx``.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvxfer

from .remote import RemoteAgent, digest, random_fill, ucx_backend

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
            lanes = {transport for transport, _device in ucx_backend(peer.backends[0]).transports(peer)}
            assert lanes & {"cuda_ipc", "cuda_copy"}, f"no CUDA transport among the UCX lanes {lanes}"
            rng = np.random.default_rng(fragment)
            count = min(256, NBYTES // fragment // 2)
            local_offsets = rng.choice(NBYTES // fragment, count, replace=False) * fragment
            remote_offsets = rng.choice(NBYTES // fragment, count, replace=False) * fragment
            plan = agent.plan(
                kvxfer.Descs.from_ranges(region, local_offsets, fragment),
                peer,
                kvxfer.Descs.from_ranges(peer.region("buf"), remote_offsets, fragment),
            )
            # 256 fragments of 4 KiB are staged (small, many); larger ones go one put/get each
            assert ucx_backend(plan.backend).data_path(plan) == (
                "staged" if fragment < 32 << 10 and count >= 128 else "direct"
            )

            agent.write(plan, notify=b"gpu-written").wait(60)
            assert remote.call("digest", remote_offsets, fragment) == digest(
                cupy.asnumpy(local), local_offsets, fragment
            )
            assert remote.call("notes", 10.0) == [("gpu-initiator", b"gpu-written")]

            remote.call("fill", fragment + 1)
            local.fill(0)
            agent.read(plan, notify=b"gpu-read").wait(60)
            assert digest(cupy.asnumpy(local), local_offsets, fragment) == remote.call(
                "digest", remote_offsets, fragment
            )
            assert remote.call("notes", 10.0) == [("gpu-initiator", b"gpu-read")]


@pytest.mark.parametrize("remote_device", [0, pytest.param(1, marks=pytest.mark.multi_gpu)])
def test_staged_cuda_fragments_reuse_slots(remote_device: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """2048 random 4 KiB blocks through 256 KiB slots: 32 chunks per transfer, 4 in flight, so every slot of
    both sides is reused many times; bytes exact both ways, the notification after the data."""
    cupy = pytest.importorskip("cupy")
    small_slots = {"KVXFER_UCX_STAGE_CHUNK": str(64 << 10)}  # device slots are 4 chunks: 256 KiB
    monkeypatch.setenv("KVXFER_UCX_STAGE_CHUNK", small_slots["KVXFER_UCX_STAGE_CHUNK"])
    fragment, count = 4 << 10, 2048
    with RemoteAgent("staged-target", NBYTES, device=remote_device, environ=small_slots) as remote:
        cupy.cuda.Device(0).use()
        local = cupy.zeros(NBYTES, dtype=cupy.uint8)
        staging = np.empty(NBYTES, dtype=np.uint8)
        random_fill(staging, seed=7)
        local.set(staging)
        with kvxfer.Agent("staged-initiator", backends=["ucx"]) as agent:
            region = agent.register(local, name="buf")
            peer = agent.connect(remote.metadata)
            rng = np.random.default_rng(11)
            local_offsets = rng.choice(NBYTES // fragment, count, replace=False) * fragment
            remote_offsets = rng.choice(NBYTES // fragment, count, replace=False) * fragment
            plan = agent.plan(
                kvxfer.Descs.from_ranges(region, local_offsets, fragment),
                peer,
                kvxfer.Descs.from_ranges(peer.region("buf"), remote_offsets, fragment),
            )
            assert ucx_backend(plan.backend).data_path(plan) == "staged"
            for round_ in range(2):
                local.set(staging if round_ == 0 else staging[::-1].copy())
                agent.write(plan, notify=b"w%d" % round_).wait(60)
                expected = digest(cupy.asnumpy(local), local_offsets, fragment)
                assert remote.call("digest", remote_offsets, fragment) == expected
                assert remote.call("notes", 10.0) == [("staged-initiator", b"w%d" % round_)]

            remote.call("fill", 99)
            local.fill(0)
            agent.read(plan, notify=b"r").wait(60)
            host = cupy.asnumpy(local)
            assert digest(host, local_offsets, fragment) == remote.call("digest", remote_offsets, fragment)
            untouched = np.ones(NBYTES // fragment, dtype=bool)
            untouched[local_offsets // fragment] = False
            assert not host.reshape(-1, fragment)[untouched].any(), "bytes landed outside the planned blocks"
            assert remote.call("notes", 10.0) == [("staged-initiator", b"r")]


@pytest.mark.parametrize("op", ["write", "read"])
def test_staged_cuda_target_killed_mid_transfer_fails_within_deadline(op: str) -> None:
    """Staged device transfers run back to back while the target is SIGKILLed: the one in flight ends FAILED
    within its deadline (not a hang), the peer is marked gone, and the survivor still stages to a new target."""
    import signal
    import threading
    import time

    cupy = pytest.importorskip("cupy")
    deadline = 5.0
    fragment, count = 4 << 10, 4096
    with RemoteAgent("doomed-target", NBYTES, device=0) as victim:
        cupy.cuda.Device(0).use()
        local = cupy.ones(NBYTES, dtype=cupy.uint8)
        with kvxfer.Agent("staged-survivor", backends=["ucx"], timeouts=kvxfer.Timeouts(transfer=deadline)) as agent:
            region = agent.register(local, name="buf")
            peer = agent.connect(victim.metadata)
            offsets = np.random.default_rng(3).permutation(NBYTES // fragment)[:count] * fragment
            plan = agent.plan(
                kvxfer.Descs.from_ranges(region, offsets, fragment),
                peer,
                kvxfer.Descs.from_ranges(peer.region("buf"), offsets, fragment),
            )
            assert ucx_backend(plan.backend).data_path(plan) == "staged"
            move = agent.write if op == "write" else agent.read
            move(plan).wait(30)  # warm: slots allocated and registered on both sides
            killer = threading.Timer(0.2, victim.kill, (signal.SIGKILL,))
            killer.start()
            outcome, started = "none", time.monotonic()
            try:
                while time.monotonic() - started < 4 * deadline:
                    begun = time.monotonic()
                    try:
                        move(plan).wait(2 * deadline)
                    except kvxfer.KvxferError as error:
                        outcome = type(error).__name__
                        assert time.monotonic() - begun <= deadline + 1.5, "failure took longer than the deadline"
                        break
            finally:
                killer.join()
            assert outcome != "none", "no staged transfer failed after the kill"
            give_up = time.monotonic() + deadline
            while peer.connected and time.monotonic() < give_up:
                time.sleep(0.05)
            assert not peer.connected
            with RemoteAgent("fresh-target", NBYTES, device=0) as fresh:
                peer = agent.connect(fresh.metadata)
                plan = agent.plan(
                    kvxfer.Descs.from_ranges(region, offsets, fragment),
                    peer,
                    kvxfer.Descs.from_ranges(peer.region("buf"), offsets, fragment),
                )
                agent.write(plan, notify=b"after").wait(30)
                assert fresh.call("digest", offsets, fragment) == digest(cupy.asnumpy(local), offsets, fragment)
                assert fresh.call("notes", 10.0) == [("staged-survivor", b"after")]


@pytest.mark.parametrize("fragment", [4 << 10, 24 << 20])
def test_cuda_to_a_target_refusing_one_sided_access_goes_staged(fragment: int) -> None:
    """A target with KVXFER_UCX_ONE_SIDED=off (issue 14 item 1): CUDA memory moves only through GPU staging slots,
    which the target checks; fragments larger than a slot are cut into slot-sized spans. Byte-exact both ways."""
    cupy = pytest.importorskip("cupy")
    nbytes = 64 << 20
    with RemoteAgent("strict-gpu", nbytes, device=0, environ={"KVXFER_UCX_ONE_SIDED": "off"}) as remote:
        cupy.cuda.Device(0).use()
        local = cupy.zeros(nbytes, dtype=cupy.uint8)
        staging = np.empty(nbytes, dtype=np.uint8)
        random_fill(staging, seed=3)
        local.set(staging)
        with kvxfer.Agent("gpu-initiator", backends=["ucx"]) as agent:
            region = agent.register(local, name="buf")
            peer = agent.connect(remote.metadata)
            count = min(256, nbytes // fragment // 2)
            offsets = np.arange(count, dtype=np.int64) * fragment
            plan = agent.plan(
                kvxfer.Descs.from_ranges(region, offsets, fragment),
                peer,
                kvxfer.Descs.from_ranges(peer.region("buf"), offsets[::-1].copy(), fragment),
            )
            assert ucx_backend(plan.backend).data_path(plan) == "staged"
            agent.write(plan).wait(60)
            assert remote.call("digest", offsets[::-1].copy(), fragment) == digest(
                cupy.asnumpy(local), offsets, fragment
            )
            remote.call("fill", 5)
            local.fill(0)
            agent.read(plan).wait(60)
            assert digest(cupy.asnumpy(local), offsets, fragment) == remote.call(
                "digest", offsets[::-1].copy(), fragment
            )
