"""A peer agent in its own process, driven over a multiprocessing pipe (for two-process GPU tests)."""

from __future__ import annotations

import hashlib

SPIN = r"""
extern "C" __global__ void spin(unsigned long long nanoseconds) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < nanoseconds);
}
"""


def spin_stream(cupy, device: int, stream, seconds: float) -> None:
    """Queue a kernel that keeps ``stream`` busy for ``seconds``."""
    import numpy as np

    with cupy.cuda.Device(device):
        cupy.RawKernel(SPIN, "spin")((1,), (1,), (np.uint64(int(seconds * 1e9)),), stream=stream)


def serve(conn, backend: str, device: int, nbytes: int, memory: str, seed: int) -> None:
    """Register ``nbytes`` of random device memory as "kv" on ``device`` and answer commands until "exit".

    memory: "legacy" (cupy/cudaMalloc), "vmm" (cuMemCreate with a POSIX fd handle type), or "torch-vmm" (a torch
    tensor from the caching allocator with expandable segments, i.e. several VMM chunks behind one region).
    Commands: ("meta",) -> metadata; ("connect", meta) -> None; ("digest", offset, size) -> sha256 hex;
    ("bytes", offset, size) -> bytes; ("notes", timeout) -> [payload]; ("spin_write", seconds, offsets, size,
    notify) -> None: write those ranges of ours to the same ranges of the connected peer's "kv", queued behind a
    kernel that keeps the stream busy ``seconds``; ("exit",).
    """
    import os

    if memory == "torch-vmm":  # must be set before torch initialises CUDA
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import cupy

    import kvxfer
    from kvxfer.backends.cuda_ipc import VmmAllocation

    cupy.cuda.Device(device).use()
    if memory == "torch-vmm":
        import torch

        torch.cuda.set_device(device)
        # 17 MiB first: the tensor then starts mid-chunk and crosses the 20 MiB mapping boundary (two VMM chunks)
        spacer = torch.empty(17 << 20, dtype=torch.uint8, device=f"cuda:{device}")
        tensor = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
        region = kvxfer.Region.from_array(tensor)
        region.owner = (tensor, spacer)
        view = cupy.asarray(tensor)
    elif memory == "vmm":
        allocation = VmmAllocation(nbytes, device)
        region = kvxfer.Region.from_ptr(allocation.ptr, nbytes, "cuda", device, owner=allocation)
        view = cupy.ndarray(
            (nbytes,),
            cupy.uint8,
            cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(allocation.ptr, nbytes, allocation), 0),
        )
    else:
        view = cupy.empty(nbytes, dtype=cupy.uint8)
        region = view
    view[:] = cupy.random.default_rng(seed).integers(1, 256, nbytes, dtype=cupy.uint8)
    cupy.cuda.Device(device).synchronize()
    with kvxfer.Agent(f"peer-{seed}", backends=[backend]) as agent:
        mine, peer = agent.register(region, name="kv"), None
        while True:
            command, *args = conn.recv()
            if command == "exit":
                break
            if command == "meta":
                conn.send(agent.metadata())
            elif command == "connect":
                peer = agent.connect(args[0])
                conn.send(None)
            elif command == "spin_write":
                seconds, offsets, size, notify = args
                plan = agent.plan(
                    kvxfer.Descs.from_ranges(mine, offsets, size),
                    peer,
                    kvxfer.Descs.from_ranges(peer.region("kv"), offsets, size),
                )
                agent.write(plan).wait(30)  # warm: mapped, tables up
                spin_stream(cupy, device, plan.backend._stream(device), seconds)
                agent.write(plan, notify=notify)
                conn.send(None)
            elif command == "digest":
                offset, size = args
                conn.send(hashlib.sha256(view[offset : offset + size].get().tobytes()).hexdigest())
            elif command == "bytes":
                offset, size = args
                conn.send(view[offset : offset + size].get().tobytes())
            elif command == "notes":
                conn.send([n.payload for n in agent.notifications(timeout=args[0])])
    conn.send("bye")
