"""Transfer handles: the caller's view of one posted transfer, plus the small value types around it."""

from __future__ import annotations

import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from .errors import ConfigError, KvxferError, TransferCancelledError, TransferError, TransferTimeoutError, UsageError
from .limits import check_timeout

if TYPE_CHECKING:
    from typing_extensions import Self

    from .agent import Agent
    from .backends.base import Backend, Op, Request


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


class Handle(ABC):
    """What every handle kvxfer returns shares (a :class:`TransferHandle`, a pipe's ``PipeHandle``): observe it
    with :meth:`poll`, block on it with :meth:`wait` (a deadline; default the agent's transfer timeout), stop it
    with :meth:`cancel`, forget it with :meth:`release` (or leave a ``with`` block). ``kvxfer.aio.wait`` awaits
    any of them.

    Subclasses implement :meth:`poll`, :meth:`cancel` and :meth:`block`, and set ``_state``, ``_error``,
    ``_released``, ``_default_timeout``, ``nbytes``, ``strategy``, ``deadline``, ``posted_at`` and
    ``finished_at``. While waiting, :meth:`wait` polls hot for ``_spin_seconds``, then blocks in slices from
    ``_first_slice`` doubling up to ``_max_slice`` seconds.
    """

    _spin_seconds: ClassVar[float] = 0.0
    _first_slice: ClassVar[float] = 5e-3
    _max_slice: ClassVar[float] = 5e-3

    _state: TransferState
    _error: KvxferError | None
    _released: bool
    _default_timeout: float
    nbytes: int
    strategy: str
    deadline: float
    posted_at: float
    finished_at: float | None

    @abstractmethod
    def poll(self) -> TransferState:
        """Observe progress without blocking; enforces the deadline. UsageError once released."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop the work; raise nothing for work that already ended."""

    @abstractmethod
    def block(self, seconds: float) -> None:
        """Wait up to ``seconds`` for progress (returns early when the work may be done)."""

    @property
    def state(self) -> TransferState:
        """The last observed state (call :meth:`poll` to observe again)."""
        return self._state

    @property
    def error(self) -> KvxferError | None:
        """Why it failed or was cancelled (None while PENDING or after DONE)."""
        return self._error

    @property
    def released(self) -> bool:
        """True after :meth:`release`."""
        return self._released

    @property
    def default_timeout(self) -> float:
        """The limit of :meth:`wait` without a timeout (the agent's ``Timeouts.transfer``)."""
        return self._default_timeout

    @property
    def backend(self) -> str | None:
        """Name of the backend moving the bytes (None when several steps may use several)."""
        return None

    @property
    def seconds(self) -> float | None:
        """Time from post to the moment the final state was observed."""
        return None if self.finished_at is None else self.finished_at - self.posted_at

    def wait(self, timeout: float | None = None) -> Self:
        """Block until final; return self when DONE.

        ``timeout`` defaults to :attr:`default_timeout`. Raises TransferTimeoutError when it runs out (the work
        goes on until its own deadline or :meth:`cancel`), the error when it FAILED, and TransferCancelledError
        when it was cancelled.
        """
        # A string, a bool, NaN (a deadline that never fires), infinity or a negative number is a ConfigError.
        checked = check_timeout(timeout)
        limit = self._default_timeout if checked is None else checked
        give_up = time.monotonic() + limit
        spin_until = time.monotonic() + self._spin_seconds
        pause = self._first_slice
        while not self.poll().final:
            now = time.monotonic()
            if now >= give_up:
                raise self.timeout_error(limit)
            if now > spin_until:
                self.block(min(pause, give_up - now))
                pause = min(pause * 2, self._max_slice)
        return self.result()

    def result(self) -> Self:
        """Self when DONE; the error when FAILED or CANCELLED; UsageError while PENDING."""
        if self._state is TransferState.DONE:
            return self
        if self._error is None:
            raise UsageError(f"this handle is {self._state.value}, not final")
        raise self._error

    def timeout_error(self, limit: float) -> TransferTimeoutError:
        """The error of a wait that ran out after ``limit`` seconds."""
        return TransferTimeoutError(
            f"wait timed out after {limit} s; the transfer is still in flight", self, self.backend
        )

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# Polling backoff while waiting on a transfer: start hot (transfers of small requests finish in microseconds), then
# back off so a long wait does not burn a core.
_SPIN_SECONDS = 50e-6
_MAX_SLEEP = 1e-3


