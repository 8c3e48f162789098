"""The steps of a pipe request: a backend transfer, a kernel on a CUDA stream, host work on a thread.

A KV pipe request is several steps (one or more per route); its :class:`~kvxfer.pipe.handle.PipeHandle` finishes
when every step has. A step never climbs back into the pipe: it only observes, waits for and cancels its own work.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from typing import Any

from ..errors import KvxferError, TransferError
from ..handle import TransferHandle, TransferState


class Step:
    """One piece of work; ``poll`` returns its state, ``error`` says why it failed."""

    error: KvxferError | None = None

    def poll(self) -> TransferState:
        """Observe the work without blocking."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop it; return once it touches no memory any more."""

    def block(self, seconds: float) -> None:
        """Wait up to ``seconds`` for progress (returns early when the step may have finished)."""
        time.sleep(min(seconds, 1e-4))


class TransferStep(Step):
    """A backend transfer posted through the agent."""

    def __init__(self, handle: TransferHandle) -> None:
        self.handle = handle

    def poll(self) -> TransferState:
        state = self.handle.poll()
        self.error = self.handle.error
        return state

    def cancel(self) -> None:
        self.handle.cancel()

    def block(self, seconds: float) -> None:
        self.handle.block(seconds)


class EventStep(Step):
    """A kernel launched on a CUDA stream; done when the event recorded after it has fired (a cupy Event)."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def poll(self) -> TransferState:
        return TransferState.DONE if self.event.done else TransferState.PENDING

    def cancel(self) -> None:
        self.event.synchronize()

    def block(self, seconds: float) -> None:
        self.event.synchronize()  # a local kernel: it ends on its own, and soon


class FutureStep(Step):
    """Host work running on a thread."""

    def __init__(self, future: Future[None]) -> None:
        self.future = future

    def poll(self) -> TransferState:
        if not self.future.done():
            return TransferState.PENDING
        error = self.future.exception()
        if error is None:
            return TransferState.DONE
        self.error = error if isinstance(error, KvxferError) else TransferError(f"host copy failed: {error}")
        return TransferState.FAILED

    def cancel(self) -> None:
        if not self.future.cancel():
            self.future.exception()  # already running: wait for it to finish

    def block(self, seconds: float) -> None:
        wait_for_futures([self.future], timeout=seconds)
