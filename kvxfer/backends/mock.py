"""MockBackend: the local backend with injected faults, the test seam for everything above the backends.

``MockBackend(on_post=fn)``: ``fn(op, plan, notify)`` returns None (behave like "local") or a :class:`Fault`:
``Fault.delay(s)`` (start after s seconds, cancellable), ``Fault.fail(msg)`` (fail, no byte moves),
``Fault.drop()`` (never completes, no byte moves: exercises deadlines), ``Fault.corrupt(n)`` (move the bytes, then
flip the first n bytes of the first destination span, and complete normally: exercises checksums).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BackendError, ConfigError
from ..handle import TransferState
from .base import BackendCaps, Op, Scope
from .local import LocalBackend, LocalRequest

if TYPE_CHECKING:
    from ..plan import TransferPlan

_FAULT_KINDS = ("delay", "fail", "drop", "corrupt")


@dataclass(frozen=True)
class Fault:
    """What the mock does to one transfer."""

    kind: str
    seconds: float = 0.0
    message: str = "injected failure"
    nbytes: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ConfigError(f"Fault.kind must be one of {_FAULT_KINDS}, got {self.kind!r}")

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Start moving bytes only after ``seconds``."""
        return cls("delay", seconds=seconds)

    @classmethod
    def fail(cls, message: str = "injected failure") -> Fault:
        """Fail without moving a byte."""
        return cls("fail", message=message)

    @classmethod
    def drop(cls) -> Fault:
        """Never complete, never move a byte."""
        return cls("drop")

    @classmethod
    def corrupt(cls, nbytes: int = 1) -> Fault:
        """Move the bytes, then flip ``nbytes`` of them at the destination."""
        return cls("corrupt", nbytes=nbytes)


class MockBackend(LocalBackend):
    """A local backend that asks ``on_post`` what fault, if any, to inject into each transfer."""

    caps = BackendCaps(
        name="mock",
        wire="local",
        memory_kinds=LocalBackend.caps.memory_kinds,
        scope=Scope.PROCESS,
        can_cancel=True,
        preference=100,
    )

    def __init__(self, on_post: Callable[[Op, TransferPlan, bytes | None], Fault | None] | None = None) -> None:
        super().__init__()
        self.on_post = on_post
        self.posted = 0

    def post(self, op: Op, plan: TransferPlan, notify: bytes | None, fault: Fault | None = None) -> LocalRequest:
        self.posted += 1
        fault = self.on_post(op, plan, notify) if self.on_post else None
        if fault is not None and not isinstance(fault, Fault):
            raise ConfigError(f"on_post must return a Fault or None, got {type(fault).__name__}")
        return super().post(op, plan, notify, fault)

    def _apply_fault_before(self, request: LocalRequest) -> bool:
        fault = request.fault
        if fault is None or fault.kind == "corrupt":
            return True
        if fault.kind == "drop":
            return False
        if fault.kind == "fail":
            with request.cond:
                if request.state is TransferState.PENDING:
                    request.error = BackendError(fault.message, backend=self.caps.name)
                    request.state = TransferState.FAILED
            return False
        give_up = time.monotonic() + fault.seconds
        while time.monotonic() < give_up:
            if request.cancelled:
                return False
            time.sleep(min(1e-3, max(give_up - time.monotonic(), 0)))
        return True

    def _apply_fault_after(self, request: LocalRequest) -> None:
        fault = request.fault
        if fault is None or fault.kind != "corrupt":
            return
        destination, size = int(request.destinations[0]), min(fault.nbytes, int(request.sizes[0]))
        if request.on_device:
            from ..devices import cupy_module

            cupy = cupy_module()
            span = cupy.ndarray(
                (size,), cupy.uint8, cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(destination, size, None), 0)
            )
            span ^= 0xFF
            cupy.cuda.runtime.deviceSynchronize()
        else:
            span = (ctypes.c_uint8 * size).from_address(destination)
            for i in range(size):
                span[i] ^= 0xFF
