"""Bounds an agent puts on what peers and callers may make it hold, and the one check of timeout arguments.

Everything a peer can make an agent buffer or wait on has a bound here (docs/security.md): notification sizes and
queue, side-channel connections and request time, the age of signed metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


def check_timeout(value: Any, argument: str = "timeout", allow_none: bool = True) -> float | None:
    """``value`` as a float of seconds, or None when ``allow_none`` and it is None.

    ConfigError (a ValueError) for anything else: a bool, a non-number, NaN, infinity or a negative number — a
    deadline that can never fire would pin memory for ever.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{argument} must be a number of seconds >= 0, got {type(value).__name__} {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{argument} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True)
class Limits:
    """Per-agent bounds (``Agent(..., limits=Limits(...))``).

    ``notification_nbytes``: the largest notification payload this agent sends or accepts (a larger incoming one
    is dropped and counted in ``Agent.dropped_notifications``; a larger outgoing one raises ConfigError).
    ``queued_notifications`` / ``queued_notification_nbytes``: how many notifications, and how many payload bytes,
    wait undrained in :meth:`Agent.notifications` before new ones are dropped (and counted).
    ``side_channel_connections``: connections the side-channel server serves at once; the excess is closed at
    once. ``side_channel_request_seconds``: total time one side-channel request may take on the server.
    ``metadata_max_age``: seconds signed metadata stays acceptable to ``Agent.connect(..., token=...)``.
    ``notification_senders``: sender names this agent keeps bound to the agent instance speaking under each
    (senders.py); notifications under new names beyond that are dropped (and counted).
    ``handshake_nonces``: authenticated handshake nonces remembered (each is accepted once; nonces.py).
    """

    notification_nbytes: int = 16 << 20
    queued_notifications: int = 65536
    queued_notification_nbytes: int = 256 << 20
    side_channel_connections: int = 64
    side_channel_request_seconds: float = 5.0
    metadata_max_age: float = 600.0
    notification_senders: int = 4096
    handshake_nonces: int = 65536

    def __post_init__(self) -> None:
        for name in (
            "notification_nbytes",
            "queued_notifications",
            "queued_notification_nbytes",
            "side_channel_connections",
            "notification_senders",
            "handshake_nonces",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Limits.{name} must be an int >= 1, got {value!r}")
        for name in ("side_channel_request_seconds", "metadata_max_age"):
            seconds = check_timeout(getattr(self, name), f"Limits.{name}", allow_none=False)
            if not seconds:
                raise ConfigError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
