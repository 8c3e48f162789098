"""UcxConnection: what the agent holds for one peer of the UCX backend (the link itself lives in ``links``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import Connection

if TYPE_CHECKING:
    from ...peer import Peer
    from .backend import UcxBackend


class UcxConnection(Connection):
    """The agent's side of a link to ``peer``: standalone notifications, and closing the link."""

    def __init__(self, backend: UcxBackend, peer: Peer) -> None:
        self.backend, self.peer = backend, peer

    def notify(self, payload: bytes) -> None:
        backend = self.backend
        with backend.worker.lock:
            backend.send_notify(backend.links.get(self.peer), payload, None)
        backend.wake()

    def close(self) -> None:
        self.backend.links.disconnect(self.peer)
