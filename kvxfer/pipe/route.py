"""Routes: how one pipe rank exchanges a head range with one peer rank, and which strategy moves the bytes.

Per rank pair (a route) the pipe picks how bytes move:
- "kernel": the backend maps the peer's memory here (same process; CUDA IPC over NVLink): one launch reads the
  peer's blocks and writes ours in place, re-tiling heads, block size and layout on the way (on a GPU the kernel
  derives every fragment's address from the request's block ids, kernels/id_copy.py; for block sizes that do not
  divide one another, or with ``KVPipe.gpu_addressing = False``, it walks tables built on the host);
- "direct": both caches cut the route's heads into the same fragments: one backend transfer of descriptor pairs
  (a partly filled last block goes row by row, so nothing past ``num_tokens`` is written);
- "staged": otherwise: the peer's fragments travel into a local staging buffer laid out like them, and a local
  kernel re-tiles from there (push: the reverse).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..backends.base import Backend, MapsPeerMemory
from ..errors import ConfigError
from ..memory import Region, RemoteRegion
from ..peer import Peer
from ..spec import KVCacheSpec
from .ranks import HeadRoute

#: block ids: int[n] on the host (a sequence of ints or an integer array)
BlockIds = Sequence[int] | np.ndarray
#: layers: one id, ids, a range or a slice; None: every layer
Layers = int | Sequence[int] | np.ndarray | range | slice | None


class Strategy(str, Enum):
    """How a route moves its bytes (AUTO: let the pipe choose). Equal to its string value ("kernel", ...)."""

    AUTO = "auto"
    KERNEL = "kernel"
    DIRECT = "direct"
    STAGED = "staged"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: Strategy | str) -> Strategy:
        """``value`` as a Strategy; ConfigError for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"strategy must be one of {[s.value for s in cls]}, got {value!r}") from None


@dataclass(frozen=True)
class Route:
    """How this rank exchanges ``heads`` with one peer rank."""

    heads: HeadRoute
    peer: Peer
    spec: KVCacheSpec
    region: RemoteRegion
    backend: Backend
    strategy: Strategy
    reason: str
    mapped: int | None  # where the peer region starts in this process (kernel strategy), else None


def choose_route(
    heads: HeadRoute,
    local: Region,
    local_spec: KVCacheSpec,
    device: int,
    peer: Peer,
    spec: KVCacheSpec,
    region: RemoteRegion,
    backend: Backend,
    wanted: Strategy,
) -> Route:
    """The route for ``heads`` between the local cache (``local``, laid out by ``local_spec``, on ``device``;
    -1: host) and ``peer``'s cache ``region`` (laid out by ``spec``) over ``backend``: ``wanted``, or with
    AUTO the fastest strategy that fits. ConfigError when a wanted strategy cannot work here."""
    mapped = None
    if isinstance(backend, MapsPeerMemory) and wanted in (Strategy.AUTO, Strategy.KERNEL):
        mapped = backend.map_remote(peer, region.index, device)
    direct = same_fragments(local_spec, heads.local_heads, spec, heads.remote_heads)
    if wanted is Strategy.KERNEL and mapped is None:
        raise ConfigError(
            f"strategy 'kernel' needs a backend that maps peer memory; {backend.caps.name} "
            f"cannot for peer {peer.name!r}"
        )
    if wanted is Strategy.DIRECT and not direct:
        raise ConfigError(
            f"strategy 'direct' needs the same fragments on both sides; the two caches cut heads "
            f"{heads.global_heads} differently (block size, layout or head slice; use 'staged')"
        )
    piece = spec.fragments(heads.remote_heads)[1]
    if wanted is not Strategy.AUTO:
        return Route(heads, peer, spec, region, backend, wanted, "requested", mapped)
    if mapped is not None and (device >= 0 or not direct):  # on the CPU a memcpy beats the reference
        return Route(
            heads,
            peer,
            spec,
            region,
            backend,
            Strategy.KERNEL,
            f"{backend.caps.name} maps peer memory: one launch moves and re-tiles every fragment",
            mapped,
        )
    if direct:
        return Route(
            heads, peer, spec, region, backend, Strategy.DIRECT, f"fragments of {piece} B match on both sides", None
        )
    return Route(
        heads,
        peer,
        spec,
        region,
        backend,
        Strategy.STAGED,
        f"block size or layout differ ({spec.block_size}/{spec.layout.value} there, "
        f"{local_spec.block_size}/{local_spec.layout.value} here): fragments of {piece} B re-tiled locally",
        None,
    )


def same_fragments(
    local: KVCacheSpec, local_heads: tuple[int, int], remote: KVCacheSpec, remote_heads: tuple[int, int]
) -> bool:
    """True when both sides cut the route's heads into identical pieces, in the same byte order."""
    if local.block_size != remote.block_size:
        return False
    local_offsets, local_piece = local.fragments(local_heads)
    remote_offsets, remote_piece = remote.fragments(remote_heads)
    if local_piece != remote_piece or len(local_offsets) != len(remote_offsets):
        return False
    heads = local_heads[1] - local_heads[0]
    return heads == 1 or local.block_size == 1 or _heads_outer(local) == _heads_outer(remote)


def _heads_outer(spec: KVCacheSpec) -> bool:
    _, _, _, head, token, _ = spec.element_strides
    return head > token


def peer_names(routes: list[Route]) -> list[str]:
    """The routes' peers, each once, in route order."""
    return list(dict.fromkeys(r.peer.name for r in routes))
