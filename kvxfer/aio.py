"""asyncio adapter: await transfers and notifications without blocking the event loop.

The core is synchronous; these coroutines poll it with a short, growing sleep (50 us up to 1 ms), so an event
loop serving many requests stays responsive while transfers are in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .agent import Agent
    from .handle import Handle, Notification

    AnyHandle = TypeVar("AnyHandle", bound=Handle)

_FIRST_SLEEP = 50e-6
_MAX_SLEEP = 1e-3


async def wait(handle: AnyHandle, timeout: float | None = None) -> AnyHandle:
    """Await any handle kvxfer returns (a TransferHandle, a KVPipe's PipeHandle) like its ``wait`` (same default
    timeout, same errors)."""
    limit = handle.default_timeout if timeout is None else timeout
    give_up = time.monotonic() + limit
    sleep = _FIRST_SLEEP
    while not handle.poll().final:
        if time.monotonic() >= give_up:
            raise handle.timeout_error(limit)
        await asyncio.sleep(sleep)
        sleep = min(sleep * 2, _MAX_SLEEP)
    return handle.result()


async def notifications(agent: Agent, timeout: float = 0.0) -> list[Notification]:
    """Await at least one notification for up to ``timeout`` seconds; returns what arrived (maybe nothing)."""
    give_up = time.monotonic() + timeout
    sleep = _FIRST_SLEEP
    while True:
        taken = agent.notifications()
        if taken or time.monotonic() >= give_up:
            return taken
        await asyncio.sleep(sleep)
        sleep = min(sleep * 2, _MAX_SLEEP)
