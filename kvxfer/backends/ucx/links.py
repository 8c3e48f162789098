"""The UCX backend's table of links to peers: connecting, losing (and telling the agent), watching processes."""

from __future__ import annotations

import errno
import logging
import os
import select
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import DescriptorError, PeerDisconnectedError
from ..base import BackendContext
from .binding import UCS_INPROGRESS, Worker
from .cma import CmaError, CrossMemory
from .config import UcxConfig
from .link import Link
from .outbox import Outbox
from .wire import WorkerInfo

if TYPE_CHECKING:
    from ...peer import Peer
    from ...plan import TransferPlan

_log = logging.getLogger("kvxfer.ucx")


@dataclass
class _Closing:
    """A lost link's endpoint while it closes: its close request (0: closed) and, for a same-host peer, the pidfd
    that tells when its process is gone (then what UCX never completes is given up on)."""

    ep: int
    request: int
    pidfd: int | None
    pid: int
    since: float

    def process_gone(self) -> bool:
        if self.pidfd is not None:
            return bool(select.select([self.pidfd], [], [], 0)[0])
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def close_watch(self) -> None:
        if self.pidfd is not None:
            try:
                os.close(self.pidfd)
            except OSError:
                pass
            self.pidfd = None


class Links:
    """Links by peer name. Methods marked "locked" are called with the worker lock held. Lost peers are reported
    to the agent (``context.peer_lost``) through ``outbox``."""

    def __init__(
        self, worker: Worker, config: UcxConfig, cma: CrossMemory, context: BackendContext, outbox: Outbox
    ) -> None:
        self._worker, self._config, self._cma = worker, config, cma
        self._context, self._outbox = context, outbox
        self._links: dict[str, Link] = {}
        self._closing: list[_Closing] = []  # lost links' endpoints still closing, or with sends in flight
        # plan -> (link serial, peer export-table generation) it was last checked against (exports.py); never the
        # link itself: a value that reaches its key (link -> lost error -> traceback -> plan) would pin both forever
        self._checked: weakref.WeakKeyDictionary[TransferPlan, tuple[int, int]] = weakref.WeakKeyDictionary()

    def connect(self, peer: Peer) -> Link:
        """A new link to ``peer``, replacing any older one of that name."""
        info = WorkerInfo.decode(peer.meta.backends["ucx"], peer.name)
        context, config = self._context, self._config
        same_host = peer.meta.host_id == context.host_id
        with self._worker.lock:
            old = self._links.pop(peer.name, None)
            if old is not None:
                self.lose(old, "replaced by a new connection", None, report=False)
            link = Link(peer, info, self._worker, config.error_mode, same_host, self._cma, self._on_endpoint_error)
            link.cma_enabled = config.cma != "off"
            self._links[peer.name] = link
        _log.info(
            "ucx: %s -> %s (%s): %s",
            context.agent_name,
            peer.name,
            "same host" if same_host else "other host",
            link.describe(),
        )
        if same_host and link.on_tcp_only():
            _log.warning(
                "ucx: same-host peer %s is reached over tcp (%s): shared memory was not chosen%s",
                peer.name,
                link.describe(),
                "; host data still goes through cma" if link.cma_ok else "",
            )
        if same_host and link.cma_reason and link.cma_enabled:
            _log.info("ucx: no cross-memory path to %s: %s", peer.name, link.cma_reason)
        return link

    def disconnect(self, peer: Peer) -> None:
        """Forget ``peer`` (the agent asked: no peer-lost report)."""
        with self._worker.lock:
            link = self._links.get(peer.name)
            if link is not None and link.uid == peer.meta.uid:
                del self._links[peer.name]
                self.lose(link, "disconnected", None, report=False)

    def get(self, peer: Peer) -> Link:
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
            lost, agent = link.lost, self._context
            self._outbox.post(lambda: agent.peer_lost(link.name, lost))

    def check_one_sided(self, link: Link, plan: TransferPlan) -> None:
        """Before a one-sided post (cma, direct) to a same-host peer: every remote span must lie in a region the
        peer exports now (its export table, read through a cross-memory call; exports.py). DescriptorError if not,
        PeerDisconnectedError if its process is gone. Without the worker lock."""
        view = link.exports
        if view is None:
            return  # RDMA: the hardware checks the remote keys
        try:
            generation = view.generation()
            if self._checked.get(plan) != (link.serial, generation):
                remote = plan.remote
                view.check(remote.addr, remote.nbytes, remote.region)
                self._checked[plan] = (link.serial, generation)
        except CmaError as error:
            if error.errno == errno.ESRCH:
                with self._worker.lock:
                    self.lose(link, f"its process (pid {link.pid}) is gone", error)
                self._outbox.flush()
                raise PeerDisconnectedError(f"ucx: peer {link.name!r} is gone", link.name) from error
            raise DescriptorError(f"cannot read peer {link.name!r}'s export table: {error}") from error

    def _close(self, link: Link) -> None:
        if link.ep.handle is None:
            link.close_watch()
            return
        link.close_keys()
        key = link.ep.key
        # FORCE needs peer error mode on both sides (it completes every request on the endpoint); in none mode a
        # flushing close, which never completes while the peer is stopped or dead: :meth:`reap` waits for it, or
        # for the peer's process to be gone, whichever comes first.
        request = link.ep.close(force=link.mode == "peer")
        pidfd, link.pidfd = link.pidfd, None  # the watch moves to the closing entry
        pid = link.pid if link.process_verified else 0
        if request or self._worker.sends_on(key):
            self._closing.append(_Closing(key, request, pidfd, pid, time.monotonic()))
        elif pidfd is not None:
            os.close(pidfd)

    def _on_endpoint_error(self, link: Link, status: int) -> None:
        reason = f"endpoint error: {self._worker.library.status_text(status)}"
        # Inside a UCX callback: an endpoint must not be closed here, so later in this progress call.
        self._worker.defer(lambda: self.lose(link, reason, None))

    def process_exited(self, link: Link) -> None:
        """The pidfd of ``link``'s peer became readable: its process is gone (the progress thread)."""
        with self._worker.lock:
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
        """(locked) Forget lost links' endpoints that finished closing; give up on those whose peer process is gone
        (their close request and sends are released: UCX in none mode never completes them, and their buffers
        would leak). True while some are still closing."""
        if not self._closing:
            return False
        worker = self._worker
        library = worker.library
        still = []
        for entry in self._closing:
            if entry.request and library.request_status(entry.request) != UCS_INPROGRESS:
                entry.request = 0
            if entry.request == 0 and not worker.sends_on(entry.ep):
                entry.close_watch()
                continue
            if entry.pid and entry.process_gone():
                if entry.request:
                    library.free_request(entry.request)  # UCX frees it if it ever completes
                dropped = worker.abandon_sends(entry.ep)
                _log.debug("ucx: gave up closing an endpoint to exited pid %d (%d sends dropped)", entry.pid, dropped)
                entry.close_watch()
                continue
            still.append(entry)
        self._closing = still
        return bool(still)

    @property
    def closing(self) -> int:
        """Lost links' endpoints still closing (or with sends in flight)."""
        return len(self._closing)

    def __len__(self) -> int:
        return len(self._links)

    def forget_closing(self) -> None:
        """(locked) At backend close, once waiting is over: drop what still closes (the worker goes next)."""
        for entry in self._closing:
            entry.close_watch()
        self._closing = []

    def close_all(self) -> None:
        """(locked) Close every link (transfers fail); the caller then progresses until :meth:`reap` is False."""
        for link in list(self._links.values()):
            self.lose(link, "the backend was closed", None, report=False)
        self._links.clear()