class TransferHandle(Handle):
    """One posted READ or WRITE. Poll it, wait for it (with a deadline), cancel it, release it.

    Use it as a context manager or call :meth:`release`; a handle dropped while still PENDING warns with
    ResourceWarning.
    """

    _spin_seconds = _SPIN_SECONDS
    _first_slice = 1e-6
    _max_slice = _MAX_SLEEP

    def __init__(
        self,
        agent: Agent,
        backend: Backend,
        request: Request,
        op: Op,
        nbytes: int,
        deadline: float,
        on_final: Callable[[TransferHandle], None] | None = None,
        strategy: str = "direct",
        regions: tuple[int, ...] = (),
    ) -> None:
        self._agent = agent
        self._backend = backend
        self._request = request
        self._lock = threading.Lock()
        self._state = TransferState.PENDING
        self._error: KvxferError | None = None
        self._released = False
        self._on_final = on_final
        #: indices of the local regions the transfer pins until it is final
        self.regions = regions
        self.op = op
        self.nbytes = nbytes
        self.deadline = deadline
        self.strategy = strategy
        self.posted_at = time.monotonic()
        self.finished_at: float | None = None

    @property
    def _default_timeout(self) -> float:  # type: ignore[override]
        return float(self._agent.timeouts.transfer)

    @property
    def backend(self) -> str:
        """Name of the backend moving the bytes."""
        return self._backend.caps.name

    def poll(self) -> TransferState:
        """Observe progress without blocking; enforces the deadline."""
        self._check_usable()
        with self._lock:
            if self._state.final:
                return self._state
            try:
                state = self._request.poll()
            except KvxferError as error:
                return self._finish(TransferState.FAILED, error)
            except Exception as error:  # noqa: BLE001 a backend bug must still end the transfer, not hang the caller
                failure = TransferError(f"backend {self.backend} failed while polling: {error}", self, self.backend)
                failure.__cause__ = error
                return self._finish(TransferState.FAILED, failure)
            if state is TransferState.PENDING:
                if time.monotonic() > self.deadline:
                    self._request.cancel()
                    return self._finish(
                        TransferState.FAILED,
                        TransferTimeoutError(
                            f"transfer of {self.nbytes} bytes missed its deadline", self, self.backend
                        ),
                    )
                return state
            reason: KvxferError | None = self._request.error
            if state is TransferState.FAILED and reason is None:
                reason = TransferError("transfer failed", self, self.backend)
            if state is TransferState.CANCELLED and reason is None:
                reason = TransferCancelledError("transfer was cancelled", self, self.backend)
            return self._finish(state, reason)

    def block(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the backend to progress (returns early when the transfer may be done);
        :meth:`poll` afterwards says where it stands."""
        self._request.wait(seconds)

    def cancel(self) -> None:
        """Stop the transfer. When the backend guarantees it (``caps.can_cancel``), no byte of it lands after
        this returns; otherwise it returns once the backend will touch the memory no more."""
        self._check_usable()
        with self._lock:
            if self._state.final:
                return
            self._request.cancel()
            state = self._request.poll()
            if state in (TransferState.PENDING, TransferState.CANCELLED):
                self._finish(
                    TransferState.CANCELLED, TransferCancelledError("transfer was cancelled", self, self.backend)
                )
            else:  # it ended before the cancel reached it: report how it really ended
                self._finish(state, self._request.error)

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

    def __del__(self) -> None:
        pending = getattr(self, "_state", TransferState.DONE) is TransferState.PENDING
        if not getattr(self, "_released", True) and pending:
            warnings.warn(
                f"TransferHandle of {self.nbytes} bytes dropped while still pending; wait() or release() it",
                ResourceWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"TransferHandle({self.op}, {self.nbytes} bytes, {self.backend}, {self._state.value})"
