"""An agent's inbox: the notifications its backends deliver, sorted to kvxfer's control channel, to subscribers
(by payload prefix) or to the queue :meth:`Agent.notifications` takes from."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from .control import PREFIX as CONTROL_PREFIX
from .control import ControlChannel
from .errors import ConfigError
from .handle import Notification

logger = logging.getLogger("kvxfer")


class Inbox:
    """Notifications received by agent ``agent_name``; control messages go to ``control``."""

    def __init__(self, agent_name: str, control: ControlChannel) -> None:
        self.agent_name, self.control = agent_name, control
        self._notes: deque[Notification] = deque()
        self._ready = threading.Condition()
        self._subscriptions: dict[bytes, Callable[[Notification], None]] = {}
        self._closed = False

    def subscribe(self, prefix: bytes, callback: Callable[[Notification], None]) -> None:
        """Hand notifications whose payload starts with ``prefix`` to ``callback(notification)`` instead of the
        queue. ConfigError for a prefix overlapping the control messages'."""
        if not isinstance(prefix, bytes) or not prefix:
            raise ConfigError(f"prefix must be non-empty bytes, got {prefix!r}")
        if prefix.startswith(CONTROL_PREFIX) or CONTROL_PREFIX.startswith(prefix):
            raise ConfigError(f"prefix {prefix!r} overlaps kvxfer's control messages ({CONTROL_PREFIX!r}); use "
                              "agent.control for those")
        self._subscriptions[prefix] = callback

    def deliver(self, notification: Notification) -> None:
        """A backend received ``notification`` (called from its thread)."""
        if notification.payload.startswith(CONTROL_PREFIX):
            try:
                self.control.deliver(notification.peer_name, notification.payload)
            except Exception:  # a handler's bug must not break the backend thread delivering
                logger.exception("agent %s: control message handler failed", self.agent_name)
            return
        for prefix, callback in list(self._subscriptions.items()):
            if notification.payload.startswith(prefix):
                try:
                    callback(notification)
                except Exception:  # a subscriber's bug must not break the backend thread delivering
                    logger.exception("agent %s: notification subscriber for %r failed", self.agent_name, prefix)
                return
        with self._ready:
            self._notes.append(notification)
            self._ready.notify_all()

    def take(self, timeout: float = 0.0) -> list[Notification]:
        """The queued notifications; with ``timeout`` > 0, wait that long for at least one (or :meth:`close`)."""
        with self._ready:
            if not self._notes and timeout > 0:
                self._ready.wait_for(lambda: bool(self._notes) or self._closed, timeout)
            taken = list(self._notes)
            self._notes.clear()
        return taken

    def close(self) -> None:
        """Wake every waiter of :meth:`take` and forget the control handlers."""
        self.control.close()
        with self._ready:
            self._closed = True
            self._ready.notify_all()
