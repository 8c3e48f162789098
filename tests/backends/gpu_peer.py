"""A peer agent in its own process, driven over a multiprocessing pipe (for two-process GPU tests)."""

from __future__ import annotations

import hashlib


def serve(conn, backend: str, device: int, nbytes: int, memory: str, seed: int) -> None:
    """Register ``nbytes`` of random device memory as "kv" on ``device`` and answer commands until "exit".

    memory: "legacy" (cupy/cudaMalloc), "vmm" (cuMemCreate with a POSIX fd handle type), or "torch-vmm" (a torch
    tensor from the caching allocator with expandable segments, i.e. several VMM chunks behind one region).
    Commands: ("meta",) -> metadata; ("connect", meta) -> None; ("digest", offset, size) -> sha256 hex;
    ("bytes", offset, size) -> bytes; ("notes", timeout) -> [payload]; ("exit",).
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
        view = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(
            cupy.cuda.UnownedMemory(allocation.ptr, nbytes, allocation), 0))
    else:
        view = cupy.empty(nbytes, dtype=cupy.uint8)
        region = view
    view[:] = cupy.random.default_rng(seed).integers(1, 256, nbytes, dtype=cupy.uint8)
    cupy.cuda.Device(device).synchronize()
    with kvxfer.Agent(f"peer-{seed}", backends=[backend]) as agent:
        agent.register(region, name="kv")
        while True:
            command, *args = conn.recv()
            if command == "exit":
                break
            if command == "meta":
                conn.send(agent.metadata())
            elif command == "connect":
                agent.connect(args[0])
                conn.send(None)
            elif command == "digest":
                offset, size = args
                conn.send(hashlib.sha256(view[offset:offset + size].get().tobytes()).hexdigest())
            elif command == "bytes":
                offset, size = args
                conn.send(view[offset:offset + size].get().tobytes())
            elif command == "notes":
                conn.send([n.payload for n in agent.notifications(timeout=args[0])])
    conn.send("bye")
