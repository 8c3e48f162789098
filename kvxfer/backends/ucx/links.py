"""The UCX backend's table of links to peers: connecting, losing (and telling the agent), watching processes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...errors import PeerDisconnectedError
from . import cdef
from .endpoint import request_status
from .link import Link
from .wire import WorkerInfo

if TYPE_CHECKING:
    from ...peer import Peer
    from .backend import UcxBackend

_log = logging.getLogger("kvxfer.ucx")


class Links:
    """Links by peer name. Methods marked "locked" are called with the worker lock held."""

    def __init__(self, backend: "UcxBackend") -> None:
        self._backend = backend
        self._links: dict[str, Link] = {}
        self._closing: list[int] = []  # endpoint close requests still running

    def connect(self, peer: "Peer") -> Link:
        """A new link to ``peer``, replacing any older one of that name."""
        backend = self._backend
        info = WorkerInfo.decode(peer.meta.backends["ucx"], peer.name)
        same_host = peer.meta.host_id == backend.context.host_id
        with backend.worker.lock:
            old = self._links.pop(peer.name, None)
            if old is not None:
                self.lose(old, "replaced by a new connection", None, report=False)
            link = Link(peer, info, backend.worker, backend.config.error_mode, same_host, backend.cma,
                        self._on_endpoint_error)
            link.cma_enabled = backend.config.cma != "off"
            self._links[peer.name] = link
        _log.info("ucx: %s -> %s (%s): %s", backend.context.agent_name, peer.name,
                  "same host" if same_host else "other host", link.describe())
        if same_host and link.on_tcp_only():
            _log.warning("ucx: same-host peer %s is reached over tcp (%s): shared memory was not chosen%s",
                         peer.name, link.describe(), "; host data still goes through cma" if link.cma_ok else "")
        if same_host and link.cma_reason and link.cma_enabled:
            _log.info("ucx: no cross-memory path to %s: %s", peer.name, link.cma_reason)
        return link

    def disconnect(self, peer: "Peer") -> None:
        """Forget ``peer`` (the agent asked: no peer-lost report)."""
        with self._backend.worker.lock:
            link = self._links.get(peer.name)
            if link is not None and link.uid == peer.meta.uid:
                del self._links[peer.name]
                self.lose(link, "disconnected", None, report=False)

    def get(self, peer: "Peer") -> Link:
        """The live link to ``peer``; PeerDisconnectedError when there is none."""
        link = self._links.get(peer.name)
        if link is None or link.uid != peer.meta.uid:
            raise PeerDisconnectedError(f"ucx: peer {peer.name!r} is not connected", peer.name)
        if link.lost is not None:
            raise PeerDisconnectedError(f"ucx: {link.lost}; connect again", peer.name)
        return link

    def lose(self, link: Link, reason: str, cause: BaseException | None, report: bool = True) -> None:
        """(locked) Mark ``link``'s peer lost: fail its transfers, close the endpoint, tell the agent."""
        if link.lost is not None:
            return
        link.lost = PeerDisconnectedError(f"peer {link.name!r} lost: {reason}", link.name)
        link.lost.__cause__ = cause
        for request in list(link.requests):
            request.halt()
            request.fail(str(link.lost), link.lost)
        self._close(link)
        if report and self._links.get(link.name) is link:
            lost, agent = link.lost, self._backend.context
            self._backend.post_outbox(lambda: agent.peer_lost(link.name, lost))

    def _close(self, link: Link) -> None:
        link.close_watch()
        if link.ep.handle is None:
            return
        link.close_keys()
        # FORCE needs peer error mode on both sides; in none mode a flushing close that we never wait on.
        request = link.ep.close(force=link.mode == "peer")
        if request:
            self._closing.append(request)

    def _on_endpoint_error(self, link: Link, status: int) -> None:
        reason = f"endpoint error: {self._backend.library.status_text(status)}"
        # Inside a UCX callback: an endpoint must not be closed here, so later in this progress call.
        self._backend.worker.defer(lambda: self.lose(link, reason, None))

    def process_exited(self, link: Any) -> None:
        """The pidfd of ``link``'s peer became readable: its process is gone."""
        with self._backend.worker.lock:
            if link.pidfd is not None:
                self.lose(link, f"its process (pid {link.pid}) exited", None)

    def watched_processes(self) -> dict[int, Link]:
        """pidfd -> link of every live same-host peer that has one."""
        return {link.pidfd: link for link in list(self._links.values()) if link.pidfd is not None and not link.lost}

    def check_processes(self) -> None:
        """(locked) Poll the processes of verified same-host peers that have no pidfd."""
        for link in list(self._links.values()):
            if link.lost is None and link.pidfd is None and not link.process_alive():
                self.lose(link, f"its process (pid {link.pid}) exited", None)

    def reap(self) -> bool:
        """(locked) Free endpoint close requests that finished; True while some still run."""
        if self._closing:
            library = self._backend.library
            self._closing = [r for r in self._closing if request_status(library, r) == cdef.UCS_INPROGRESS]
        return bool(self._closing)

    def close_all(self) -> None:
        """(locked) Close every link (transfers fail); the caller then progresses until :meth:`reap` is False."""
        for link in list(self._links.values()):
            self.lose(link, "the backend was closed", None, report=False)
        self._links.clear()
