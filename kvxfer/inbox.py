"""An agent's inbox: notifications from peers, handed to subscribers by prefix or queued, within bounds.

Peers decide what arrives, so everything here is bounded (``Limits``): a payload over ``notification_nbytes`` is
dropped on arrival, and once ``queued_notifications`` notifications or ``queued_notification_nbytes`` payload bytes
wait undrained, new ones are dropped too. Drops are counted (``dropped``, by reason) and logged, never silent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from .handle import Notification
from .limits import Limits

logger = logging.getLogger("kvxfer")

_LOG_EVERY_SECONDS = 5.0


class Inbox:
    """Notifications received and not yet taken, plus the subscriptions that take some of them first."""

    def __init__(self, owner: str, limits: Limits) -> None:
        self._owner = owner
        self._limits = limits
        self._notes: deque[Notification] = deque()
        self._nbytes = 0
        self._ready = threading.Condition()
        self._subscriptions: dict[bytes, Callable[[Notification], None]] = {}
        self._closed = False
        self.dropped: Counter[str] = Counter()
        self._last_log = 0.0

    def subscribe(self, prefix: bytes, callback: Callable[[Notification], None]) -> None:
        """Hand notifications whose payload starts with ``prefix`` to ``callback`` instead of the queue."""
        self._subscriptions[prefix] = callback

    def deliver(self, notification: Notification) -> None:
        """Called by backends (any thread) for each notification that arrived."""
        payload_nbytes = len(notification.payload)
        if payload_nbytes > self._limits.notification_nbytes:
            self._drop(notification, "oversized")
            return
        for prefix, callback in list(self._subscriptions.items()):
            if notification.payload.startswith(prefix):
                try:
                    callback(notification)
                except Exception:  # a subscriber's bug must not break the backend thread delivering
                    logger.exception("agent %s: notification subscriber for %r failed", self._owner, prefix)
                return
        with self._ready:
            if self._closed:
                return
            if (
                len(self._notes) >= self._limits.queued_notifications
                or self._nbytes + payload_nbytes > self._limits.queued_notification_nbytes
            ):
                self._drop(notification, "queue full")
                return
            self._notes.append(notification)
            self._nbytes += payload_nbytes
            self._ready.notify_all()

    def take(self, timeout: float) -> list[Notification]:
        """Everything queued; with ``timeout`` > 0, wait that long for at least one."""
        with self._ready:
            if not self._notes and timeout > 0:
                self._ready.wait_for(lambda: bool(self._notes) or self._closed, timeout)
            taken = list(self._notes)
            self._notes.clear()
            self._nbytes = 0
        return taken

    def close(self) -> None:
        """Wake waiters; later arrivals are discarded."""
        with self._ready:
            self._closed = True
            self._notes.clear()
            self._nbytes = 0
            self._ready.notify_all()

    def count_dropped(self, reason: str) -> None:
        """Count a notification a backend refused before it arrived here (e.g. over the size cap)."""
        with self._ready:
            self.dropped[reason] += 1

    def _drop(self, notification: Notification, reason: str) -> None:
        self.dropped[reason] += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_SECONDS:  # a flood must not flood the log too
            self._last_log = now
            logger.warning(
                "agent %s: dropped a notification of %d bytes from %r (%s; dropped so far: %s; limits: "
                "%d bytes each, %d queued, %d bytes queued)",
                self._owner,
                len(notification.payload),
                notification.peer_name,
                reason,
                dict(self.dropped),
                self._limits.notification_nbytes,
                self._limits.queued_notifications,
                self._limits.queued_notification_nbytes,
            )
