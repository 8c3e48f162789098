"""CUDA IPC backend between two real processes: 1 GPU (same device) and 2 GPUs (NVLink), legacy and VMM memory."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import Descs, KVCacheSpec, PeerDisconnectedError, TransferError, TransferState
from tests.backends.gpu_peer import serve, spin_stream

SPEC = KVCacheSpec(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=128, dtype="bfloat16")


class Remote:
    """A spawned peer process and the pipe that drives it."""

    def __init__(self, device: int, memory: str, nbytes: int = SPEC.nbytes, seed: int = 1, backend="cuda_ipc"):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, backend, device, nbytes, memory, seed), daemon=True)
        self.process.start()

    def ask(self, *command, timeout: float = 60.0):
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {command[0]!r} within {timeout} s")
        return self.conn.recv()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.ask("exit", timeout=30)
            except (TimeoutError, EOFError, BrokenPipeError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def local_cache(device: int):
    import cupy

    with cupy.cuda.Device(device):
        return cupy.zeros(SPEC.nbytes, dtype=cupy.uint8)


def block_bytes(array_bytes: bytes, ids) -> bytes:
    view = np.frombuffer(array_bytes, dtype=np.uint16).reshape(SPEC.tensor_shape)
    return view[:, ids].tobytes()


@pytest.mark.parametrize("strategy", ["kernel", "copy"])
@pytest.mark.parametrize("memory", ["legacy", "vmm", "torch-vmm"])
@pytest.mark.parametrize(
    "devices", [pytest.param((0, 0), marks=pytest.mark.gpu), pytest.param((0, 1), marks=pytest.mark.multi_gpu)]
)
def test_read_and_write_random_blocks_byte_exact(devices, memory, strategy):
    import cupy

    from kvxfer.backends.cuda_ipc import CudaIpcBackend

    remote = Remote(devices[1], memory, seed=7)
    try:
        with kvxfer.Agent("local", backends=[CudaIpcBackend(strategy)]) as agent:
            cache = local_cache(devices[0])
            region = agent.register(cache, name="kv")
            peer = agent.connect(remote.ask("meta"))
            remote.ask("connect", agent.metadata())
            rng = np.random.default_rng(3)
            remote_ids, local_ids = rng.permutation(64)[:20], rng.permutation(64)[:20]
            plan = agent.plan(
                Descs.from_blocks(region, SPEC, local_ids), peer, Descs.from_blocks(peer.region("kv"), SPEC, remote_ids)
            )
            handle = agent.read(plan, notify=b"read-done")
            handle.wait(timeout=30)
            assert handle.state is TransferState.DONE
            peer_bytes = remote.ask("bytes", 0, SPEC.nbytes)
            mine = cache.get().tobytes()
            assert block_bytes(mine, local_ids) == block_bytes(peer_bytes, remote_ids)
            others = np.setdiff1d(np.arange(64), local_ids)
            assert not np.frombuffer(block_bytes(mine, others), np.uint8).any()
            assert remote.ask("notes", 10) == [b"read-done"]
            # write: fresh local data into other peer blocks
            with cupy.cuda.Device(devices[0]):
                cache[:] = cupy.random.default_rng(5).integers(1, 256, SPEC.nbytes, dtype=cupy.uint8)
            targets = rng.permutation(64)[:9]
            plan = agent.plan(
                Descs.from_blocks(region, SPEC, local_ids[:9]),
                peer,
                Descs.from_blocks(peer.region("kv"), SPEC, targets),
            )
            agent.write(plan, notify=b"write-done").wait(timeout=30)
            assert remote.ask("notes", 10) == [b"write-done"]
            after = remote.ask("bytes", 0, SPEC.nbytes)
            assert block_bytes(after, targets) == block_bytes(cache.get().tobytes(), local_ids[:9])
            untouched = np.setdiff1d(np.arange(64), targets)
            assert block_bytes(after, untouched) == block_bytes(peer_bytes, untouched)
    finally:
        remote.close()


@pytest.mark.parametrize(
    "devices", [pytest.param((0, 0), marks=pytest.mark.gpu), pytest.param((0, 1), marks=pytest.mark.multi_gpu)]
)
def test_peer_killed_mid_transfer_fails_within_the_deadline(devices):
    """A read queued behind a 3 s kernel is in flight for sure when the peer is SIGKILLed: it must end FAILED
    (TransferError caused by the lost peer) well before its deadline, and the survivor's GPU keeps working."""
    import cupy

    from kvxfer.backends.cuda_ipc import CudaIpcBackend

    nbytes = 256 << 20
    remote = Remote(devices[1], "legacy", nbytes=nbytes, seed=11)
    backend = CudaIpcBackend("kernel")
    try:
        with kvxfer.Agent("survivor", backends=[backend], timeouts=kvxfer.Timeouts(transfer=10)) as agent:
            with cupy.cuda.Device(devices[0]):
                cache = cupy.zeros(nbytes, dtype=cupy.uint8)
            region = agent.register(cache, name="kv")
            peer = agent.connect(remote.ask("meta"))
            offsets = np.random.default_rng(0).permutation(nbytes // 4096) * 4096
            plan = agent.plan(
                Descs.from_ranges(region, offsets, 4096), peer, Descs.from_ranges(peer.region("kv"), offsets, 4096)
            )
            agent.read(plan).wait(timeout=30)  # warm: peer memory mapped, tables uploaded
            spin_stream(cupy, devices[0], backend._stream(devices[0]), 3.0)
            handle = agent.read(plan, notify=b"late")
            os.kill(remote.process.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(TransferError) as failure:
                handle.wait(timeout=15)
            elapsed = time.monotonic() - started
            assert handle.state is TransferState.FAILED
            assert isinstance(failure.value.__cause__, PeerDisconnectedError), repr(failure.value.__cause__)
            assert elapsed < 10, elapsed  # within the transfer deadline: it ended with the spin, ~3 s
            assert not peer.connected
            with pytest.raises((PeerDisconnectedError, kvxfer.UsageError)):
                agent.read(plan)
            with cupy.cuda.Device(devices[0]):  # the survivor's GPU context still works
                assert int(cupy.arange(10).sum()) == 45
    finally:
        remote.process.join(5)


@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize(
    "devices", [pytest.param((0, 0), marks=pytest.mark.gpu), pytest.param((0, 1), marks=pytest.mark.multi_gpu)]
)
def test_notification_is_delivered_only_after_the_data(devices, early):
    """A write queued behind a 1.5 s kernel: its notification (sent with the launch when ``early``; the peer waits
    on our event, on its own GPU in the two-GPU case) must not be delivered while the kernel runs, and once
    delivered the bytes are there."""
    import cupy

    from kvxfer.backends.cuda_ipc import CudaIpcBackend

    remote = Remote(devices[1], "legacy", seed=5)
    backend = CudaIpcBackend("kernel", early_notify=early)
    try:
        with kvxfer.Agent("sender", backends=[backend]) as agent:
            cache = local_cache(devices[0])
            with cupy.cuda.Device(devices[0]):
                cache[:] = cupy.random.default_rng(9).integers(1, 256, SPEC.nbytes, dtype=cupy.uint8)
            region = agent.register(cache, name="kv")
            peer = agent.connect(remote.ask("meta"))
            ids = np.random.default_rng(2).permutation(64)[:16]
            plan = agent.plan(
                Descs.from_blocks(region, SPEC, ids), peer, Descs.from_blocks(peer.region("kv"), SPEC, ids)
            )
            agent.write(plan).wait(timeout=30)  # warm
            spin_stream(cupy, devices[0], backend._stream(devices[0]), 1.5)
            handle = agent.write(plan, notify=b"landed")
            assert remote.ask("notes", 0.5) == [], "delivered while the copy was still queued"
            assert handle.state is TransferState.PENDING
            assert remote.ask("notes", 10) == [b"landed"]
            assert block_bytes(remote.ask("bytes", 0, SPEC.nbytes), ids) == block_bytes(cache.get().tobytes(), ids)
            handle.wait(timeout=10)
            assert handle.state is TransferState.DONE
    finally:
        remote.close()


@pytest.mark.gpu
def test_sender_killed_before_its_data_lands_delivers_no_notification():
    """The peer writes to us behind a 3 s kernel with an early notification, then is SIGKILLed: we never deliver
    that notification, learn the peer is gone, and keep working."""
    import cupy

    remote = Remote(0, "legacy", seed=13)
    try:
        with kvxfer.Agent("receiver", backends=["cuda_ipc"]) as agent:
            region = agent.register(local_cache(0), name="kv")
            peer = agent.connect(remote.ask("meta"))
            remote.ask("connect", agent.metadata())
            offsets = np.arange(32) * 8192
            remote.ask("spin_write", 3.0, offsets, 4096, b"never")
            os.kill(remote.process.pid, signal.SIGKILL)
            assert agent.notifications(timeout=5) == []
            deadline = time.monotonic() + 10
            while peer.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not peer.connected
            assert region.nbytes == SPEC.nbytes and int(cupy.arange(10).sum()) == 45
    finally:
        remote.process.join(5)
