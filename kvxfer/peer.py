"""Peers: remote agents an agent has connected to, as their metadata describes them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import PeerError
from .memory import RemoteRegion
from .metadata import AgentMetadata
from .plan import RegionTable

if TYPE_CHECKING:
    from .backends.base import Backend


class Peer:
    """A connected remote agent: its name, metadata, regions, and the backends that can reach it."""

    def __init__(self, meta: AgentMetadata, backends: "list[Backend]") -> None:
        self.meta = meta
        self.name = meta.name
        self.backends = backends
        self.connected = True
        self.lost_reason: str | None = None
        self._regions = {r.name: RemoteRegion(r.name, r.index, r.addr, r.nbytes, r.kind, r.device, self, r.keys)
                         for r in meta.regions}
        self.table = RegionTable([r.index for r in meta.regions], [r.addr for r in meta.regions],
                                 [r.nbytes for r in meta.regions], [r.kind for r in meta.regions])

    def region(self, name: str) -> RemoteRegion:
        """The peer's region registered under ``name``."""
        try:
            return self._regions[name]
        except KeyError:
            raise PeerError(f"peer {self.name!r} has no region named {name!r}; it has {sorted(self._regions)}",
                            self.name) from None

    @property
    def regions(self) -> list[RemoteRegion]:
        """All regions the peer published."""
        return list(self._regions.values())

    @property
    def host_id(self) -> str:
        """The peer's host identity (equal host ids mean same-host paths are possible)."""
        return self.meta.host_id

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"disconnected ({self.lost_reason})"
        return f"Peer({self.name!r}, {len(self._regions)} regions, {[b.caps.name for b in self.backends]}, {state})"
