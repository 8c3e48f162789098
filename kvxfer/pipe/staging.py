"""The pipe's staging buffers: registered scratch regions for the staged strategy, pooled between requests.

A staging buffer holds one route's fragments laid out exactly as the peer cuts them ([layers, blocks, parts,
in-box order] of the peer's block size and head slice), so a staged transfer is plain descriptor pairs and all
re-tiling happens in one local kernel.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from ..memory import Region
from ..spec import KVCacheSpec, KVLayout

if TYPE_CHECKING:
    from ..agent import Agent

_MIN_STAGING = 1 << 20


class StagingPool:
    """Staging regions of one pipe, registered with ``agent`` on ``device`` (-1: host memory); sizes are powers of
    two of at least 1 MiB, and a buffer is reused by any request that fits."""

    def __init__(self, agent: Agent, device: int) -> None:
        self.agent, self.device = agent, device
        self._lock = threading.Lock()
        self._free: list[Region] = []
        self._all: list[Region] = []

    def acquire(self, nbytes: int) -> Region:
        """A registered buffer of at least ``nbytes`` bytes, taken from the pool or newly allocated."""
        with self._lock:
            for region in sorted(self._free, key=lambda r: r.nbytes):
                if region.nbytes >= nbytes:
                    self._free.remove(region)
                    return region
        size = max(_MIN_STAGING, 1 << (nbytes - 1).bit_length())
        if self.device >= 0:
            from ..devices import cupy_module

            cupy = cupy_module()
            with cupy.cuda.Device(self.device):
                array = cupy.empty(size, dtype=cupy.uint8)
        else:
            array = np.empty(size, dtype=np.uint8)
        region = self.agent.register(array, name=f"kvxfer-staging-{id(self):x}-{len(self._all)}")
        with self._lock:
            self._all.append(region)
        return region

    def give_back(self, regions: list[Region]) -> None:
        """Return buffers of a finished request to the pool."""
        with self._lock:
            for region in regions:
                if region not in self._free:
                    self._free.append(region)

    def close(self) -> None:
        """Deregister every buffer (the agent may already be closed: then it released them)."""
        for region in self._all:
            if region.registered and not self.agent.closed:
                self.agent.deregister(region, timeout=self.agent.timeouts.close)
        self._all, self._free = [], []


def staging_spec_for(remote: KVCacheSpec, heads: tuple[int, int], num_blocks: int, num_layers: int) -> KVCacheSpec:
    """A contiguous buffer holding a peer's fragments of ``heads`` for ``num_blocks`` blocks and ``num_layers``
    layers, in the peer's own order: [layers, blocks, parts, heads x tokens in the peer's in-box order, dim]."""
    _, _, _, s_head, s_token, _ = remote.element_strides
    count = heads[1] - heads[0]
    return KVCacheSpec(
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_size=remote.block_size,
        num_kv_heads=count,
        head_dim=remote.head_dim,
        dtype=remote.dtype,
        layout=KVLayout.HND if s_head > s_token else KVLayout.NHD,
        num_kv_parts=remote.num_kv_parts,
        model=remote.model,
        total_kv_heads=count,
    )
