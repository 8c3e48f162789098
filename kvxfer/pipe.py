"""KVPipe: one engine rank's KV cache <-> its peer ranks' caches, across TP sizes, block sizes and layouts.

Per rank pair (a route) the pipe picks how bytes move:
- "kernel": the backend maps the peer's memory here (same process; CUDA IPC over NVLink): one launch reads the
  peer's blocks and writes ours in place, re-tiling heads, block size and layout on the way;
- "direct": both caches cut the route's heads into the same fragments: one backend transfer of descriptor pairs
  (a partly filled last block goes row by row, so nothing past ``num_tokens`` is written);
- "staged": otherwise: the peer's fragments travel into a local staging buffer laid out like them, and a local
  kernel re-tiles from there (push: the reverse).
The choice and its reason are in ``pipe.routes`` (and ``handle.strategy``); ``strategy=`` forces one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import checksum
from .agent import Agent
from .backends.base import Backend
from .checksum import Checksums
from .descs import Descs
from .errors import ConfigError, DescriptorError, RegistrationError
from .lease import Leases
from .memory import MemoryKind, Region, RemoteRegion
from .peer import Peer
from .pipe_work import MAX_KEY, LayerBoard, PipeWork, announce
from .ranks import HeadRoute, route_heads
from .spec import KVCacheSpec, as_index_array, has_repeats, selection_ids
from .steps import LayerStream, PipeHandle

logger = logging.getLogger("kvxfer")

STRATEGIES = ("auto", "kernel", "direct", "staged")


@dataclass(frozen=True)
class Route:
    """How this rank exchanges ``heads`` with one peer rank."""

    heads: HeadRoute
    peer: Peer
    spec: KVCacheSpec
    region: RemoteRegion
    backend: Backend
    strategy: str
    reason: str
    mapped: int | None  # where the peer region starts in this process (kernel strategy), else None


class KVPipe:
    """Moves requests' KV blocks between ``agent``'s cache (registered as ``local_region``, laid out by
    ``local_spec``) and the caches of one or more peer ranks (``peer``/``remote_spec``: one each, or sequences of
    equal length, e.g. every prefill rank of a TP group).
    """

    def __init__(self, agent: Agent, local_spec: KVCacheSpec, peer: Peer | str | Sequence[Peer | str],
                 remote_spec: KVCacheSpec | Sequence[KVCacheSpec], *, local_region: str = "kv",
                 remote_region: str = "kv", strategy: str = "auto") -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        peers = [peer] if isinstance(peer, (Peer, str)) else list(peer)
        specs = [remote_spec] if isinstance(remote_spec, KVCacheSpec) else list(remote_spec)
        if len(peers) != len(specs) or not peers:
            raise ConfigError(f"give one remote_spec per peer: got {len(peers)} peers and {len(specs)} specs")
        self.agent, self.spec = agent, local_spec
        self.region = _local_region(agent, local_region)
        local_spec.check_fits(self.region.nbytes, argument=f"region {local_region!r}")
        local_spec.check_itemsize(self.region.itemsize, "local_spec", f"region {local_region!r}")
        self.device = self.region.device if self.region.kind is MemoryKind.CUDA else -1
        self.routes = [self._route(head, agent.peer(peers[head.remote]), specs[head.remote], remote_region, strategy)
                       for head in route_heads(local_spec, specs)]
        # A push must fill every replica of a replicated head; a pull reads one of them.
        self.write_routes = [self._route(head, agent.peer(peers[head.remote]), specs[head.remote], remote_region,
                                         strategy) for head in route_heads(local_spec, specs, every_replica=True)]
        self._work = PipeWork(agent, self.region, self.device, local_spec)
        for route in self.routes:
            logger.info("pipe %s <- %s heads %s: %s (%s)", agent.name, route.peer.name, route.heads.global_heads,
                        route.strategy, route.reason)

    def _route(self, heads: HeadRoute, peer: Peer, spec: KVCacheSpec, region_name: str, wanted: str) -> Route:
        region = peer.region(region_name)
        spec.check_fits(region.nbytes, argument=f"peer {peer.name!r} region {region_name!r}")
        backend = self.agent._choose_backend(peer, {self.region.kind}, {region.kind})
        mapped = backend.map_remote(peer, region.index, self.device) if wanted in ("auto", "kernel") else None
        direct = _same_fragments(self.spec, heads.local_heads, spec, heads.remote_heads)
        if wanted == "kernel" and mapped is None:
            raise ConfigError(f"strategy 'kernel' needs a backend that maps peer memory; {backend.caps.name} "
                              f"cannot for peer {peer.name!r}")
        if wanted == "direct" and not direct:
            raise ConfigError(f"strategy 'direct' needs the same fragments on both sides; the two caches cut heads "
                              f"{heads.global_heads} differently (block size, layout or head slice; use 'staged')")
        piece = spec.fragments(heads.remote_heads)[1]
        if wanted != "auto":
            return Route(heads, peer, spec, region, backend, wanted, "requested", mapped)
        if mapped is not None and (self.device >= 0 or not direct):  # on the CPU a memcpy beats the reference
            return Route(heads, peer, spec, region, backend, "kernel",
                         f"{backend.caps.name} maps peer memory: one launch moves and re-tiles every fragment", mapped)
        if direct:
            return Route(heads, peer, spec, region, backend, "direct",
                         f"fragments of {piece} B match on both sides", None)
        return Route(heads, peer, spec, region, backend, "staged",
                     f"block size or layout differ ({spec.block_size}/{spec.layout.value} there, "
                     f"{self.spec.block_size}/{self.spec.layout.value} here): fragments of {piece} B re-tiled locally",
                     None)

    @property
    def strategy(self) -> str:
        """The routes' strategies, e.g. "kernel" or "direct+staged"."""
        return "+".join(sorted({r.strategy for r in self.routes}))

    # ---- requests ----------------------------------------------------------------------------------------------

    def pull(self, local_block_ids: Any, remote_block_ids: Any, notify: bytes | None = None, *,
             num_tokens: int | None = None, layers: Any = None, timeout: float | None = None,
             lease: bytes | None = None, renew_every: float = 1.0,
             expected: dict[str, Checksums | bytes] | None = None, stream_layers: bool = False,
             stream_key: bytes | None = None) -> PipeHandle:
        """Fill local blocks ``local_block_ids`` (int[n], host; sequence order) with the tokens of the peers'
        blocks ``remote_block_ids`` (int[m], host). ``notify`` reaches every peer of the request after the data.
        ``layers`` (ids or range) narrows the request; ``num_tokens`` defaults to what the blocks hold.
        ``lease``: the senders' lease key, renewed every ``renew_every`` s and released at the end; the transfer
        fails if a sender lets it expire. ``expected``: peer name -> that sender's :meth:`checksums`, verified
        after the data arrived (TransferError on mismatch). With ``stream_layers``, a layer moves once every peer
        of the request announced it ready for ``stream_key`` (:meth:`announce`); it ends when every layer moved."""
        if stream_layers != (stream_key is not None):
            raise ConfigError("a streamed pull needs both stream_layers=True and a stream_key")
        if stream_key is not None and (not isinstance(stream_key, bytes) or not 0 < len(stream_key) <= MAX_KEY):
            raise ConfigError(f"stream_key must be 1 to {MAX_KEY} bytes, got {stream_key!r}")
        return self._request("read", local_block_ids, remote_block_ids, notify, num_tokens, layers, timeout,
                             stream_layers, lease=lease, renew_every=renew_every, expected=expected,
                             stream_key=stream_key)

    def push(self, local_block_ids: Any, remote_block_ids: Any, notify: bytes | None = None, *,
             num_tokens: int | None = None, layers: Any = None, timeout: float | None = None,
             stream_layers: bool = False) -> PipeHandle:
        """Write local blocks into the peers' blocks. With ``stream_layers``, nothing moves until
        ``handle.ready(layers)`` says which layers are computed; the request ends when every layer was readied."""
        return self._request("write", local_block_ids, remote_block_ids, notify, num_tokens, layers, timeout,
                             stream_layers)

    def _request(self, op: str, local_ids: Any, remote_ids: Any, notify: bytes | None, num_tokens: int | None,
                 layers: Any, timeout: float | None, stream_layers: bool = False, lease: bytes | None = None,
                 renew_every: float = 1.0, expected: dict | None = None,
                 stream_key: bytes | None = None) -> PipeHandle:
        if notify is not None and not isinstance(notify, (bytes, bytearray)):
            raise ConfigError(f"notify must be bytes or None, got {type(notify).__name__}")
        local_ids = as_index_array(local_ids, "local_block_ids", self.spec.num_blocks)
        layer_ids = as_index_array(selection_ids(layers, self.spec.num_layers), "layers", self.spec.num_layers)
        if has_repeats(layer_ids, self.spec.num_layers):
            raise DescriptorError("layers must not repeat")
        routes = self.routes if op == "read" else self.write_routes
        tokens = [self._tokens(local_ids, as_index_array(remote_ids, "remote_block_ids", r.spec.num_blocks), r,
                               num_tokens) for r in routes]
        remote = as_index_array(remote_ids, "remote_block_ids", min(r.spec.num_blocks for r in routes))
        if op == "read" and has_repeats(local_ids, self.spec.num_blocks):
            raise DescriptorError("local_block_ids must not repeat (they are written)")
        if op == "write" and has_repeats(remote, int(remote.max()) + 1 if remote.size else 0):
            raise DescriptorError("remote_block_ids must not repeat (they are written)")
        nbytes = sum(self._route_nbytes(r, t, len(layer_ids)) for r, t in zip(routes, tokens))
        limit = self.agent.timeouts.transfer if timeout is None else timeout
        request = _Request(op, local_ids, remote, tokens, notify, layer_ids, routes, _decode_expected(expected), lease,
                           stream_key)
        if stream_key is not None and stream_key in LayerBoard.of(self.agent).listened:
            raise ConfigError(f"a pull already streams request key {stream_key!r}")
        steps = [] if stream_layers else [s for route, t in zip(routes, tokens)
                                          for s in self._work.steps(op, route, request.local, request.remote, t,
                                                                    layer_ids)]
        if lease is not None:
            steps.append(Leases.of(self.agent).hold(lease, _peer_names(routes), renew_every))
        if stream_layers:
            handle: PipeHandle = LayerStream(self, request, steps, time.monotonic() + limit, limit, nbytes)
        else:
            handle = PipeHandle(steps, time.monotonic() + limit, limit, self.strategy, nbytes,
                                on_done=lambda: self._finish(request), on_final=lambda h: self._final(request, h))
        self._work.watch(handle)
        if isinstance(handle, LayerStream) and stream_key is not None:
            try:
                LayerBoard.of(self.agent).listen(stream_key, _peer_names(routes), handle.announced)
            except ConfigError:  # another pull took the key meanwhile
                handle.release()
                raise
        return handle

    def _tokens(self, local_ids: np.ndarray, remote_ids: np.ndarray, route: Route, num_tokens: int | None) -> int:
        capacity = min(len(local_ids) * self.spec.block_size, len(remote_ids) * route.spec.block_size)
        tokens = capacity if num_tokens is None else int(num_tokens)
        for ids, spec, side in ((local_ids, self.spec, "local"), (remote_ids, route.spec, "remote")):
            if len(ids) != -(-tokens // spec.block_size):
                raise DescriptorError(f"{side}_block_ids: {tokens} tokens in blocks of {spec.block_size} need "
                                      f"{-(-tokens // spec.block_size)} ids, got {len(ids)}")
        return tokens

    def _route_nbytes(self, route: Route, tokens: int, layers: int) -> int:
        per_token = route.heads.num_heads * self.spec.head_dim * self.spec.itemsize * self.spec.num_kv_parts
        return per_token * tokens * layers

    def _finish(self, request: "_Request") -> None:
        for route, tokens in zip(request.routes, request.tokens):
            wanted = (request.expected or {}).get(route.peer.name)
            if wanted is not None:
                actual = checksum.compute(self.region, self.spec, request.local, num_tokens=tokens,
                                          unit_tokens=wanted.unit_tokens, heads=route.heads.local_heads,
                                          layers=request.layers)
                checksum.verify(wanted, actual, route.peer.name)
        if request.notify is not None:
            for name in _peer_names(request.routes):
                self.agent.notify(name, request.notify)

    def _final(self, request: "_Request", handle: PipeHandle) -> None:
        if request.stream_key is not None:
            LayerBoard.of(self.agent).forget(request.stream_key, getattr(handle, "announced", None))
        if request.lease is not None:
            Leases.of(self.agent).drop(request.lease, release=True)
        self._work.release_for(handle)

    def announce(self, peer: Peer | str | Sequence[Peer | str], request_key: bytes, layers: Any) -> None:
        """Prefill side of a streamed pull: tell ``peer`` (one or several) that ``layers`` (an id, ids or a range)
        of the request its pull streams as ``request_key`` are computed."""
        ids = as_index_array(selection_ids(layers, self.spec.num_layers), "layers", self.spec.num_layers)
        for one in [peer] if isinstance(peer, (Peer, str)) else list(peer):
            announce(self.agent, one, request_key, ids.tolist())

    def checksums(self, block_ids: Any, *, num_tokens: int | None = None, layers: Any = None) -> Checksums:
        """Checksums of this rank's blocks (all its heads), for a receiver's ``pull(..., expected=...)``."""
        ids = as_index_array(block_ids, "block_ids", self.spec.num_blocks)
        return checksum.compute(self.region, self.spec, ids, num_tokens=num_tokens, layers=layers)

    def close(self) -> None:
        """Deregister staging buffers and stop helper threads."""
        self._work.close()


@dataclass
class _Request:
    op: str
    local: np.ndarray
    remote: np.ndarray
    tokens: list[int]
    notify: bytes | None
    layers: np.ndarray
    routes: list[Route]
    expected: dict[str, Checksums] | None = None
    lease: bytes | None = None
    stream_key: bytes | None = None


def _peer_names(routes: list[Route]) -> list[str]:
    return list(dict.fromkeys(r.peer.name for r in routes))


def _decode_expected(expected: dict | None) -> dict[str, Checksums] | None:
    if expected is None:
        return None
    if not isinstance(expected, dict):
        raise ConfigError(f"expected must map peer names to Checksums, got {type(expected).__name__}")
    return {name: value if isinstance(value, Checksums) else Checksums.decode(value)
            for name, value in expected.items()}


StreamingPush = LayerStream  # its former name


def _local_region(agent: Agent, name: str) -> Region:
    for region in agent.regions:
        if region.name == name:
            return region
    raise RegistrationError(f"agent {agent.name!r} has no region named {name!r}; register the KV cache first")


def _same_fragments(local: KVCacheSpec, local_heads: tuple[int, int], remote: KVCacheSpec,
                    remote_heads: tuple[int, int]) -> bool:
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
