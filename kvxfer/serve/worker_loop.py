"""What the worker's scheduling loops share: the bounded inbox, token batching, peer bookkeeping, link rates, drain.

A loop runs on its own thread and is the only one to touch the engine and connector. Messages from the router
arrive on the control link's thread and are queued here (bounded: a request that does not fit is answered
``error``/"overloaded" at once). The loop publishes a :class:`~kvxfer.serve.protocol.Load` snapshot after every
iteration; the worker's main thread sends it as the heartbeat, so a long forward pass never delays heartbeats.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import KvxferError
from . import protocol
from .protocol import AnyMessage, Error, Load, Message, Tokens, TokensBatch

logger = logging.getLogger("kvxfer.serve")

INBOX_LIMIT = 4096
TOKENS_PER_FRAME = 512  # Tokens entries per TokensBatch frame (keeps frames far below the 1 MiB cap)
POLL_WAIT_S = 0.002  # idle wait while transfers or leases need polling
IDLE_WAIT_S = 0.05  # idle wait otherwise (a message from the router wakes the loop at once)
RATE_WINDOW = 32
PEER_RETRY_S = 1.0  # pulls per peer the link rate is measured over

Send = Callable[[Message], bool]


class LinkRates:
    """Per peer, over its last RATE_WINDOW pulls: bytes/s = sum(bytes) / sum(seconds); latency = the shortest pull
    (the fixed cost a tiny transfer pays)."""

    def __init__(self) -> None:
        self._pulls: dict[str, deque[tuple[int, float]]] = {}

    def record(self, peer: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0:
            return
        self._pulls.setdefault(peer, deque(maxlen=RATE_WINDOW)).append((nbytes, seconds))

    def snapshot(self) -> dict[str, tuple[float, float]]:
        rates = {}
        for peer, pulls in self._pulls.items():
            seconds = sum(s for _, s in pulls)
            rates[peer] = (sum(b for b, _ in pulls) / seconds, min(s for _, s in pulls))
        return rates


class Rate:
    """An exponentially weighted tokens/s."""

    def __init__(self, weight: float = 0.2) -> None:
        self.value, self.weight = 0.0, weight

    def record(self, tokens: int, seconds: float) -> None:
        if seconds > 0 and tokens > 0:
            sample = tokens / seconds
            self.value = sample if self.value == 0 else (1 - self.weight) * self.value + self.weight * sample


class Loop:
    """The thread, inbox, outgoing token batch and drain state of a scheduling loop (subclasses do the work)."""

    def __init__(self, name: str, send: Send) -> None:
        self.name, self._send = name, send
        self._inbox: queue.Queue[AnyMessage] = queue.Queue(maxsize=INBOX_LIMIT)
        self._tokens: list[Tokens] = []
        self._load: Load = Load(0, 0, 0, 0, 0, 0.0, 0.0, {})
        self.now = time.time()  # the iteration's clock for decisions (deadlines): the leader's under TP
        #: TP > 1: ``sync(messages, now, stop)`` returns the leader's values on every rank (a broadcast)
        self.sync: Callable[[list[AnyMessage], float, bool], tuple[list[AnyMessage], float, bool]] | None = None
        self.leader = True  # the rank that talks to the router
        self._stop = threading.Event()
        self._drain_until: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"kvxfer-worker-loop-{name}", daemon=True)
        self.peer_groups: dict[str, str] = {}  # worker name -> connector group name (its rank 0's agent)
        self.group_peers: dict[str, str] = {}  # the inverse
        self._peer_infos: dict[str, tuple[bytes, ...]] = {}
        self._unconnected: dict[str, tuple[bytes, ...]] = {}  # peers whose connection failed: retried
        #: why the last connection attempt to a peer failed (named in unknown_peer errors)
        self.connect_errors: dict[str, str] = {}
        self._next_retry = 0.0

    # ---- called from other threads -----------------------------------------------------------------------------

    def post(self, message: AnyMessage) -> None:
        """Queue a message from the router (control link thread)."""
        try:
            self._inbox.put_nowait(message)
        except queue.Full:
            rid = getattr(message, "rid", None)
            logger.warning("worker %s: inbox full, refusing %s", self.name, message.TYPE)
            if rid is not None and message.TYPE in ("generate", "prefill", "decode"):
                self._send(Error(rid, "overloaded", f"worker {self.name}: inbox of {INBOX_LIMIT} messages full"))

    @property
    def load(self) -> Load:
        """The latest load snapshot (the heartbeat)."""
        return self._load

    def start(self) -> None:
        """Start the loop thread (the first load snapshot is taken here, so no heartbeat reports an empty cache)."""
        self._load = self.snapshot()
        self._thread.start()

    def drain(self, drain_s: float) -> None:
        """Stop accepting requests; finish the running ones within ``drain_s`` seconds, then abort the rest."""
        self._inbox.put(protocol.Shutdown(drain_s))

    def stop(self) -> None:
        """Abort everything and stop now."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop ----------------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            busy = True
            while True:
                messages: list[AnyMessage] = []
                if self.leader:
                    messages = self._take_inbox(0.0 if busy else POLL_WAIT_S if self.polling() else IDLE_WAIT_S)
                stop = self._stop.is_set() or (
                    self._drain_until is not None
                    and not messages
                    and (not self.has_work() or time.monotonic() > self._drain_until)
                )
                now = time.time()
                if self.sync is not None:  # every TP rank makes the leader's decisions, in the same order
                    messages, now, stop = self.sync(messages, now, stop)
                if stop:
                    break
                self.now = now
                for message in messages:
                    self._dispatch(message)
                if self._unconnected and time.monotonic() > self._next_retry:
                    self.retry_peers()
                busy = self._iteration() or bool(messages)
                self._flush()
                self._load = self.snapshot()
            self.abort_all("abort")
            self._flush()
        except BaseException as error:  # the process must notice: the main thread exits non-zero
            logger.exception("worker %s: scheduling loop failed", self.name)
            self.error = error
        finally:
            self._stop.set()

    def _take_inbox(self, wait: float) -> list[AnyMessage]:
        """The queued messages (waiting up to ``wait`` seconds for the first)."""
        try:
            messages = [self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()]
        except queue.Empty:
            return []
        while len(messages) < INBOX_LIMIT:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return messages

    def _dispatch(self, message: AnyMessage) -> None:
        if isinstance(message, protocol.Shutdown):
            if self._drain_until is None:
                logger.info("worker %s: draining for %.1f s", self.name, message.drain_s)
                self._drain_until = time.monotonic() + message.drain_s
        elif isinstance(message, protocol.Peers):
            self._peers(message)
        elif isinstance(message, protocol.Abort):
            self.abort(message.rid, "abort")
        elif isinstance(message, (protocol.Generate, protocol.Prefill, protocol.Decode)):
            if self._drain_until is not None:
                self._send(Error(message.rid, "draining", f"worker {self.name} is shutting down"))
            elif message.deadline_s <= self.now:
                self._send(Error(message.rid, "deadline", "the request's deadline passed before it arrived"))
            else:
                self.accept(message)
        else:
            logger.warning("worker %s: unexpected %s message from the router, ignored", self.name, message.TYPE)

    def _peers(self, message: protocol.Peers) -> None:
        listed = {peer.name for peer in message.peers}
        self._unconnected = {name: info for name, info in self._unconnected.items() if name in listed}
        for peer in message.peers:
            if peer.role == self.peer_role and peer.rank_info and self._peer_infos.get(peer.name) != peer.rank_info:
                self._unconnected[peer.name] = peer.rank_info
        self.retry_peers()

    def retry_peers(self) -> None:
        """Connect to the peers not connected yet (a failed attempt is retried every PEER_RETRY_S, and at once
        when a request names an unknown peer group)."""
        self._next_retry = time.monotonic() + PEER_RETRY_S
        for name, rank_info in list(self._unconnected.items()):
            try:
                group = self.connect(list(rank_info))
            except (KvxferError, OSError) as error:  # a bad or unreachable peer must not stop the worker: retry later
                logger.warning("worker %s: cannot connect to %s %s: %s", self.name, self.peer_role, name, error)
                self.connect_errors[name] = f"{type(error).__name__}: {error}"
                continue
            del self._unconnected[name]
            self.connect_errors.pop(name, None)
            self._peer_infos[name] = rank_info
            self.peer_groups[name], self.group_peers[group] = group, name

    # ---- output ------------------------------------------------------------------------------------------------

    def emit(self, tokens: Tokens) -> None:
        """Queue tokens for the batch sent at the end of this iteration."""
        self._tokens.append(tokens)

    def flush(self) -> None:
        """Send the queued tokens now (one frame per TOKENS_PER_FRAME requests)."""
        self._flush()

    def _flush(self) -> None:
        items, self._tokens = self._tokens, []
        for start in range(0, len(items), TOKENS_PER_FRAME):
            chunk = items[start : start + TOKENS_PER_FRAME]
            self._send(chunk[0] if len(chunk) == 1 else TokensBatch(tuple(chunk)))

    def send(self, message: Message) -> bool:
        return self._send(message)

    # ---- for subclasses ----------------------------------------------------------------------------------------

    peer_role = ""

    def _iteration(self) -> bool:
        """One round of work; True when there may be more to do right away."""
        raise NotImplementedError

    def accept(self, message: protocol.Generate | protocol.Prefill | protocol.Decode) -> None:
        raise NotImplementedError

    def abort(self, rid: str, reason: str) -> None:
        raise NotImplementedError

    def abort_all(self, reason: str) -> None:
        raise NotImplementedError

    def has_work(self) -> bool:
        raise NotImplementedError

    def polling(self) -> bool:
        """Whether something (a transfer, a lease) progresses without a message: the loop then polls often."""
        raise NotImplementedError

    def connect(self, rank_info: list[bytes]) -> str:
        raise NotImplementedError

    def snapshot(self) -> Load:
        raise NotImplementedError
