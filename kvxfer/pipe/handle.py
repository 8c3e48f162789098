"""The handle of a pipe request: one handle over every step of a pull or push.

:class:`PipeHandle` looks like a :class:`~kvxfer.handle.TransferHandle` (poll / wait / cancel / release, a
deadline) and finishes only when every step has; its request's end work (checksums, notifications) runs once,
after all the data is in place. :class:`LayerStream` is the handle of a streamed request, whose steps are posted
layer by layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from ..errors import (
    DescriptorError,
    KvxferError,
    TransferCancelledError,
    TransferError,
    TransferTimeoutError,
    UsageError,
)
from ..handle import Handle, TransferState
from ..spec import as_index_array, selection_ids
from .request import PipeRequest
from .route import Layers
from .steps import Step


class PipeHandle(Handle):
    """The handle of one pipe request (pull or push): a :class:`~kvxfer.Handle` over every step. ``strategy``
    names how each rank pair moves its bytes."""

    def __init__(
        self,
        steps: list[Step],
        deadline: float,
        default_timeout: float,
        strategy: str,
        nbytes: int,
        request: PipeRequest | None = None,
    ) -> None:
        self._steps = list(steps)
        self._lock = threading.RLock()
        self._state = TransferState.PENDING
        self._error: KvxferError | None = None
        self._released = False
        self._request = request
        self._last_states: list[TransferState] = []
        self._default_timeout = default_timeout
        self.deadline = deadline
        self.strategy = strategy
        self.nbytes = nbytes
        self.posted_at = time.monotonic()
        self.finished_at: float | None = None

    def add(self, steps: list[Step]) -> None:
        """Attach steps posted later (layers streamed as they become ready)."""
        with self._lock:
            if self._state.final:
                raise UsageError(f"this request is already {self._state.value}")
            self._steps.extend(steps)

    def _more_to_come(self) -> bool:
        """True while steps may still be added (a streamed request's layers not all posted yet)."""
        return False

    def poll(self) -> TransferState:
        """Observe every step without blocking; enforces the deadline; runs the request's end work once."""
        if self._released:
            raise UsageError("this handle was released")
        with self._lock:
            if self._state.final:
                return self._state
            states = [step.poll() for step in self._steps]
            self._last_states = states
            failed = next(
                (
                    s
                    for s, state in zip(self._steps, states, strict=True)
                    if state.final and state is not TransferState.DONE
                ),
                None,
            )
            if failed is not None:
                self._abort(TransferState.FAILED, failed.error or TransferError("a step of the transfer failed"))
            elif all(state is TransferState.DONE for state in states) and not self._more_to_come():
                self._complete()
            elif time.monotonic() > self.deadline:
                self._abort(
                    TransferState.FAILED,
                    TransferTimeoutError(f"KV transfer of {self.nbytes} bytes missed its deadline", self),
                )
            return self._state

    def _complete(self) -> None:
        try:
            if self._request is not None:
                self._request.finish()
        except KvxferError as error:
            self._finish(TransferState.FAILED, error)
            return
        self._finish(TransferState.DONE, None)

    def _abort(self, state: TransferState, error: KvxferError) -> None:
        for step in self._steps:
            try:
                step.cancel()
            except KvxferError:
                pass
        self._finish(state, error)

    def _finish(self, state: TransferState, error: KvxferError | None) -> None:
        self._state, self._error = state, error
        if isinstance(error, TransferError) and error.handle is None:
            error.handle = self
        self.finished_at = time.monotonic()
        if self._request is not None:
            self._request.end(self._listener())

    def _listener(self) -> Callable[[list[int]], None] | None:
        """What listens to layer announcements for this request (None: nothing)."""
        return None

    def block(self, seconds: float) -> None:
        """Wait up to ``seconds`` for an unfinished step to progress (each step knows how to sleep until it does);
        :meth:`poll` afterwards says where the request stands."""
        with self._lock:
            # before the first poll there are no states yet: nothing counts as busy
            busy = [
                step
                for step, state in zip(self._steps, self._last_states, strict=False)
                if state is not TransferState.DONE
            ]
        (busy[0] if busy else Step()).block(seconds)

    def cancel(self) -> None:
        """Cancel every step; no byte lands after this returns (on backends that guarantee it)."""
        with self._lock:
            if not self._state.final:
                self._abort(TransferState.CANCELLED, TransferCancelledError("KV transfer was cancelled", self))

    def __repr__(self) -> str:
        return f"PipeHandle({self.strategy}, {self.nbytes} bytes, {self._state.value})"


class LayerStream(PipeHandle):
    """A push or pull whose layers move as they are marked ready (push: by the caller; pull: by the peers'
    announcements)."""

    def __init__(
        self, request: PipeRequest, steps: list[Step], deadline: float, limit: float, strategy: str, nbytes: int
    ) -> None:
        self._pending_layers = set(int(x) for x in request.layers)
        super().__init__(steps, deadline, limit, strategy, nbytes, request)

    def _more_to_come(self) -> bool:
        return bool(self._pending_layers)

    def _listener(self) -> Callable[[list[int]], None] | None:
        return self.announced

    def ready(self, layers: Layers) -> None:
        """Layers (an id, ids or a range) are computed: start moving them."""
        request = self._request
        assert request is not None
        chosen = as_index_array(selection_ids(layers, request.num_layers), "layers", request.num_layers)
        with self._lock:
            fresh = [int(x) for x in chosen if int(x) in self._pending_layers]
            if len(fresh) != len(chosen):
                raise DescriptorError(
                    f"layers {sorted(set(chosen.tolist()) - set(fresh))} are not awaited by this request"
                )
            if self.poll().final:  # a failed or cancelled request posts nothing more
                raise UsageError(f"this request is already {self.state.value}")
            self.add(request.steps(np.asarray(fresh, dtype=np.int64)))
            self._pending_layers.difference_update(fresh)

    def announced(self, layers: list[int]) -> None:
        """Every peer announced ``layers``: move those this pull awaits (from the delivering thread)."""
        with self._lock:
            wanted = [x for x in layers if x in self._pending_layers]
            if not wanted or self._released or self.poll().final:
                return
            try:
                self.ready(wanted)
            except KvxferError as error:  # the pull cannot go on: fail it now rather than at its deadline
                if not self._state.final:
                    self._abort(TransferState.FAILED, error)
