"""Block leases: blocks a sender hands to a receiver stay pinned until the receiver releases them or stops renewing.

Sender (prefill): ``Leases.of(agent).grant(key, peer, block_ids, ttl, on_end)`` (``Leases.of(agent)`` is
``agent.service(Leases)``: the agent owns the keeper and closes it); ``on_end(lease, reason)`` runs once,
with reason "released" or "expired" (free the blocks there). Receiver (decode): a KVPipe pull with ``lease=key``
renews every ``renew_every`` seconds while the transfer runs and releases at the end. The sender answers every
renewal ("ack", or "expired" for a lease it no longer holds); the pull finishes only after every sender acked
once, and fails as soon as one reports the lease expired. Both sides must be connected to each other.
Messages are :class:`~kvxfer.control.LeaseMessage` control messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..control import LeaseMessage, LeaseVerb
from ..errors import ConfigError, KvxferError, LeaseLostError
from ..handle import TransferState
from ..spec import BlockIds
from .steps import Step

if TYPE_CHECKING:
    from ..agent import Agent

logger = logging.getLogger("kvxfer")


@dataclass
class Lease:
    """Blocks held for ``peer`` until ``expires_at`` (time.monotonic), unless renewed."""

    key: bytes
    peer: str
    block_ids: np.ndarray
    ttl: float
    expires_at: float
    on_end: Callable[[Lease, str], None] | None = field(default=None, repr=False)


class ExpiryStep(Step):
    """A pipe step that is done once every sender acknowledged a renewal (so the lease was alive while the data
    moved) and fails as soon as a sender reports the lease expired or unknown."""

    def __init__(self, peers: list[str]) -> None:
        self.expired = False
        self.waiting = set(peers)

    def poll(self) -> TransferState:
        if self.expired:
            self.error = LeaseLostError("the sender's lease on these blocks expired before the transfer finished")
            return TransferState.FAILED
        return TransferState.PENDING if self.waiting else TransferState.DONE


class Leases:
    """Both roles of one agent: leases it granted (sender) and leases it holds (receiver). An agent service:
    get it with ``Leases.of(agent)``; its timer thread (renewals, expiry) stops when the agent closes."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._granted: dict[bytes, Lease] = {}
        self._held: dict[bytes, tuple[list[str], float, ExpiryStep]] = {}
        self._stop = threading.Event()
        agent.control.on(LeaseMessage, self._on_message)
        self._thread = threading.Thread(target=self._tick, name=f"kvxfer-leases-{agent.name}", daemon=True)
        self._thread.start()

    @classmethod
    def of(cls, agent: Agent) -> Leases:
        """The lease keeper of ``agent`` (its service, created on first use)."""
        return agent.service(cls)

    # ---- sender ------------------------------------------------------------------------------------------------

    def grant(
        self,
        key: bytes,
        peer: str,
        block_ids: BlockIds,
        ttl: float = 10.0,
        on_end: Callable[[Lease, str], None] | None = None,
    ) -> Lease:
        """Hold ``block_ids`` for ``peer`` for ``ttl`` seconds past the last renewal."""
        if not isinstance(key, bytes) or not key:
            raise ConfigError(f"lease key must be non-empty bytes, got {key!r}")
        if not ttl > 0:
            raise ConfigError(f"ttl must be > 0, got {ttl}")
        lease = Lease(key, peer, np.asarray(block_ids), ttl, time.monotonic() + ttl, on_end)
        with self._lock:
            if key in self._granted:
                raise ConfigError(f"lease {key!r} is already granted")
            self._granted[key] = lease
        return lease

    @property
    def granted(self) -> dict[bytes, Lease]:
        """Leases still held, by key."""
        with self._lock:
            return dict(self._granted)

    def _end(self, key: bytes, reason: str) -> None:
        with self._lock:
            lease = self._granted.pop(key, None)
        if lease is None:
            return
        if reason == "expired":
            logger.warning("agent %s: lease %r of %s expired; its blocks are freed", self.agent.name, key, lease.peer)
            self._send(lease.peer, LeaseVerb.EXPIRED, key)
        if lease.on_end is not None:
            lease.on_end(lease, reason)

    # ---- receiver ----------------------------------------------------------------------------------------------

    def hold(self, key: bytes, peers: list[str], renew_every: float) -> ExpiryStep:
        """Renew ``key`` with ``peers`` every ``renew_every`` seconds until :meth:`drop`; the returned step fails
        if a sender reports the lease expired."""
        step = ExpiryStep(peers)
        with self._lock:
            self._held[key] = (peers, renew_every, step)
        for peer in peers:
            self._send(peer, LeaseVerb.RENEW, key)
        return step

    def drop(self, key: bytes, release: bool = True) -> None:
        """Stop renewing; with ``release`` tell the senders they may free the blocks."""
        with self._lock:
            held = self._held.pop(key, None)
        if held is not None and release:
            for peer in held[0]:
                self._send(peer, LeaseVerb.RELEASE, key)

    # ---- messages and time -------------------------------------------------------------------------------------

    def _send(self, peer: str, verb: LeaseVerb, key: bytes) -> None:
        try:
            self.agent.control.send(peer, LeaseMessage(verb, key))
        except KvxferError as error:
            logger.warning(
                "agent %s: cannot send lease %s for %r to %s: %s", self.agent.name, verb.value, key, peer, error
            )

    def _on_message(self, peer_name: str, message: LeaseMessage) -> None:
        verb, key = message.verb, message.key
        if verb is LeaseVerb.RENEW:
            with self._lock:
                lease = self._granted.get(key)
                if lease is not None:
                    lease.expires_at = time.monotonic() + lease.ttl
            # Answer every renewal: "ack" proves the blocks were still held when it arrived; a late receiver
            # (the lease already expired, its blocks maybe reused) learns it must not trust what it read.
            self._send(peer_name, LeaseVerb.ACK if lease is not None else LeaseVerb.EXPIRED, key)
        elif verb is LeaseVerb.ACK:
            with self._lock:
                held = self._held.get(key)
            if held is not None:
                held[2].waiting.discard(peer_name)
        elif verb is LeaseVerb.RELEASE:
            self._end(key, "released")
        elif verb is LeaseVerb.EXPIRED:
            with self._lock:
                held = self._held.get(key)
            if held is not None:
                held[2].expired = True

    def _tick(self) -> None:
        next_renewal: dict[bytes, float] = {}
        while not self._stop.wait(0.02):
            now = time.monotonic()
            with self._lock:
                expired = [k for k, lease in self._granted.items() if lease.expires_at <= now]
                held = dict(self._held)
            for key in expired:
                self._end(key, "expired")
            for key, (peers, every, _) in held.items():
                if now >= next_renewal.setdefault(key, now + every):
                    for peer in peers:
                        self._send(peer, LeaseVerb.RENEW, key)
                    next_renewal[key] = now + every
            for key in [k for k in next_renewal if k not in held]:
                del next_renewal[key]

    def close(self) -> None:
        """Stop the timer thread (waits for it) and stop listening; leases still granted never expire now."""
        self._stop.set()
        self.agent.control.off(LeaseMessage, self._on_message)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
