"""KVPipe: one engine rank's KV cache <-> its peer ranks' caches, across TP sizes, block sizes and layouts.

Per rank pair (a route, :mod:`kvxfer.pipe.route`) the pipe picks how bytes move: "kernel" (one launch over
mapped peer memory), "direct" (descriptor pairs) or "staged" (a staging buffer and a local re-tile). The choice
and its reason are in ``pipe.routes`` (and ``handle.strategy``); ``strategy=`` forces one.

A pull walks down, never back: :meth:`KVPipe.pull` builds a :class:`PipeRequest`, whose routes' steps come from
:class:`Strategies` (kernel launches through the :class:`Launcher`, transfers through the agent, buffers from the
:class:`StagingPool`); the :class:`PipeHandle` polls the steps and runs the request's end work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from ..agent import Agent
from ..backends.base import Op
from ..control import MAX_KEY
from ..errors import ConfigError, DescriptorError, RegistrationError
from ..memory import MemoryKind, Region
from ..peer import Peer
from ..spec import KVCacheSpec, as_index_array, has_repeats, index_array_and_repeats, selection_ids
from . import checksum
from .checksum import Checksums
from .handle import LayerStream, PipeHandle
from .launcher import Launcher
from .layer_board import LayerBoard, announce
from .lease import Leases
from .ranks import HeadRoute, route_heads
from .request import PipeRequest, decode_expected
from .route import BlockIds, Layers, Route, Strategy, choose_route
from .staging import StagingPool
from .strategies import Strategies
from .watcher import Watcher

logger = logging.getLogger("kvxfer")

#: the strategies ``KVPipe(strategy=...)`` accepts
STRATEGIES = tuple(s.value for s in Strategy)


class KVPipe:
    """Moves requests' KV blocks between ``agent``'s cache (registered as ``local_region``, laid out by
    ``local_spec``) and the caches of one or more peer ranks (``peer``/``remote_spec``: one each, or sequences of
    equal length, e.g. every prefill rank of a TP group). ``strategy``: a :class:`Strategy` or its name.
    """

    def __init__(
        self,
        agent: Agent,
        local_spec: KVCacheSpec,
        peer: Peer | str | Sequence[Peer | str],
        remote_spec: KVCacheSpec | Sequence[KVCacheSpec],
        *,
        local_region: str = "kv",
        remote_region: str = "kv",
        strategy: Strategy | str = "auto",
    ) -> None:
        wanted = Strategy.parse(strategy)
        peers = [peer] if isinstance(peer, (Peer, str)) else list(peer)
        specs = [remote_spec] if isinstance(remote_spec, KVCacheSpec) else list(remote_spec)
        if len(peers) != len(specs) or not peers:
            raise ConfigError(f"give one remote_spec per peer: got {len(peers)} peers and {len(specs)} specs")
        self.agent, self.spec = agent, local_spec
        self.region = _local_region(agent, local_region)
        local_spec.check_fits(self.region.nbytes, argument=f"region {local_region!r}")
        local_spec.check_itemsize(self.region.itemsize, "local_spec", f"region {local_region!r}")
        self.device = self.region.device if self.region.kind is MemoryKind.CUDA else -1
        self.routes = [
            self._route(head, agent.peer(peers[head.remote]), specs[head.remote], remote_region, wanted)
            for head in route_heads(local_spec, specs)
        ]
        # A push must fill every replica of a replicated head; a pull reads one of them.
        self.write_routes = [
            self._route(head, agent.peer(peers[head.remote]), specs[head.remote], remote_region, wanted)
            for head in route_heads(local_spec, specs, every_replica=True)
        ]
        # per-request checks reuse these: every layer (read-only), the fewest blocks of a peer per direction
        self._all_layers = np.arange(local_spec.num_layers, dtype=np.int64)
        self._all_layers.setflags(write=False)
        self._fewest_blocks = {
            Op.READ: min(r.spec.num_blocks for r in self.routes),
            Op.WRITE: min(r.spec.num_blocks for r in self.write_routes),
        }
        self._strategy_names = self.strategy  # routes are fixed from here on
        self._launcher = Launcher(self.device)
        self._staging = StagingPool(agent, self.device)
        self._strategies = Strategies(agent, self.region, local_spec, self._launcher, self._staging)
        self._watcher = Watcher()
        for route in self.routes:
            logger.info(
                "pipe %s <- %s heads %s: %s (%s)",
                agent.name,
                route.peer.name,
                route.heads.global_heads,
                route.strategy,
                route.reason,
            )

    def _route(self, heads: HeadRoute, peer: Peer, spec: KVCacheSpec, region_name: str, wanted: Strategy) -> Route:
        region = peer.region(region_name)
        spec.check_fits(region.nbytes, argument=f"peer {peer.name!r} region {region_name!r}")
        backend = self.agent.backend_for(peer, {self.region.kind}, {region.kind})
        return choose_route(heads, self.region, self.spec, self.device, peer, spec, region, backend, wanted)

    @property
    def gpu_addressing(self) -> bool:
        """True: kernel routes on a GPU upload a request's block ids and the kernel derives every fragment's address
        from them and the two specs; False (the default unless ``KVXFER_PIPE_GPU_ADDRESSING=1``, until the block-id
        kernel has run on a GPU): the host builds fragment tables per request and uploads those (also the route for
        specs the block-id kernel does not cover)."""
        return self._strategies.gpu_addressing

    @gpu_addressing.setter
    def gpu_addressing(self, value: bool) -> None:
        self._strategies.gpu_addressing = bool(value)

    @property
    def strategy(self) -> str:
        """The routes' strategies, e.g. "kernel" or "direct+staged"."""
        return "+".join(sorted({r.strategy.value for r in self.routes}))

    # ---- requests ----------------------------------------------------------------------------------------------

    def pull(
        self,
        local_block_ids: BlockIds,
        remote_block_ids: BlockIds,
        notify: bytes | None = None,
        *,
        num_tokens: int | None = None,
        layers: Layers = None,
        timeout: float | None = None,
        lease: bytes | None = None,
        renew_every: float = 1.0,
        expected: Mapping[str, Checksums | bytes] | None = None,
        stream_layers: bool = False,
        stream_key: bytes | None = None,
    ) -> PipeHandle:
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
        return self._request(
            Op.READ,
            local_block_ids,
            remote_block_ids,
            notify,
            num_tokens,
            layers,
            timeout,
            stream_layers,
            lease=lease,
            renew_every=renew_every,
            expected=expected,
            stream_key=stream_key,
        )

    def push(
        self,
        local_block_ids: BlockIds,
        remote_block_ids: BlockIds,
        notify: bytes | None = None,
        *,
        num_tokens: int | None = None,
        layers: Layers = None,
        timeout: float | None = None,
        stream_layers: bool = False,
    ) -> PipeHandle:
        """Write local blocks into the peers' blocks. With ``stream_layers``, nothing moves until
        ``handle.ready(layers)`` says which layers are computed; the request ends when every layer was readied."""
        return self._request(
            Op.WRITE, local_block_ids, remote_block_ids, notify, num_tokens, layers, timeout, stream_layers
        )

    def _request(
        self,
        op: Op,
        local_ids: BlockIds,
        remote_ids: BlockIds,
        notify: bytes | None,
        num_tokens: int | None,
        layers: Layers,
        timeout: float | None,
        stream_layers: bool = False,
        lease: bytes | None = None,
        renew_every: float = 1.0,
        expected: Mapping[str, Checksums | bytes] | None = None,
        stream_key: bytes | None = None,
    ) -> PipeHandle:
        if notify is not None and not isinstance(notify, (bytes, bytearray)):
            raise ConfigError(f"notify must be bytes or None, got {type(notify).__name__}")
        if op is Op.READ:  # the written side: its repeat check comes from the same sort (raised further down)
            local_ids, local_repeats = index_array_and_repeats(local_ids, "local_block_ids", self.spec.num_blocks)
        else:
            local_ids = as_index_array(local_ids, "local_block_ids", self.spec.num_blocks)
        if layers is None:
            layer_ids = self._all_layers
        else:
            layer_ids = as_index_array(selection_ids(layers, self.spec.num_layers), "layers", self.spec.num_layers)
            if has_repeats(layer_ids, self.spec.num_layers):
                raise DescriptorError("layers must not repeat")
        routes = self.routes if op is Op.READ else self.write_routes
        remote, tokens = self._remote_ids(remote_ids, local_ids, routes, self._fewest_blocks[op], num_tokens)
        if op is Op.READ and local_repeats:
            raise DescriptorError("local_block_ids must not repeat (they are written)")
        if op is Op.WRITE and has_repeats(remote, int(remote.max()) + 1 if remote.size else 0):
            raise DescriptorError("remote_block_ids must not repeat (they are written)")
        nbytes = sum(self._route_nbytes(r, t, len(layer_ids)) for r, t in zip(routes, tokens, strict=True))
        limit = self.agent.timeouts.transfer if timeout is None else timeout
        request = PipeRequest(
            op,
            local_ids,
            remote,
            tokens,
            notify,
            layer_ids,
            routes,
            self._strategies,
            decode_expected(expected),
            lease,
            stream_key,
        )
        if stream_key is not None and stream_key in LayerBoard.of(self.agent).listened:
            raise ConfigError(f"a pull already streams request key {stream_key!r}")
        steps = [] if stream_layers else request.steps(layer_ids)
        if lease is not None:
            steps.append(Leases.of(self.agent).hold(lease, request.peers, renew_every))
        deadline = time.monotonic() + limit
        handle: PipeHandle
        if stream_layers:
            handle = LayerStream(request, steps, deadline, limit, self._strategy_names, nbytes)
        else:
            handle = PipeHandle(steps, deadline, limit, self._strategy_names, nbytes, request)
        self._watcher.watch(handle)
        if stream_key is not None and isinstance(handle, LayerStream):
            try:
                LayerBoard.of(self.agent).listen(stream_key, request.peers, handle.announced)
            except ConfigError:  # another pull took the key meanwhile
                handle.release()
                raise
        return handle

    def _remote_ids(
        self, remote_ids: BlockIds, local_ids: np.ndarray, routes: list[Route], fewest: int, num_tokens: int | None
    ) -> tuple[np.ndarray, list[int]]:
        """The remote ids as int64[m] (checked against every route's peer cache) and each route's token count.

        One conversion checked against the smallest peer cache; when that fails, the checks run route by route in
        their usual order, so the error raised names the same route and bound as ever."""
        try:
            remote = as_index_array(remote_ids, "remote_block_ids", fewest)
        except DescriptorError:
            for route in routes:
                checked = as_index_array(remote_ids, "remote_block_ids", route.spec.num_blocks)
                self._tokens(local_ids, checked, route, num_tokens)
            raise
        return remote, [self._tokens(local_ids, remote, route, num_tokens) for route in routes]

    def _tokens(self, local_ids: np.ndarray, remote_ids: np.ndarray, route: Route, num_tokens: int | None) -> int:
        capacity = min(len(local_ids) * self.spec.block_size, len(remote_ids) * route.spec.block_size)
        tokens = capacity if num_tokens is None else int(num_tokens)
        for ids, spec, side in ((local_ids, self.spec, "local"), (remote_ids, route.spec, "remote")):
            if len(ids) != -(-tokens // spec.block_size):
                raise DescriptorError(
                    f"{side}_block_ids: {tokens} tokens in blocks of {spec.block_size} need "
                    f"{-(-tokens // spec.block_size)} ids, got {len(ids)}"
                )
        return tokens

    def _route_nbytes(self, route: Route, tokens: int, layers: int) -> int:
        per_token = route.heads.num_heads * self.spec.head_dim * self.spec.itemsize * self.spec.num_kv_parts
        return per_token * tokens * layers

    def announce(self, peer: Peer | str | Sequence[Peer | str], request_key: bytes, layers: Layers) -> None:
        """Prefill side of a streamed pull: tell ``peer`` (one or several) that ``layers`` (an id, ids or a range)
        of the request its pull streams as ``request_key`` are computed."""
        ids = as_index_array(selection_ids(layers, self.spec.num_layers), "layers", self.spec.num_layers)
        for one in [peer] if isinstance(peer, (Peer, str)) else list(peer):
            announce(self.agent, one, request_key, ids.tolist())

    def checksums(self, block_ids: BlockIds, *, num_tokens: int | None = None, layers: Layers = None) -> Checksums:
        """Checksums of this rank's blocks (all its heads), for a receiver's ``pull(..., expected=...)``."""
        ids = as_index_array(block_ids, "block_ids", self.spec.num_blocks)
        return checksum.compute(self.region, self.spec, ids, num_tokens=num_tokens, layers=layers)

    def close(self) -> None:
        """Stop the watcher, deregister staging buffers, stop the host copy thread."""
        self._watcher.close()
        self._launcher.close()
        self._staging.close()


def _local_region(agent: Agent, name: str) -> Region:
    for region in agent.regions:
        if region.name == name:
            return region
    raise RegistrationError(f"agent {agent.name!r} has no region named {name!r}; register the KV cache first")
