"""Transfer handles: the caller's view of one posted transfer, plus the small value types around it."""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import (ConfigError, KvxferError, TransferCancelledError, TransferError, TransferTimeoutError,
                     UsageError)

if TYPE_CHECKING:
    from .backends.base import Backend, Request


class TransferState(str, Enum):
    """Where a transfer stands. DONE, FAILED and CANCELLED are final."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True for DONE, FAILED and CANCELLED."""
        return self is not TransferState.PENDING


@dataclass(frozen=True)
class Notification:
    """A message from ``peer_name``: either attached to a transfer (delivered after its data) or standalone."""

    peer_name: str
    payload: bytes


@dataclass(frozen=True)
class Timeouts:
    """Default time limits in seconds. ``transfer``: deadline of a posted transfer and the default ``wait``;
    ``connect``: handshakes and side-channel requests; ``close``: how long closing waits for transfers in flight."""

    transfer: float = 30.0
    connect: float = 10.0
    close: float = 5.0

    def __post_init__(self) -> None:
        for name in ("transfer", "connect", "close"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"Timeouts.{name} must be a number > 0, got {value!r}")


# Polling backoff while waiting: start hot (transfers of small requests finish in microseconds), then back off
# so a long wait does not burn a core.
_SPIN_SECONDS = 50e-6
_MAX_SLEEP = 1e-3


class TransferHandle:
    """One posted READ or WRITE. Poll it, wait for it (with a deadline), cancel it, release it.

    Use it as a context manager or call :meth:`release`; a handle dropped while still PENDING warns with
    ResourceWarning.
    """

    def __init__(self, agent: Any, backend: "Backend", request: "Request", op: str, nbytes: int,
                 deadline: float, on_final: Any = None, strategy: str = "direct") -> None:
        self._agent = agent
        self._backend = backend
        self._request = request
        self._lock = threading.Lock()
        self._state = TransferState.PENDING
        self._error: KvxferError | None = None
        self._released = False
        self._on_final = on_final
        self.op = op
        self.nbytes = nbytes
        self.deadline = deadline
        self.strategy = strategy
        self.posted_at = time.monotonic()
        self.finished_at: float | None = None

    @property
    def backend(self) -> str:
        """Name of the backend moving the bytes."""
        return self._backend.caps.name

    @property
    def error(self) -> KvxferError | None:
        """Why the transfer failed or was cancelled (None while PENDING or after DONE)."""
        return self._error

    @property
    def state(self) -> TransferState:
        """The last observed state (call :meth:`poll` to observe again)."""
        return self._state

    def poll(self) -> TransferState:
        """Observe progress without blocking; enforces the deadline."""
        self._check_usable()
        with self._lock:
            if self._state.final:
                return self._state
            try:
                state = self._backend.poll(self._request)
            except KvxferError as error:
                return self._finish(TransferState.FAILED, error)
            except Exception as error:  # a backend bug must still end the transfer, not hang the caller
                failure = TransferError(f"backend {self.backend} failed while polling: {error}", self, self.backend)
                failure.__cause__ = error
                return self._finish(TransferState.FAILED, failure)
            if state is TransferState.PENDING:
                if time.monotonic() > self.deadline:
                    self._backend.cancel(self._request)
                    return self._finish(TransferState.FAILED, TransferTimeoutError(
                        f"transfer of {self.nbytes} bytes missed its deadline", self, self.backend))
                return state
            error = getattr(self._request, "error", None)
            if state is TransferState.FAILED and error is None:
                error = TransferError("transfer failed", self, self.backend)
            if state is TransferState.CANCELLED and error is None:
                error = TransferCancelledError("transfer was cancelled", self, self.backend)
            return self._finish(state, error)

    def wait(self, timeout: float | None = None) -> "TransferHandle":
        """Block until the transfer is final; return self when DONE.

        ``timeout`` defaults to the agent's ``Timeouts.transfer``. Raises TransferTimeoutError when it runs out
        (the transfer goes on until its own deadline or :meth:`cancel`), the transfer's error when it FAILED, and
        TransferCancelledError when it was cancelled.
        """
        limit = self._agent.timeouts.transfer if timeout is None else timeout
        if limit < 0:
            raise ConfigError(f"timeout must be >= 0, got {timeout}")
        give_up = time.monotonic() + limit
        spin_until = time.monotonic() + _SPIN_SECONDS
        sleep = 1e-6
        while not self.poll().final:
            now = time.monotonic()
            if now >= give_up:
                raise TransferTimeoutError(f"wait timed out after {limit} s; the transfer is still in flight",
                                           self, self.backend)
            if now > spin_until:
                self._backend.idle_wait(self._request, min(sleep, give_up - now))
                sleep = min(sleep * 2, _MAX_SLEEP)
        if self._state is TransferState.DONE:
            return self
        assert self._error is not None
        raise self._error

    def block(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the backend to progress (returns early when the transfer may be done);
        :meth:`poll` afterwards says where it stands."""
        self._backend.idle_wait(self._request, seconds)

    def cancel(self) -> None:
        """Stop the transfer. When the backend guarantees it (``caps.can_cancel``), no byte of it lands after
        this returns; otherwise it returns once the backend will touch the memory no more."""
        self._check_usable()
        with self._lock:
            if self._state.final:
                return
            self._backend.cancel(self._request)
            state = self._backend.poll(self._request)
            if state in (TransferState.PENDING, TransferState.CANCELLED):
                self._finish(TransferState.CANCELLED,
                             TransferCancelledError("transfer was cancelled", self, self.backend))
            else:  # it ended before the cancel reached it: report how it really ended
                self._finish(state, getattr(self._request, "error", None))

    def release(self) -> None:
        """Free the handle; cancels it first if it is still in flight."""
        if self._released:
            return
        if not self._state.final:
            try:
                self.cancel()
            except KvxferError:
                pass
        self._released = True

    def _finish(self, state: TransferState, error: KvxferError | None) -> TransferState:
        self._state = state
        self._error = error if state is not TransferState.DONE else None
        self.finished_at = time.monotonic()
        if self._on_final is not None:
            self._on_final(self)
        return state

    def _check_usable(self) -> None:
        if self._released:
            raise UsageError("this TransferHandle was released")

    @property
    def seconds(self) -> float | None:
        """Time from post to the moment the final state was observed."""
        return None if self.finished_at is None else self.finished_at - self.posted_at

    def __enter__(self) -> "TransferHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        if not getattr(self, "_released", True) and getattr(self, "_state", TransferState.DONE) is TransferState.PENDING:
            warnings.warn(f"TransferHandle of {self.nbytes} bytes dropped while still pending; wait() or release() it",
                          ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"TransferHandle({self.op}, {self.nbytes} bytes, {self.backend}, {self._state.value})"
