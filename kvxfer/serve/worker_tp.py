"""Tensor-parallel workers: ``--tp N`` runs N rank processes over torch.distributed (gloo on CPU, NCCL on GPUs).

The process the launcher started is rank 0, the leader: it alone talks to the router. It spawns ranks 1..N-1
(followers) before building its engine, since every rank must join the process group. Each rank owns its model
shard, engine, agent (named ``<name>`` on rank 0, ``<name>.r<rank>`` elsewhere) and connector; ``register``
carries every rank's RankInfo. Each loop iteration the leader broadcasts the messages it took from the router, its
clock and whether to stop (a gloo group of its own, also under NCCL), and every rank then makes the same engine and
connector calls in the same order (the engines' TP contract). On GPUs rank r uses ``cuda:<N + r>`` for
``--device cuda:N``. A follower whose leader is gone exits.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("kvxfer.serve")

INIT_TIMEOUT_S = 120.0


def rank_device(device: str, rank: int) -> str:
    """The device of TP rank ``rank`` for ``--device``: cpu, or the rank-th GPU from cuda:N on."""
    if device.startswith("cuda"):
        base = int(device.split(":", 1)[1]) if ":" in device else 0
        return f"cuda:{base + rank}"
    return device


def join_group(rank: int, size: int, init_method: str, device: str) -> tuple[Any, Any]:
    """Join the TP process group; returns (TensorParallel, the gloo group the leader broadcasts on)."""
    import torch
    import torch.distributed as dist

    from ..engine import init_tensor_parallel

    backend = "nccl" if device.startswith("cuda") else "gloo"
    tp = init_tensor_parallel(rank, size, init_method, backend=backend, timeout_s=INIT_TIMEOUT_S)
    if backend == "nccl":
        torch.cuda.set_device(torch.device(rank_device(device, rank)))
    control = dist.new_group(backend="gloo")
    return tp, control


def make_sync(group: Any) -> Any:
    """The loop's ``sync``: the leader's (messages, clock, stop) on every rank."""
    import torch.distributed as dist

    def sync(messages: list[Any], now: float, stop: bool) -> tuple[list[Any], float, bool]:
        box: list[Any] = [messages, now, stop]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0], float(box[1]), bool(box[2])

    return sync


def gather_rank_info(info: bytes, size: int) -> tuple[bytes, ...]:
    """Every rank's encoded RankInfo, in rank order (collective)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, info)
    return tuple(gathered)


def spawn_followers(args: argparse.Namespace) -> tuple[str, list[Any], tempfile.TemporaryDirectory]:
    """Start ranks 1..tp-1; returns (the process group's init method, the processes, the store's directory)."""
    directory = tempfile.TemporaryDirectory(prefix="kvxfer-worker-tp-")
    init_method = f"file://{Path(directory.name) / 'store'}"
    context = multiprocessing.get_context("spawn")
    followers = [
        context.Process(
            target=follower_main,
            args=(rank, args, init_method, os.getpid()),
            name=f"kvxfer-worker-{args.name}-r{rank}",
            daemon=True,
        )
        for rank in range(1, args.tp)
    ]
    for process in followers:
        process.start()
    return init_method, followers, directory


def stop_followers(followers: list[Any], timeout: float = 30.0) -> None:
    """Wait for the followers to end (they stop with the leader's last broadcast), then terminate stragglers."""
    deadline = time.monotonic() + timeout
    for process in followers:
        process.join(max(deadline - time.monotonic(), 0.1))
        if process.is_alive():
            logger.warning("worker follower %s did not stop: terminating it", process.name)
            process.terminate()
            process.join(5.0)


def follower_main(rank: int, args: argparse.Namespace, init_method: str, leader_pid: int) -> None:
    """A follower rank: build the same objects as the leader, follow its broadcasts until it stops."""
    from .worker import Worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the leader decides when to drain and stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..tuning import keep_freed_memory

    keep_freed_memory()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    tp, control = join_group(rank, args.tp, init_method, args.device)
    worker = Worker(args, rank, tp, control)
    worker.loop.start()
    try:
        while worker.loop.alive:
            if os.getppid() != leader_pid:  # the leader died without a last broadcast
                logger.error("worker %s rank %d: the leader is gone; exiting", worker.name, rank)
                os._exit(1)
            worker.loop.join(0.5)
    finally:
        worker.close()
