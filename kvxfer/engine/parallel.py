"""Tensor parallelism over ``torch.distributed``: which slice of the heads a rank holds, and the all-reduce."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a tensor-parallel group of ``size`` ranks (``group`` None: the default group).

    Query heads and MLP columns are split evenly. KV heads are split evenly when ``size <= num_kv_heads``;
    otherwise each rank holds one KV head, replicated over ``size // num_kv_heads`` consecutive ranks (the same
    rule as :meth:`kvxfer.KVCacheSpec.head_range`).
    """

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"TensorParallel: rank must lie in [0, size={self.size}), got rank={self.rank}")

    def split(self, total: int, what: str) -> tuple[int, int]:
        """This rank's even share ``[start, end)`` of ``total`` items."""
        if total % self.size:
            raise ConfigError(f"tensor parallel size {self.size} must divide {what}={total}")
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share

    def kv_head_range(self, num_kv_heads: int) -> tuple[int, int]:
        """The model's KV heads ``[h0, h1)`` this rank holds."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads, "num_kv_heads")
        if self.size % num_kv_heads:
            raise ConfigError(
                f"tensor parallel size {self.size} > num_kv_heads={num_kv_heads} must be a multiple "
                f"of it (each KV head is replicated on size/num_kv_heads ranks)"
            )
        head = self.rank // (self.size // num_kv_heads)
        return head, head + 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place (a no-op for one rank); returns it."""
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor


def init_tensor_parallel(
    rank: int, size: int, init_method: str, *, backend: str | None = None, timeout_s: float = 120.0
) -> TensorParallel:
    """Join a new default process group (gloo on CPU, NCCL when CUDA is available) and describe this rank.

    ``init_method`` is a torch.distributed URL ("tcp://127.0.0.1:29500", "file:///tmp/store"). Prefill and decode
    engines are separate process groups, so their TP sizes are chosen independently.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return TensorParallel(rank=rank, size=size)
