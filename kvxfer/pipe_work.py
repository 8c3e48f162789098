"""The work behind a KVPipe request: per-route steps for each strategy, staging buffers, streams, a watcher.

Staging buffers hold one route's fragments laid out exactly as the peer cuts them ([layers, blocks, parts,
in-box order] of the peer's block size and head slice), so a staged transfer is plain descriptor pairs and all
re-tiling happens in one local kernel.

:class:`LayerBoard` carries streamed pulls: the prefill side announces the layers of a request that are computed
(notifications prefixed ``b"kvx:layers:"``, msgpack ``[key, [layer ids]]``), the decode side moves a layer once
every peer it reads from announced it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import msgpack
import numpy as np

from . import kernels
from .descs import Descs
from .errors import ConfigError
from .handle import Notification
from .memory import MemoryKind, Region
from .spec import KVCacheSpec, KVLayout
from .steps import ChainStep, EventStep, FutureStep, PipeHandle, Step, TransferStep

if TYPE_CHECKING:
    from .agent import Agent
    from .pipe import Route

logger = logging.getLogger("kvxfer")
_MIN_STAGING = 1 << 20
PREFIX = b"kvx:layers:"
MAX_KEY = 1024  # bytes of a request key
MAX_LAYER = 1 << 16  # layer ids are below this
MAX_UNCLAIMED = 1024  # keys announced before their pull, buffered at most


class PipeWork:
    """Builds and runs the steps of one pipe's requests on its local cache ``region`` (device -1: host)."""

    def __init__(self, agent: "Agent", region: Region, device: int, spec: KVCacheSpec | None = None) -> None:
        self.agent, self.region, self.device = agent, region, device
        self.spec = spec
        self._lock = threading.Lock()
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._executor: ThreadPoolExecutor | None = None
        self._stream: Any = None
        self._watched: "weakref.WeakSet[PipeHandle]" = weakref.WeakSet()
        self._watcher: threading.Thread | None = None
        self._closed = False

    # ---- steps per strategy ------------------------------------------------------------------------------------

    def steps(self, op: str, route: "Route", local_ids: np.ndarray, remote_ids: np.ndarray, tokens: int,
              layers: np.ndarray) -> list[Step]:
        """The steps that move ``tokens`` tokens of ``layers`` for one route (op "read" or "write")."""
        assert self.spec is not None
        if route.strategy == "kernel":
            return [self._kernel(op, route, local_ids, remote_ids, tokens, layers)]
        if route.strategy == "direct":
            plan = self.agent.plan(*self._direct_descs(route, local_ids, remote_ids, tokens, layers))
            return [TransferStep(self.agent.read(plan) if op == "read" else self.agent.write(plan))]
        return [self._staged(op, route, local_ids, remote_ids, tokens, layers)]

    def _direct_descs(self, route: "Route", local_ids: np.ndarray, remote_ids: np.ndarray, tokens: int,
                      layers: np.ndarray) -> tuple[Descs, Any, Descs]:
        """Whole blocks as fragments, and a partly filled last block row by row (so nothing past ``tokens``
        is written)."""
        heads, full = route.heads, tokens // self.spec.block_size
        sides = [(self.region, self.spec, local_ids, heads.local_heads),
                 (route.region, route.spec, remote_ids, heads.remote_heads)]
        descs = []
        for region, spec, ids, head_range in sides:
            parts = [Descs.from_blocks(region, spec, ids[:full], layers=layers, heads=head_range)] if full else []
            if tokens % spec.block_size:
                offsets, row = spec.row_offsets(int(ids[full]), tokens % spec.block_size, layers=layers,
                                                heads=head_range)
                parts.append(Descs.from_ranges(region, offsets, row))
            descs.append(Descs.concat(parts))
        return descs[0], route.peer, descs[1]

    def _kernel(self, op: str, route: "Route", local_ids: np.ndarray, remote_ids: np.ndarray, tokens: int,
                layers: np.ndarray) -> Step:
        heads, here = route.heads, (self.region.addr, self.region.nbytes)
        there = (route.mapped, route.region.nbytes)
        if op == "read":
            plan = kernels.plan_kv_copy(route.spec, self.spec, remote_ids, local_ids, num_tokens=tokens,
                                        src_layers=layers, src_heads=heads.remote_heads, dst_heads=heads.local_heads)
            return self._launch(plan, there, here)
        plan = kernels.plan_kv_copy(self.spec, route.spec, local_ids, remote_ids, num_tokens=tokens,
                                    src_layers=layers, src_heads=heads.local_heads, dst_heads=heads.remote_heads)
        return self._launch(plan, here, there)

    def _staged(self, op: str, route: "Route", local_ids: np.ndarray, remote_ids: np.ndarray, tokens: int,
                layers: np.ndarray) -> Step:
        heads = route.heads
        stage_spec = staging_spec_for(route.spec, heads.remote_heads, len(remote_ids), len(layers))
        remote = Descs.from_blocks(route.region, route.spec, remote_ids, layers=layers, heads=heads.remote_heads)
        piece = int(remote.nbytes[0])
        if len(remote) * piece != stage_spec.nbytes:
            raise ConfigError(f"cannot stage peer {route.peer.name!r}: its fragments ({len(remote)} x {piece} B) do "
                              f"not tile a staging buffer of {stage_spec.nbytes} B")
        staging = self._acquire(stage_spec.nbytes)
        local = Descs.from_ranges(staging, np.arange(len(remote), dtype=np.int64) * piece, piece)
        plan = self.agent.plan(local, route.peer, remote)
        stage_ids, stage_layers = np.arange(len(remote_ids)), np.arange(len(layers))
        stage_heads = (0, heads.num_heads)
        here, buffer = (self.region.addr, self.region.nbytes), (staging.addr, staging.nbytes)
        if op == "read":
            retile = kernels.plan_kv_copy(stage_spec, self.spec, stage_ids, local_ids, num_tokens=tokens,
                                          src_layers=stage_layers, dst_layers=layers, src_heads=stage_heads,
                                          dst_heads=heads.local_heads)
            step = ChainStep(TransferStep(self.agent.read(plan)), lambda: self._launch(retile, buffer, here))
        else:
            gather = kernels.plan_kv_copy(self.spec, stage_spec, local_ids, stage_ids, num_tokens=tokens,
                                          src_layers=layers, dst_layers=stage_layers, src_heads=heads.local_heads,
                                          dst_heads=stage_heads)
            step = ChainStep(self._launch(gather, here, buffer), lambda: TransferStep(self.agent.write(plan)))
        step.staging = staging
        return step

    def _launch(self, plan: Any, source: tuple[int, int], target: tuple[int, int]) -> Step:
        if self.device >= 0:
            from .devices import cupy_module

            cupy = cupy_module()
            with cupy.cuda.Device(self.device):
                if self._stream is None:
                    self._stream = cupy.cuda.Stream(non_blocking=True)
                kernels.copy_kv_pointers(source[0], source[1], target[0], target[1], plan, device=self.device,
                                         stream=self._stream)
                event = cupy.cuda.Event(block=False, disable_timing=True)
                event.record(self._stream)
            return EventStep(event)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvxfer-pipe")
        return FutureStep(self._executor.submit(_host_copy, plan, source, target))

    # ---- staging buffers ---------------------------------------------------------------------------------------

    def _acquire(self, nbytes: int) -> Region:
        with self._lock:
            for region in sorted(self._free, key=lambda r: r.nbytes):
                if region.nbytes >= nbytes:
                    self._free.remove(region)
                    return region
        size = max(_MIN_STAGING, 1 << (nbytes - 1).bit_length())
        if self.device >= 0:
            from .devices import cupy_module

            with cupy_module().cuda.Device(self.device):
                array = cupy_module().empty(size, dtype=cupy_module().uint8)
        else:
            array = np.empty(size, dtype=np.uint8)
        region = self.agent.register(array, name=f"kvxfer-staging-{id(self):x}-{len(self._all)}")
        with self._lock:
            self._all.append(region)
        return region

    def release_for(self, handle: PipeHandle) -> None:
        """Return the staging buffers of a finished request to the pool."""
        with self._lock:
            for step in handle._steps:
                staging = getattr(step, "staging", None)
                if staging is not None and staging not in self._free:
                    self._free.append(staging)

    # ---- progress without a caller -----------------------------------------------------------------------------

    def watch(self, handle: PipeHandle) -> None:
        """Poll ``handle`` in the background so it finishes (and notifies its peers) even if nobody waits."""
        self._watched.add(handle)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="kvxfer-pipe-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._closed:
            busy = False
            for handle in list(self._watched):
                try:
                    busy |= not handle._released and not handle.poll().final
                except Exception:  # the owner sees the error when it polls; the watcher just moves on
                    self._watched.discard(handle)
            time.sleep(50e-6 if busy else 1e-3)

    def close(self) -> None:
        """Stop the watcher, deregister staging buffers, stop the host copy thread."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for region in self._all:
            if region.registered and not self.agent.closed:
                self.agent.deregister(region, timeout=self.agent.timeouts.close)
        self._all, self._free = [], []


def staging_spec_for(remote: KVCacheSpec, heads: tuple[int, int], num_blocks: int, num_layers: int) -> KVCacheSpec:
    """A contiguous buffer holding a peer's fragments of ``heads`` for ``num_blocks`` blocks and ``num_layers``
    layers, in the peer's own order: [layers, blocks, parts, heads x tokens in the peer's in-box order, dim]."""
    _, _, _, s_head, s_token, _ = remote.element_strides
    count = heads[1] - heads[0]
    return KVCacheSpec(num_layers=num_layers, num_blocks=num_blocks, block_size=remote.block_size,
                       num_kv_heads=count, head_dim=remote.head_dim, dtype=remote.dtype,
                       layout=KVLayout.HND if s_head > s_token else KVLayout.NHD, num_kv_parts=remote.num_kv_parts,
                       model=remote.model, total_kv_heads=count)


def _host_copy(plan: Any, source: tuple[int, int], target: tuple[int, int]) -> None:
    source_view = Region.from_ptr(source[0], source[1], MemoryKind.HOST).as_numpy()
    target_view = Region.from_ptr(target[0], target[1], MemoryKind.HOST).as_numpy()
    kernels.copy_kv(source_view, target_view, plan)


# ---- layer announcements (streamed pulls) -------------------------------------------------------------------------


def announce(agent: "Agent", peer: Any, key: bytes, layers: list[int]) -> None:
    """Tell ``peer`` that ``layers`` of request ``key`` are computed and may be pulled."""
    if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY:
        raise ConfigError(f"request key must be 1 to {MAX_KEY} bytes, got {key!r}")
    agent.notify(peer, PREFIX + msgpack.packb([key, [int(x) for x in layers]], use_bin_type=True))


def parse_announcement(payload: bytes) -> tuple[bytes, list[int]] | None:
    """``(key, layers)`` of an announcement, or None when it is malformed."""
    try:
        message = msgpack.unpackb(payload[len(PREFIX):], raw=False, max_bin_len=MAX_KEY, max_array_len=MAX_LAYER,
                                  max_str_len=0, max_map_len=0, max_ext_len=0)
    except Exception:
        return None
    if not isinstance(message, list) or len(message) != 2:
        return None
    key, layers = message
    if not isinstance(key, bytes) or not key or not isinstance(layers, list):
        return None
    if not all(type(x) is int and 0 <= x < MAX_LAYER for x in layers):
        return None
    return key, layers


class _Board:
    """What the peers announced for one key, and the pull listening for it (if any)."""

    def __init__(self) -> None:
        self.announced: dict[str, set[int]] = {}
        self.delivered: set[int] = set()
        self.peers: list[str] = []
        self.on_ready: Callable[[list[int]], None] | None = None
        self.created = time.monotonic()

    def take(self) -> list[int]:
        """Layers every listened peer announced that were not handed out yet (marked handed out)."""
        if self.on_ready is None:
            return []
        common = set.intersection(*(self.announced.get(p, set()) for p in self.peers)) - self.delivered
        self.delivered |= common
        return sorted(common)


class LayerBoard:
    """One agent's layer announcements by request key: buffered until a pull listens (at most
    ``MAX_UNCLAIMED`` keys, each for the agent's transfer timeout), dropped when that pull ends."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._boards: dict[bytes, _Board] = {}
        agent.subscribe(PREFIX, self._on_message)

    @classmethod
    def of(cls, agent: "Agent") -> "LayerBoard":
        """The board of ``agent`` (created on first use)."""
        board = getattr(agent, "_layer_board", None)
        if board is None:
            board = agent._layer_board = cls(agent)
        return board

    def listen(self, key: bytes, peers: list[str], on_ready: Callable[[list[int]], None]) -> None:
        """Call ``on_ready(layers)`` with layers of ``key`` every one of ``peers`` announced (now for those
        announced already, later from the delivering thread)."""
        with self._lock:
            board = self._boards.setdefault(key, _Board())
            if board.on_ready is not None:
                raise ConfigError(f"a pull already streams request key {key!r}")
            board.peers, board.on_ready = list(peers), on_ready
            layers = board.take()
        if layers:
            on_ready(layers)

    def forget(self, key: bytes, on_ready: Callable[[list[int]], None] | None = None) -> None:
        """Drop what is known about ``key`` (only if ``on_ready`` listens to it, when given)."""
        with self._lock:
            board = self._boards.get(key)
            if board is not None and (on_ready is None or board.on_ready == on_ready):
                del self._boards[key]

    @property
    def keys(self) -> list[bytes]:
        """Keys with buffered announcements or a listening pull."""
        with self._lock:
            return list(self._boards)

    @property
    def listened(self) -> list[bytes]:
        """Keys a pull listens to."""
        with self._lock:
            return [k for k, b in self._boards.items() if b.on_ready is not None]

    def _on_message(self, note: Notification) -> None:
        parsed = parse_announcement(note.payload)
        if parsed is None:
            logger.warning("agent %s: malformed layer announcement from %s ignored", self.agent.name, note.peer_name)
            return
        key, layers = parsed
        with self._lock:
            self._prune()
            board = self._boards.setdefault(key, _Board())
            board.announced.setdefault(note.peer_name, set()).update(layers)
            on_ready, ready = board.on_ready, board.take()
        if ready and on_ready is not None:
            on_ready(ready)

    def _prune(self) -> None:
        """Drop unclaimed keys past the transfer timeout, then the oldest beyond ``MAX_UNCLAIMED``."""
        unclaimed = sorted((b.created, k) for k, b in self._boards.items() if b.on_ready is None)
        stale = time.monotonic() - self.agent.timeouts.transfer
        for index, (created, key) in enumerate(unclaimed):
            if created < stale or index < len(unclaimed) - MAX_UNCLAIMED + 1:
                logger.warning("agent %s: layer announcements for %r dropped: no pull claimed them",
                               self.agent.name, key)
                del self._boards[key]
