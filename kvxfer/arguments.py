"""Checks of what a caller passes to :class:`~kvxfer.Agent` (ConfigError naming the first bad argument)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .handle import Timeouts
from .limits import Limits


def check_agent_arguments(
    name: Any, timeouts: Any, listen: Any, token: Any, compat: Any, host_id: Any, limits: Any
) -> None:
    """ConfigError naming the first bad argument of Agent()."""
    for argument, value, optional, longest in (
        ("name", name, False, 256),
        ("compat", compat, False, 256),
        ("host_id", host_id, True, 256),
        ("listen", listen, True, 256),
        ("token", token, True, 4096),
    ):
        if value is None and optional:
            continue
        if not isinstance(value, str) or len(value) > longest or (argument != "compat" and not value):
            what = "a string" if argument == "compat" else "a non-empty string"
            raise ConfigError(
                f"{argument} must be {what} of <= {longest} characters{' or None' if optional else ''}, got {value!r}"
            )
    if timeouts is not None and not isinstance(timeouts, Timeouts):
        raise ConfigError(f"timeouts must be a kvxfer.Timeouts or None, got {type(timeouts).__name__}")
    if limits is not None and not isinstance(limits, Limits):
        raise ConfigError(f"limits must be a kvxfer.limits.Limits or None, got {type(limits).__name__}")
    if token is not None and listen is None:
        raise ConfigError(
            "token= protects the side channel, which needs listen=; pass connect_to(address, "
            "token=...) to present a token to a peer"
        )


def check_payload(payload: Any, limits: Limits, argument: str) -> bytes:
    """``payload`` as bytes when it is bytes of at most ``Limits.notification_nbytes``; ConfigError otherwise."""
    if not isinstance(payload, (bytes, bytearray)):
        raise ConfigError(f"{argument} must be bytes, got {type(payload).__name__}")
    if len(payload) > limits.notification_nbytes:
        raise ConfigError(
            f"{argument} of {len(payload)} bytes is over Limits.notification_nbytes = {limits.notification_nbytes}"
        )
    return bytes(payload)


def check_subscription(prefix: Any, callback: Any, reserved: bytes) -> None:
    """ConfigError unless ``prefix`` is non-empty bytes that does not overlap ``reserved`` (kvxfer's control
    messages) and ``callback`` is callable."""
    if not isinstance(prefix, bytes) or not prefix:
        raise ConfigError(f"prefix must be non-empty bytes, got {prefix!r}")
    if prefix.startswith(reserved) or reserved.startswith(prefix):
        raise ConfigError(f"prefix {prefix!r} overlaps kvxfer's control messages ({reserved!r}); use agent.control")
    if not callable(callback):
        raise ConfigError(f"callback must be callable, got {type(callback).__name__}")
