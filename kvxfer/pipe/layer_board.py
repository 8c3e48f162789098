"""Layer streaming for pulls: the prefill side announces the layers of a request that are computed, the decode
side moves a layer once every peer it reads from announced it.

:class:`LayerBoard` is an agent service (``LayerBoard.of(agent)`` is ``agent.service(LayerBoard)``): it buffers
announcements that arrive before their pull (bounded, for one transfer timeout at most) and hands them to the pull
listening for the request key. Announcements are :class:`~kvxfer.control.LayersReady` control messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..control import MAX_KEY, MAX_LAYER, LayersReady
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..agent import Agent
    from ..peer import Peer

logger = logging.getLogger("kvxfer")
MAX_UNCLAIMED = 1024  # keys announced before their pull, buffered at most


def announce(agent: Agent, peer: Peer | str, key: bytes, layers: list[int]) -> None:
    """Tell ``peer`` that ``layers`` of request ``key`` are computed and may be pulled."""
    if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY:
        raise ConfigError(f"request key must be 1 to {MAX_KEY} bytes, got {key!r}")
    if not all(0 <= int(x) < MAX_LAYER for x in layers):
        raise ConfigError(f"layer ids must be in [0, {MAX_LAYER}), got {layers}")
    agent.control.send(peer, LayersReady(key, tuple(int(x) for x in layers)))


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

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._boards: dict[bytes, _Board] = {}
        agent.control.on(LayersReady, self._on_message)

    @classmethod
    def of(cls, agent: Agent) -> LayerBoard:
        """The board of ``agent`` (its service, created on first use)."""
        return agent.service(cls)

    def close(self) -> None:
        """Stop listening and forget every key (the agent closes)."""
        self.agent.control.off(LayersReady, self._on_message)
        with self._lock:
            self._boards.clear()

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

    def _on_message(self, peer_name: str, message: LayersReady) -> None:
        with self._lock:
            self._prune()
            board = self._boards.setdefault(message.key, _Board())
            board.announced.setdefault(peer_name, set()).update(message.layers)
            on_ready, ready = board.on_ready, board.take()
        if ready and on_ready is not None:
            on_ready(ready)

    def _prune(self) -> None:
        """Drop unclaimed keys past the transfer timeout, then the oldest beyond ``MAX_UNCLAIMED``."""
        unclaimed = sorted((b.created, k) for k, b in self._boards.items() if b.on_ready is None)
        stale = time.monotonic() - self.agent.timeouts.transfer
        for index, (created, key) in enumerate(unclaimed):
            if created < stale or index < len(unclaimed) - MAX_UNCLAIMED + 1:
                logger.warning(
                    "agent %s: layer announcements for %r dropped: no pull claimed them", self.agent.name, key
                )
                del self._boards[key]
