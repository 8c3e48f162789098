"""UcxConnection: what the agent holds for one peer of the UCX backend (the link itself lives in ``links``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import Connection
from .services import Services

if TYPE_CHECKING:
    from ...peer import Peer


class UcxConnection(Connection):
    """The agent's side of a link to ``peer``: standalone notifications, and closing the link."""

    def __init__(self, services: Services, peer: Peer) -> None:
        self.services, self.peer = services, peer

    def notify(self, payload: bytes) -> None:
        services = self.services
        with services.worker.lock:
            services.notify(services.links.get(self.peer), payload, None)
        services.wake()

    def close(self) -> None:
        self.services.links.disconnect(self.peer)
